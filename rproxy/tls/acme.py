"""ACME: certificates for `[acme] domains`, obtained and renewed automatically.

One worker at a time manages the certificates: the one holding the lock file
in cache_dir (a worker that dies releases it, and another takes over within
seconds). It registers the account, orders one certificate per domain, and
writes each certificate with its key into cache_dir in one atomic rename.
Each order answers the first of `[acme] challenges` that the CA offers and
the listeners allow: TLS-ALPN-01 on the TLS port (alpn_challenge.py), HTTP-01 on
the plain-HTTP one (plain_http.py), DNS-01 by a TXT record that the DNS
provider publishes and removes (dns01.py), the CA told to look only once the
zone's authoritative servers answer it. Every worker serves what it finds there: its
TLS context store notices the new file within a second (see certificates.py),
so a renewal reaches all workers without a restart, and open connections
keep the certificate they started with. Challenge answers (HTTP-01 key
authorizations, TLS-ALPN-01 certificates) are files in cache_dir too, so
whichever worker the CA's validation request reaches can answer it.

When the CA's directory offers ACME Renewal Information (RFC 9773, ari.py),
a certificate is renewed at a random moment inside the window the CA
suggests for it, asked again as often as the CA's Retry-After says;
otherwise, or when asking fails, `renew_before` ahead of its expiry.

A failed attempt is logged with the CA's own error, the certificate in place
goes on being served, and the attempt is repeated after `retry_interval`,
doubling each time up to 12 hours.
"""

from __future__ import annotations

import datetime
import fcntl
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

from rproxy.tls import alpn_challenge, ari, certificates, dns01
from rproxy.tls.certificates import CertificateProblem

log = logging.getLogger("rproxy.acme")

CHALLENGE_PREFIX = "/.well-known/acme-challenge/"
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{1,256}")
MAX_RETRY_INTERVAL = 12 * 3600.0
# Followers try the lock this often: how soon one takes over from a dead manager.
LEADER_POLL = 2.0
# Even with nothing due, the manager looks at its certificates this often
# (a file deleted by hand, a clock that jumped).
RECHECK = 3600.0
ORDER_TIMEOUT = 90.0


class CacheDir:
    """The layout of cache_dir. Account and certificates are kept per ACME
    directory, so that staging certificates never pass for production ones."""

    def __init__(self, config):
        self.root = os.path.abspath(config.cache_dir)
        parts = urlsplit(config.directory)
        issuer = re.sub(r"[^A-Za-z0-9.-]+", "-", f"{parts.netloc}{parts.path}").strip("-")
        self.issuer = os.path.join(self.root, issuer or "acme")
        self.account_key = os.path.join(self.issuer, "account.key")
        self.certificates = os.path.join(self.issuer, "certificates")
        self.challenges = os.path.join(self.root, "challenges")
        self.tls_alpn = os.path.join(self.root, "tls-alpn-01")
        self.lock = os.path.join(self.root, "lock")
        self.placeholder = os.path.join(self.root, "placeholder.pem")

    def certificate(self, domain: str) -> str:
        """The certificate chain of `domain` with its private key, in one file."""
        return os.path.join(self.certificates, f"{domain}.pem")

    def challenge(self, token: str) -> str:
        return os.path.join(self.challenges, token)

    def tls_alpn_certificate(self, domain: str) -> str:
        return os.path.join(self.tls_alpn, f"{domain}.pem")

    def prepare(self) -> None:
        for path in (self.root, self.issuer, self.certificates, self.challenges, self.tls_alpn):
            os.makedirs(path, mode=0o700, exist_ok=True)


def prepare(config) -> None:
    """In the master, before the workers start: cache_dir exists, and a
    placeholder certificate covers the domains until theirs are issued."""
    cache = CacheDir(config.acme)
    cache.prepare()
    certificates.write_placeholder(cache.placeholder, config.acme.domains)


def certificate_problems(config, now: float | None = None) -> list[str]:
    """Why a configured domain has no valid certificate (it is served the
    placeholder): one reason per domain, for /readyz."""
    if not config.domains:
        return []
    cache, now = CacheDir(config), time.time() if now is None else now
    problems = []
    for domain in config.domains:
        try:
            leaf = certificates.load_chain(cache.certificate(domain))[0]
        except CertificateProblem:
            leaf = None
        if leaf is None or domain not in certificates.names_of(leaf):
            problems.append(f"certificate {domain}: none valid")
        elif leaf.not_valid_after_utc.timestamp() <= now:
            problems.append(f"certificate {domain}: expired since {_when(leaf.not_valid_after_utc.timestamp())}")
    return problems


def challenge_answer(cache: CacheDir, path: str) -> bytes | None:
    """The key authorization for an HTTP-01 request path, if one is pending."""
    token = path[len(CHALLENGE_PREFIX):]
    if not _TOKEN_RE.fullmatch(token):
        return None
    try:
        with open(cache.challenge(token), "rb") as f:
            return f.read()
    except OSError:
        return None


def renewal_time(leaf, renew_before: float) -> float:
    """When a certificate is due: renew_before ahead of its expiry, or a third
    of its lifetime ahead for certificates that live less than renew_before."""
    not_after = leaf.not_valid_after_utc.timestamp()
    lifetime = not_after - leaf.not_valid_before_utc.timestamp()
    window = renew_before if renew_before < lifetime else lifetime / 3
    return not_after - window


def _when(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def usable_challenges(config) -> tuple[str, ...]:
    """`[acme] challenges` the listeners allow, in order of preference."""
    return tuple(c for c in config.acme.challenges if c != "http-01" or config.server.http_bind)


def start(config, alive: Callable[[], bool]) -> None:
    """In each worker: compete for the lock; the winner manages the certificates."""
    import gevent
    gevent.spawn(Manager(config.acme, alive, usable_challenges(config)).run)


@dataclass(frozen=True)
class RenewalPlan:
    """The moment chosen in the window the CA suggested for one certificate;
    chosen again only when the CA moves the window."""
    serial: int
    window: ari.Window
    at: float


class Manager:
    def __init__(self, config, alive: Callable[[], bool], challenges: tuple[str, ...] = ("http-01",)):
        self.config = config
        self.challenges = challenges
        self.cache = CacheDir(config)
        self.alive = alive
        self.client = None
        self.dns_provider: dns01.Provider | None = None
        self.failures = {domain: 0 for domain in config.domains}
        self.retry_at = {domain: 0.0 for domain in config.domains}
        # Renewal information: the directory's URL ("" = none offered; None = ask
        # the directory again), and per domain the plan for its current certificate.
        self.renewal_info: str | None = None
        self.directory_checked = 0.0
        self.plans: dict[str, RenewalPlan] = {}
        self.ask_again: dict[str, float] = {}
        self.ari_failing: set[str] = set()

    # -- leadership ---------------------------------------------------------

    def run(self) -> None:
        try:
            lock = open(self.cache.lock, "a")
        except OSError as e:
            log.error("acme: cannot open %s: %s; no certificates will be obtained", self.cache.lock,
                      e.strerror or e)
            return
        try:
            while self.alive():
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    self._sleep(LEADER_POLL)
                    continue
                log.info("acme: worker %d manages the certificates of %s (%s)", os.getpid(),
                         " ".join(self.config.domains), self.config.directory)
                self.manage()
                break
        finally:
            lock.close()  # releases the lock

    def _sleep(self, seconds: float) -> None:
        """Sleep, waking each second to see whether the worker is stopping."""
        deadline = time.monotonic() + seconds
        while self.alive() and time.monotonic() < deadline:
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    # -- the schedule -------------------------------------------------------

    def manage(self) -> None:
        for domain in self.config.domains:
            due = self.due(domain, announce=True)
            if due is not None and due > time.time():
                log.info("acme: %s: certificate from the cache, renewal due %s", domain, _when(due))
        while self.alive():
            for domain in self.config.domains:
                if not self.alive():
                    return
                self.check_renewal_info(domain)
                now = time.time()
                due = self.due(domain)
                if (due is None or due <= now) and self.retry_at[domain] <= now:
                    self.obtain(domain)
            now = time.time()
            wake = now + RECHECK
            for domain in self.config.domains:
                due = self.due(domain)
                wake = min(wake, max(due or now, self.retry_at[domain]), self.ask_again.get(domain, wake))
            self._sleep(max(0.5, wake - now))

    def due(self, domain: str, announce: bool = False) -> float | None:
        """When the cached certificate of `domain` is due for renewal (None: there is none)."""
        leaf = self._leaf(domain, announce)
        if leaf is None:
            return None
        plan = self.plans.get(domain)
        if plan is not None and plan.serial == leaf.serial_number:
            return plan.at
        return renewal_time(leaf, self.config.renew_before)

    def _leaf(self, domain: str, announce: bool = False):
        """The cached certificate of `domain`, if there is one for it."""
        path = self.cache.certificate(domain)
        try:
            leaf = certificates.load_chain(path)[0]
        except CertificateProblem as e:
            if announce and os.path.exists(path):
                log.warning("acme: %s: the cached certificate is unusable (%s); obtaining a new one",
                            domain, e)
            return None
        if domain not in certificates.names_of(leaf):
            return None
        return leaf

    def check_renewal_info(self, domain: str) -> None:
        """Ask the CA when it would like the certificate of `domain` renewed,
        when the CA's last answer said to ask again."""
        now = time.time()
        if self.ask_again.get(domain, 0.0) > now:
            return
        leaf = self._leaf(domain)
        # RFC 9773 §4.3: never about an expired certificate (it is due anyway).
        if leaf is None or leaf.not_valid_after_utc.timestamp() <= now:
            self.ask_again.pop(domain, None)
            return
        verify = self.config.ca_file or True
        try:
            if self.renewal_info is None or self.directory_checked + ari.DEFAULT_RETRY <= now:
                self.renewal_info = ari.renewal_info_url(self.config.directory, verify)
                self.directory_checked = now
            if not self.renewal_info:
                self.plans.pop(domain, None)
                self.ask_again[domain] = self.directory_checked + ari.DEFAULT_RETRY
                return
            window, self.ask_again[domain] = ari.fetch(self.renewal_info, leaf, verify, now)
        except Exception as e:  # noqa: BLE001 - the fixed rule stands in, whatever went wrong
            self.renewal_info = None
            self.plans.pop(domain, None)
            self.ask_again[domain] = now + RECHECK
            if domain not in self.ari_failing:  # once, not at every attempt
                self.ari_failing.add(domain)
                log.warning("acme: %s: no renewal information from the CA (%s); renewal due %s, %s before "
                            "expiry", domain, describe(e), _when(renewal_time(leaf, self.config.renew_before)),
                            _span(self.config.renew_before))
            return
        self.ari_failing.discard(domain)
        plan = self.plans.get(domain)
        if plan is None or plan.serial != leaf.serial_number or plan.window != window:
            plan = self.plans[domain] = RenewalPlan(leaf.serial_number, window, ari.choose(window))
            log.info("acme: %s: the CA suggests renewing between %s and %s; renewal due %s", domain,
                     _when(window.start), _when(window.end), "now" if plan.at <= now else _when(plan.at))

    # -- one order ------------------------------------------------------------

    def obtain(self, domain: str) -> None:
        started = time.monotonic()
        path = self.cache.certificate(domain)
        try:
            chain, key = self._order(domain)
            # Key and chain in one file, replaced in one rename: a worker never
            # sees the new certificate with the old key.
            certificates.write_private(path, certificates.key_pem(key) + chain.encode())
            leaf = certificates.load_chain(path)[0]
        except Exception as e:  # noqa: BLE001 - every failure is logged, then retried
            self._failed(domain, e)
            return
        self.failures[domain], self.retry_at[domain] = 0, 0.0
        self.ask_again[domain] = 0.0  # the new certificate has renewal information of its own: ask now
        log.info("acme: %s: obtained a certificate in %.1fs, valid until %s; renewal due %s", domain,
                 time.monotonic() - started, _when(leaf.not_valid_after_utc.timestamp()),
                 _when(renewal_time(leaf, self.config.renew_before)))

    def _order(self, domain: str):
        from acme import crypto_util, messages
        client = self._client()
        key = certificates.new_key()
        order = client.new_order(crypto_util.make_csr(certificates.key_pem(key), [domain]))
        answers = []  # the files that answer the challenges, removed after the order
        records = []  # the TXT records that answer dns-01 challenges, removed after the order
        responses = []
        try:
            for authz in order.authorizations:
                if authz.body.status == messages.STATUS_VALID:
                    continue  # validated recently: the CA reuses it
                kind, challenge = self._choose(domain, authz.body.challenges)
                name = authz.body.identifier.value
                response, validation = challenge.response_and_validation(client.net.key, domain=name)
                if kind == "dns-01":
                    record = (domain, dns01.txt_name(name), validation)
                    self._dns_provider().present(*record)
                    records.append(record)
                elif kind == "tls-alpn-01":
                    path = self.cache.tls_alpn_certificate(name)
                    certificates.write_private(path, validation)
                    answers.append(path)
                else:
                    path = self.cache.challenge(challenge.chall.encode("token"))
                    certificates.write_private(path, validation.encode(), mode=0o644)
                    answers.append(path)
                responses.append((challenge, response))
            if records:
                # The CA asks once: it must find the record on its first look.
                dns01.wait_until_visible([(name, value) for _, name, value in records],
                                         [self.config.dns_server] if self.config.dns_server else None,
                                         self.config.dns_propagation_timeout, self._sleep, self.alive)
            for challenge, response in responses:
                client.answer_challenge(challenge, response)
            deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_TIMEOUT)
            order = client.poll_and_finalize(order, deadline)
        finally:
            for path in answers:
                try:
                    os.unlink(path)
                except OSError:
                    pass
            for record in records:
                try:
                    self._dns_provider().cleanup(*record)
                except dns01.DnsProblem as e:
                    log.warning("acme: %s: could not remove the dns-01 record: %s", domain, e)
        leaf = certificates.parse_chain(order.fullchain_pem.encode(), "the CA's answer")[0]
        if domain not in certificates.names_of(leaf) or not certificates.belongs_to(key, leaf):
            raise RuntimeError(f"the CA's certificate (for {' '.join(certificates.names_of(leaf))}) does "
                               f"not match the order for {domain}")
        return order.fullchain_pem, key

    def _choose(self, domain: str, offered):
        """The first of our challenge types that the CA offers: (its name, the challenge)."""
        from acme import challenges
        kinds = {"tls-alpn-01": _tls_alpn01_challenge(), "http-01": challenges.HTTP01, "dns-01": challenges.DNS01}
        for kind in self.challenges:
            challenge = next((c for c in offered if isinstance(c.chall, kinds[kind])), None)
            if challenge is not None:
                return kind, challenge
        names = " ".join(sorted(str(c.chall.typ) for c in offered)) or "none"
        raise RuntimeError(f"the CA offers no challenge rproxy may answer for {domain} "
                           f"(it offers {names}; usable here: {' '.join(self.challenges)})")

    def _dns_provider(self) -> dns01.Provider:
        if self.dns_provider is None:
            self.dns_provider = dns01.provider_for(self.config)
        return self.dns_provider

    def _client(self):
        """The ACME client with a registered account, made again after a failure
        (the CA may have restarted, or forgotten the account)."""
        if self.client is not None:
            return self.client
        import josepy
        from acme import client as acme_client
        from acme import errors, messages
        _tls_alpn01_challenge()  # before any authorization is parsed
        key = self._account_key()
        net = acme_client.ClientNetwork(josepy.JWKEC(key=key), alg=josepy.ES256,
                                        verify_ssl=self.config.ca_file or True,
                                        user_agent="rproxy (acme-python)")
        directory = acme_client.ClientV2.get_directory(self.config.directory, net)
        client = acme_client.ClientV2(directory, net)
        registration = messages.NewRegistration.from_data(email=self.config.email or None,
                                                          terms_of_service_agreed=True)
        try:
            account = client.new_account(registration)
            log.info("acme: registered account %s", account.uri)
        except errors.ConflictError as e:
            # The key has an account already: the CA answered with its URL.
            net.account = messages.RegistrationResource(uri=e.location, body=messages.Registration())
        self.client = client
        return client

    def _account_key(self):
        path = self.cache.account_key
        if os.path.exists(path):
            return certificates.load_key(path, "account key")
        key = certificates.new_key()
        certificates.write_private(path, certificates.key_pem(key))
        log.info("acme: created the account key %s", path)
        return key

    def _failed(self, domain: str, error: Exception) -> None:
        self.client = None
        self.failures[domain] += 1
        wait = min(self.config.retry_interval * 2 ** (self.failures[domain] - 1), MAX_RETRY_INTERVAL)
        self.retry_at[domain] = time.time() + wait
        try:
            leaf = certificates.load_chain(self.cache.certificate(domain))[0]
        except CertificateProblem:
            serving = "serving a placeholder certificate until then"
        else:
            expiry = leaf.not_valid_after_utc.timestamp()
            serving = (f"still serving the current certificate (valid until {_when(expiry)})" if expiry > time.time()
                       else f"still serving the current certificate, expired since {_when(expiry)}")
        detail = describe(error)
        log.error("acme: %s: could not obtain a certificate from %s: %s; %s; next attempt in %s",
                  domain, self.config.directory, detail, serving, _span(wait))
        if detail.startswith("unexpected "):
            log.debug("acme: %s: details of the unexpected error", domain, exc_info=error)


_TLS_ALPN01 = None


def _tls_alpn01_challenge():
    """The TLS-ALPN-01 challenge type, registered with the acme library
    (which no longer ships it) so that the CA's offers of it are parsed."""
    global _TLS_ALPN01
    if _TLS_ALPN01 is None:
        from acme import challenges

        @challenges.ChallengeResponse.register
        class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
            typ = "tls-alpn-01"

        @challenges.Challenge.register
        class TLSALPN01(challenges.KeyAuthorizationChallenge):
            response_cls = TLSALPN01Response
            typ = response_cls.typ

            def validation(self, account_key, domain: str = "", **kwargs) -> bytes:
                """The challenge certificate with its key (PEM)."""
                return alpn_challenge.challenge_certificate(domain, self.key_authorization(account_key))

        _TLS_ALPN01 = TLSALPN01
    return _TLS_ALPN01


def describe(error: Exception) -> str:
    """One line saying what went wrong, in the CA's own words when it gave any."""
    import requests
    from acme import errors, messages
    if isinstance(error, messages.Error):
        return _problem(error)
    if isinstance(error, errors.ValidationError):
        parts = []
        for authz in error.failed_authzrs:
            for challenge in authz.body.challenges:
                if challenge.error is not None:
                    parts.append(f"validation of {authz.body.identifier.value} failed: "
                                 f"{_problem(challenge.error)}")
        return "; ".join(parts) or "validation failed"
    if isinstance(error, errors.IssuanceError):
        return f"issuance failed: {_problem(error.error)}"
    if isinstance(error, errors.TimeoutError):
        return f"the CA did not finish the order within {ORDER_TIMEOUT:g}s"
    if isinstance(error, requests.exceptions.SSLError):
        return f"TLS error talking to the CA: {_innermost(error)} (is [acme] ca_file right?)"
    if isinstance(error, requests.exceptions.RequestException):
        return f"cannot reach the CA: {_innermost(error)}"
    if isinstance(error, (errors.Error, OSError, CertificateProblem, ari.RenewalInfoError, RuntimeError)):
        return f"{error}"
    return f"unexpected {type(error).__name__}: {error}"


def _problem(error) -> str:
    code = str(error.typ or "").rsplit(":", 1)[-1] or "error"
    text = " ".join(str(p) for p in (error.detail or error.title or error.description or "",) if p)
    return f"{code}: {text}" if text else code


def _innermost(error: BaseException) -> str:
    """The root cause of a requests error, without urllib3's object reprs."""
    seen = error
    while True:
        inner = getattr(seen, "reason", None) or (seen.args[0] if seen.args and
                                                  isinstance(seen.args[0], BaseException) else None)
        if not isinstance(inner, BaseException) or inner is seen:
            break
        seen = inner
    return re.sub(r"<[^>]*>:\s*", "", str(seen))
