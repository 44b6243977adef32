"""ACME for a fleet: instances sharing `[acme] storage = redis://...`.

Two rproxy instances (separate gunicorn processes, separate cache dirs) share
one real redis-server; pebble validates against instance B while instance A
holds the issuance lease and places the order."""

import os
import re

import pytest
from conftest import free_port, served_certificate, single_route
from test_acme import pebble, wait_for_certificate  # noqa: F401 - the fixture, reused

from rproxy import config
from rproxy.tls import acme_cache, acme_store


def fleet_member(start_proxy, upstream, ca, redis_url, cache_dir, challenges, http_port=None):
    keys = {"domains": "a.test", "directory": ca.directory, "cache_dir": cache_dir, "ca_file": ca.ca_file,
            "retry_interval": "500ms", "challenges": challenges, "storage": redis_url}
    section = "[acme]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())
    server = {"http_bind": f"127.0.0.1:{http_port or free_port()}"}
    return start_proxy(single_route(upstream.port) + section, server=server, workers=2)


@pytest.mark.parametrize("challenge", ["http-01", "tls-alpn-01"])
def test_one_instance_orders_and_another_answers_the_ca_and_both_serve_it(start_proxy, upstream, pebble,
                                                                          redis_server, tmp_path, challenge):
    ca = pebble(free_port(), start=False)
    # A first, so that it holds the lease; then B, the only one the CA validates against.
    a = fleet_member(start_proxy, upstream, ca, redis_server.url, tmp_path / "a", challenge)
    a.wait_for_log(r"acme: worker \d+ holds the fleet's issuance lease in redis://127.0.0.1", timeout=30)
    b = fleet_member(start_proxy, upstream, ca, redis_server.url, tmp_path / "b", challenge,
                     http_port=ca.http_port)
    ca.tls_port = b.port
    ca.start()  # until now, A's attempts fail without placing an order

    trusted = ca.trusting_context()
    from_a = wait_for_certificate(a.port, "a.test", trusted)
    from_b = wait_for_certificate(b.port, "a.test", trusted)
    assert from_a.serial_number == from_b.serial_number
    # Only A ordered, once; the CA's validation reached B.
    assert len(a.log_lines(r"acme: a.test: obtained a certificate")) == 1
    assert not b.log_lines(r"obtained a certificate|holds the fleet's issuance lease|registered account")
    assert len(re.findall(r'Added order "', ca.ca.log())) == 1
    if challenge == "http-01":
        assert b.log_lines(r"GET /.well-known/acme-challenge/\S+ HTTP/1.1\" 200 .*Pebble-VA")
        assert not a.log_lines(r"acme-challenge")
    else:
        assert b.log_lines(r"tls: answered the TLS-ALPN-01 validation from 127.0.0.1")
        assert not a.log_lines(r"TLS-ALPN-01 validation")
    # The answers are gone from every cache_dir once the order is done.
    for cache in (tmp_path / "a", tmp_path / "b"):
        assert list((cache / "challenges").iterdir()) == [] and list((cache / "tls-alpn-01").iterdir()) == []

    # Redis goes away: both go on serving the certificate, and say what happened.
    redis_server.stop()
    b.wait_for_log(r"acme: storage redis://127.0.0.1:\d+/0 failed \(.*\); serving the certificates in "
                   r".* until it is back, trying again every 1s", timeout=15)
    a.wait_for_log(r"acme: cannot renew the issuance lease in redis://127.0.0.1:\d+/0 \(.*\); stopping issuance",
                   timeout=acme_store.LEASE)
    for proxy in (a, b):
        assert proxy.proc.poll() is None
        assert served_certificate(proxy.port, "a.test", trusted).serial_number == from_a.serial_number


@pytest.mark.parametrize("uri, message", [
    ("memory://", "'memory://' is not redis://host:port/db"),
    ("http://127.0.0.1:6379", "'http://127.0.0.1:6379' is not redis://host:port/db"),
    ("redis://127.0.0.1:99999/0", "'127.0.0.1:99999' is not host:port"),
    ("redis://127.0.0.1:6379/x", "'x' is not a database number"),
    ("file:///srv/acme", "for a shared directory, set cache_dir to it"),
])
def test_bad_acme_storage_is_a_config_error_naming_the_key(tmp_path, uri, message):
    ini = tmp_path / "rproxy.ini"
    ini.write_text(f"[server]\nbind = 127.0.0.1:8443\n{single_route(1)}[acme]\ndomains = a.test\n"
                   f"cache_dir = {tmp_path / 'acme'}\nstorage = {uri}\n")
    with pytest.raises(config.ConfigError) as info:
        config.load(str(ini))
    text = str(info.value)
    assert str(ini) in text and "[acme]" in text and "storage" in text and message in text, text


def test_acme_storage_accepts_redis_uris(tmp_path):
    ini = tmp_path / "rproxy.ini"
    ini.write_text(f"[server]\nbind = 127.0.0.1:8443\n{single_route(1)}[acme]\ndomains = a.test\n"
                   f"cache_dir = {tmp_path / 'acme'}\nstorage = redis+sentinel://127.0.0.1:26379/mymaster\n")
    assert config.load(str(ini)).acme.storage == "redis+sentinel://127.0.0.1:26379/mymaster"


def store_pair(redis_url, tmp_path):
    cache = acme_cache.CacheDir(config.AcmeConfig(domains=("a.test",), cache_dir=str(tmp_path / "acme")))
    cache.prepare()
    return (acme_store.RedisStore(redis_url, cache.issuer_name), acme_store.RedisStore(redis_url, cache.issuer_name),
            cache)


def test_the_issuance_lease_is_held_by_one_instance_and_released_only_by_it(redis_server, tmp_path):
    first, second, _ = store_pair(redis_server.url, tmp_path)
    assert first.acquire() and not second.acquire()
    second.release()  # not its lease: nothing happens
    assert not second.renew() and first.renew() and not second.acquire()
    first.release()
    assert second.acquire() and not first.renew()


def test_mirror_copies_certificates_and_challenges_but_never_an_older_or_broken_certificate(redis_server, tmp_path):
    from rproxy.tls import certificates
    store, _, cache = store_pair(redis_server.url, tmp_path)
    mirror = acme_store.Mirror(store, cache, ("a.test",))
    made = tmp_path / "made.pem"
    certificates.write_placeholder(str(made), ("a.test",), days=30)
    younger = made.read_bytes()
    store.put_certificate("a.test", younger)
    store.put_challenge("http-01/tok-1", b"tok-1.thumb")
    store.put_challenge("tls-alpn-01/../escape", b"x")  # a name that would leave the directory
    assert mirror.sync() == ["a.test"]
    assert open(cache.certificate("a.test"), "rb").read() == younger
    assert open(cache.challenge("tok-1"), "rb").read() == b"tok-1.thumb"
    assert not (tmp_path / "acme" / "escape.pem").exists()
    assert mirror.sync() == []  # nothing changed: one GET

    made.unlink()
    certificates.write_placeholder(str(made), ("a.test",), days=10)
    store.put_certificate("a.test", made.read_bytes())  # older than the one here
    store.put_certificate("a.test", made.read_bytes())
    store.remove_challenge("http-01/tok-1")
    assert mirror.sync() == [] and mirror.newer_here == {"a.test"}
    assert open(cache.certificate("a.test"), "rb").read() == younger
    assert not os.path.exists(cache.challenge("tok-1"))
    store.put_certificate("a.test", b"-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
    assert mirror.sync() == [] and open(cache.certificate("a.test"), "rb").read() == younger


def test_http01_answer_not_yet_mirrored_comes_from_redis_and_none_while_redis_is_down(redis_server, tmp_path,
                                                                                     caplog):
    from rproxy.storage_guard import StorageGuard
    store, _, cache = store_pair(redis_server.url, tmp_path)
    guard = StorageGuard("acme", redis_server.url, retry=5.0, while_down="answers from cache_dir alone")
    store.put_challenge("http-01/tok-2", b"tok-2.thumb")
    assert acme_cache.challenge_answer(cache, "/.well-known/acme-challenge/tok-2", store, guard) == b"tok-2.thumb"
    assert acme_cache.challenge_answer(cache, "/.well-known/acme-challenge/other", store, guard) is None
    redis_server.stop()
    for _ in range(3):  # one failure, then Redis is left alone: no wait, one log line
        assert acme_cache.challenge_answer(cache, "/.well-known/acme-challenge/tok-2", store, guard) is None
    assert len([r for r in caplog.records if "storage redis://127.0.0.1" in r.getMessage()]) == 1
