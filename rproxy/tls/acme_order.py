"""One order with the CA, and the account it is made under.

`Account.order(domain)` registers the account when it has to (one key in
cache_dir, or the fleet's in its store), places the order, answers each
authorization with the first of `[acme] challenges` the CA offers (an
HTTP-01 file, a TLS-ALPN-01 certificate, a DNS-01 TXT record, and with a
fleet's store the same answers there), tells the CA to look once every
answer can be found, and checks that the certificate it gets is the one
asked for. The answers are removed whatever happens. `describe` turns what
went wrong into one line in the CA's own words.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from typing import Callable

from rproxy.tls import acme_store, alpn_challenge, ari, certificates, dns01
from rproxy.tls.certificates import CertificateProblem

log = logging.getLogger("rproxy.acme")

ORDER_TIMEOUT = 90.0


class Account:
    def __init__(self, config, cache, challenges: tuple[str, ...], sleep: Callable[[float], None],
                 alive: Callable[[], bool]):
        self.config = config
        self.cache = cache
        self.challenges = challenges
        self.sleep = sleep
        self.alive = alive
        self.store: acme_store.RedisStore | None = None  # while a fleet's store is shared
        self._client = None
        self.dns_provider: dns01.Provider | None = None

    def forget(self) -> None:
        """Make the client again next time (the CA may have restarted, or forgotten the account)."""
        self._client = None

    def order(self, domain: str):
        """A new key and the CA's certificate chain for `domain` (PEM): one order,
        its challenges answered and cleaned up whatever happens."""
        from acme import crypto_util, messages
        client = self.client()
        key = certificates.new_key()
        order = client.new_order(crypto_util.make_csr(certificates.key_pem(key), [domain]))
        answers = []  # the files that answer the challenges, removed after the order
        shared: list[str] = []  # the same answers in the fleet's store
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
                    self._share_challenge(f"tls-alpn-01/{name}", validation, shared)
                else:
                    token = challenge.chall.encode("token")
                    path = self.cache.challenge(token)
                    certificates.write_private(path, validation.encode(), mode=0o644)
                    answers.append(path)
                    self._share_challenge(f"http-01/{token}", validation.encode(), shared)
                responses.append((challenge, response))
            if records:
                # The CA asks once: it must find the record on its first look.
                dns01.wait_until_visible([(name, value) for _, name, value in records],
                                         [self.config.dns_server] if self.config.dns_server else None,
                                         self.config.dns_propagation_timeout, self.sleep, self.alive)
            if any(name.startswith("tls-alpn-01/") for name in shared):
                # Looked for in the files alone (no store round trip per handshake):
                # the other instances copy them within a poll.
                self.sleep(2 * acme_store.MIRROR_POLL)
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
            for name in shared:
                assert self.store is not None  # answers are shared only through a store
                try:
                    self.store.remove_challenge(name)
                except Exception as e:  # noqa: BLE001 - the store expires them
                    log.warning("acme: %s: could not remove a challenge answer from %s: %s", domain,
                                self.store.where, e)
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

    def _share_challenge(self, name: str, value: bytes, shared: list[str]) -> None:
        """Put a challenge answer in the fleet's store, if any: the CA may ask another instance."""
        if self.store is not None:
            self.store.put_challenge(name, value)
            shared.append(name)

    def _dns_provider(self) -> dns01.Provider:
        if self.dns_provider is None:
            self.dns_provider = dns01.provider_for(self.config)
        return self.dns_provider

    def client(self):
        """The ACME client with a registered account, made again after a failure
        (the CA may have restarted, or forgotten the account)."""
        if self._client is not None:
            return self._client
        import josepy
        from acme import client as acme_client
        from acme import errors, messages
        _tls_alpn01_challenge()  # before any authorization is parsed
        key = self.account_key()
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
        self._client = client
        return client

    def account_key(self):
        path = self.cache.account_key
        if self.store is not None:
            # The fleet's one account: the stored key, else the local one (or a new one) becomes it.
            local = (certificates.key_pem(certificates.load_key(path, "account key")) if os.path.exists(path)
                     else certificates.key_pem(certificates.new_key()))
            pem = self.store.account_key(local)
            if pem != local or not os.path.exists(path):
                certificates.write_private(path, pem)
            return certificates.load_key(path, "account key")
        if os.path.exists(path):
            return certificates.load_key(path, "account key")
        key = certificates.new_key()
        certificates.write_private(path, certificates.key_pem(key))
        log.info("acme: created the account key %s", path)
        return key


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
