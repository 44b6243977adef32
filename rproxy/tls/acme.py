"""ACME: certificates for `[acme] domains`, obtained and renewed automatically.

One worker at a time manages the certificates: the one holding the lock file
in cache_dir (a worker that dies releases it, and another takes over within
seconds). It orders one certificate per domain (acme_order.py: the account,
the order and its challenges) and writes each certificate with its key into
cache_dir in one atomic rename.
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

With `[acme] storage = redis://...` several instances share one account,
one set of certificates and the challenge answers (acme_store.py): in each,
the lock file's holder mirrors the store into cache_dir, and the one that
also holds the fleet's lease in Redis orders.

When the CA's directory offers ACME Renewal Information (RFC 9773, ari.py),
a certificate is renewed at a random moment inside the window the CA
suggests for it, asked again as often as the CA's Retry-After says;
otherwise, or when asking fails, `renew_before` ahead of its expiry.

A failed attempt is logged with the CA's own error, the certificate in place
goes on being served, and the attempt is repeated after `retry_interval`,
doubling each time up to 12 hours.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from rproxy.tls import acme_store, ari, certificates
from rproxy.tls.acme_cache import CacheDir, shared_store, when
from rproxy.tls.acme_order import Account, describe
from rproxy.tls.certificates import CertificateProblem

if TYPE_CHECKING:
    pass

log = logging.getLogger("rproxy.acme")

MAX_RETRY_INTERVAL = 12 * 3600.0
# Followers try the lock this often: how soon one takes over from a dead manager.
LEADER_POLL = 2.0
# Even with nothing due, the manager looks at its certificates this often
# (a file deleted by hand, a clock that jumped).
RECHECK = 3600.0


def renewal_time(leaf, renew_before: float) -> float:
    """When a certificate is due: renew_before ahead of its expiry, or a third
    of its lifetime ahead for certificates that live less than renew_before."""
    not_after = leaf.not_valid_after_utc.timestamp()
    lifetime = not_after - leaf.not_valid_before_utc.timestamp()
    window = renew_before if renew_before < lifetime else lifetime / 3
    return not_after - window


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
        self.account = Account(config, self.cache, challenges, self._sleep, alive)
        self.store: acme_store.RedisStore | None = None  # while sharing one
        self.unshared: set[str] = set()  # domains whose new certificate the store has not taken yet
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
                if self.config.storage:
                    self.share()
                else:
                    self.manage()
                break
        finally:
            lock.close()  # releases the lock

    # -- a fleet sharing one store ------------------------------------------

    def share(self) -> None:
        """This instance's part in a fleet: mirror the store into cache_dir
        and, while holding the fleet's issuance lease, manage the certificates."""
        import gevent
        store = shared_store(self.config)
        assert store is not None  # a fleet shares only with [acme] storage
        self.store = self.account.store = store
        mirror = acme_store.Mirror(self.store, self.cache, self.config.domains)
        failing = False
        alive = self.alive
        try:
            while alive():
                try:
                    mirror.sync(force=failing)
                    leading = self.store.acquire()
                except Exception as e:  # noqa: BLE001 - an outage is waited out, whatever it is
                    if not failing:
                        failing = True
                        log.error("acme: storage %s failed (%s); serving the certificates in %s until it is "
                                  "back, trying again every %gs", self.store.where, e or type(e).__name__,
                                  self.cache.root, acme_store.MIRROR_POLL)
                    self._sleep(acme_store.MIRROR_POLL)
                    continue
                if failing:
                    failing = False
                    log.warning("acme: storage %s is back", self.store.where)
                if not leading:
                    self._sleep(acme_store.MIRROR_POLL)
                    continue
                log.info("acme: worker %d holds the fleet's issuance lease in %s", os.getpid(), self.store.where)
                # Certificates this instance has from before it joined the fleet, or
                # obtained while the store was down, are shared.
                self.unshared |= mirror.newer_here
                self.unshared |= {d for d in self.config.domains if d not in mirror.stored and self._leaf(d)}
                lease = acme_store.Lease(self.store, alive)
                keeper = gevent.spawn(lease.keep)
                self.alive = lease.held
                try:
                    self.manage()
                finally:
                    self.alive = alive
                    keeper.kill()
                    lease.release()
        finally:
            self.alive = alive

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
                log.info("acme: %s: certificate from the cache, renewal due %s", domain, when(due))
        while self.alive():
            self.share_certificates()
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
            if self.unshared:
                wake = min(wake, now + self.config.retry_interval)
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
                            "expiry", domain, describe(e), when(renewal_time(leaf, self.config.renew_before)),
                            _span(self.config.renew_before))
            return
        self.ari_failing.discard(domain)
        plan = self.plans.get(domain)
        if plan is None or plan.serial != leaf.serial_number or plan.window != window:
            plan = self.plans[domain] = RenewalPlan(leaf.serial_number, window, ari.choose(window))
            log.info("acme: %s: the CA suggests renewing between %s and %s; renewal due %s", domain,
                     when(window.start), when(window.end), "now" if plan.at <= now else when(plan.at))

    # -- one order ------------------------------------------------------------

    def obtain(self, domain: str) -> None:
        started = time.monotonic()
        path = self.cache.certificate(domain)
        try:
            chain, key = self.account.order(domain)
            # Key and chain in one file, replaced in one rename: a worker never
            # sees the new certificate with the old key.
            certificates.write_private(path, certificates.key_pem(key) + chain.encode())
            leaf = certificates.load_chain(path)[0]
        except Exception as e:  # noqa: BLE001 - every failure is logged, then retried
            self._failed(domain, e)
            return
        self.failures[domain], self.retry_at[domain] = 0, 0.0
        if self.store is not None:
            self.unshared.add(domain)
            self.share_certificates()
        self.ask_again[domain] = 0.0  # the new certificate has renewal information of its own: ask now
        log.info("acme: %s: obtained a certificate in %.1fs, valid until %s; renewal due %s", domain,
                 time.monotonic() - started, when(leaf.not_valid_after_utc.timestamp()),
                 when(renewal_time(leaf, self.config.renew_before)))

    def share_certificates(self) -> None:
        """Hand the certificates obtained here to the fleet's store (again
        after it failed: meanwhile the other instances serve their own)."""
        if self.store is None:  # no fleet: nothing to share
            return
        for domain in sorted(self.unshared):
            try:
                with open(self.cache.certificate(domain), "rb") as f:
                    self.store.put_certificate(domain, f.read())
            except Exception as e:  # noqa: BLE001 - kept locally, tried again
                log.error("acme: %s: cannot share the new certificate in %s (%s); served here, trying again "
                          "in %s", domain, self.store.where, e or type(e).__name__,
                          _span(self.config.retry_interval))
                return
            self.unshared.discard(domain)

    def _failed(self, domain: str, error: Exception) -> None:
        self.account.forget()
        self.failures[domain] += 1
        wait = min(self.config.retry_interval * 2 ** (self.failures[domain] - 1), MAX_RETRY_INTERVAL)
        self.retry_at[domain] = time.time() + wait
        try:
            leaf = certificates.load_chain(self.cache.certificate(domain))[0]
        except CertificateProblem:
            serving = "serving a placeholder certificate until then"
        else:
            expiry = leaf.not_valid_after_utc.timestamp()
            serving = (f"still serving the current certificate (valid until {when(expiry)})" if expiry > time.time()
                       else f"still serving the current certificate, expired since {when(expiry)}")
        detail = describe(error)
        log.error("acme: %s: could not obtain a certificate from %s: %s; %s; next attempt in %s",
                  domain, self.config.directory, detail, serving, _span(wait))
        if detail.startswith("unexpected "):
            log.debug("acme: %s: details of the unexpected error", domain, exc_info=error)


