"""A bad config names its file, section and key, and says what is wrong."""

import textwrap

import pytest

from rproxy import config
from rproxy.config import ConfigError, addresses

GOOD = """
[server]
bind = 127.0.0.1:8080 [::1]:8080
workers = 3
keepalive = 2500ms
trusted_proxies = 10.0.0.0/8 ::1
max_body_size = 2g

[upstream:app]
servers = 127.0.0.1:9001 http://10.0.0.5:9002 weight=3 https://api.example
connect_timeout = 500ms
read_timeout = 2m

[route:api]
host = api.example *.api.example
path = /v1/
upstream = app
strip_prefix = yes
read_timeout = 1s
"""


ROUTE = "[upstream:a]\nservers = 127.0.0.1:1\n[route:r]\nupstream = a\n"


def load_text(tmp_path, text):
    path = tmp_path / "rproxy.ini"
    path.write_text(textwrap.dedent(text))
    return config.load(str(path))


def error_for(tmp_path, text) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    return info.value


def test_good_config_parses_into_values(tmp_path):
    c = load_text(tmp_path, GOOD)
    assert c.server.bind == ("127.0.0.1:8080", "[::1]:8080")
    assert c.server.workers == 3 and c.server.keepalive == 2.5
    assert c.server.max_body_size == 2 << 30
    servers = c.upstreams["app"].servers
    assert [(s.scheme, s.host, s.port, s.weight) for s in servers] == [
        ("http", "127.0.0.1", 9001, 1), ("http", "10.0.0.5", 9002, 3), ("https", "api.example", 443, 1)]
    assert c.upstreams["app"].connect_timeout == 0.5 and c.upstreams["app"].read_timeout == 120
    route = c.routes[0]
    assert route.path == "/v1" and route.host == ("api.example", "*.api.example")
    assert route.strip_prefix and route.read_timeout == 1.0 and route.connect_timeout is None


def test_defaults_apply_when_sections_are_absent(tmp_path):
    c = load_text(tmp_path, "[upstream:a]\nservers = 127.0.0.1:1\n[route:r]\nupstream = a\n")
    assert c.server.bind == ("127.0.0.1:8080",) and c.server.max_body_size == 100 << 20
    assert c.log.access_log == "-"


@pytest.mark.parametrize("text,section,key,words", [
    ("[upstream:a]\nservers = 127.0.0.1:1\nconect_timeout = 1s\n[route:r]\nupstream = a\n",
     "upstream:a", "conect_timeout", "did you mean 'connect_timeout'"),
    ("[sever]\nbind = x\n", "sever", None, "did you mean 'server'"),
    ("[upstreams:a]\nservers = x\n", "upstreams:a", None, "did you mean 'upstream'"),
    ("[upstream:a]\nservers = 127.0.0.1:1\nread_timeout = 3x\n[route:r]\nupstream = a\n",
     "upstream:a", "read_timeout", "is not a duration"),
    ("[server]\nmax_body_size = lots\n", "server", "max_body_size", "is not a size"),
    ("[server]\nworkers = 0\n", "server", "workers", "at least 1"),
    ("[server]\ntrusted_proxies = 10.0.0.300\n", "server", "trusted_proxies", "not an IP address"),
    ("[server]\nspoofable_headers = X-Client-IP Bad:Name\n", "server", "spoofable_headers",
     "'Bad:Name' is not a header name"),
    ("[server]\nspoofable_headers = Host\n", "server", "spoofable_headers", "requests need it"),
    ("[upstream:a]\nservers = 127.0.0.1:99999\n", "upstream:a", "servers", "port must be"),
    ("[upstream:a]\nservers = weight=2\n", "upstream:a", "servers", "must follow"),
    ("[upstream:a]\n", "upstream:a", "servers", "is required"),
    ("[upstream:a]\nservers = 127.0.0.1:1\n[route:r]\nupstream = b\n", "route:r", "upstream",
     "no [upstream:b]"),
    ("[upstream:app]\nservers = 127.0.0.1:1\n[route:r]\nupstream = ap\n", "route:r", "upstream",
     "did you mean 'app'"),
    ("[upstream:a]\nservers = 127.0.0.1:1\n[route:r]\nupstream = a\nstrip_prefix = maybe\n",
     "route:r", "strip_prefix", "not yes or no"),
    ("[upstream:a]\nservers = 127.0.0.1:1\n[route:r]\nupstream = a\npath = api\n",
     "route:r", "path", "must start with /"),
    ("[upstream:a]\nservers = 127.0.0.1:1\n[route:r]\nupstream = a\n[route:s]\nupstream = a\n",
     "route:s", "path", "already routed by [route:r]"),
    ("[upstream:a]\nservers = 127.0.0.1:1\n", None, None, "no [route:NAME]"),
    ("[route]\nupstream = a\n", "route", None, "needs a name"),
    (ROUTE + "[server]\nhttp_bind = 127.0.0.1:80\n", "server", "http_bind", "needs TLS"),
    (ROUTE + "[server]\nhttps_port = 0\n", "server", "https_port", "not a port number"),
    (ROUTE + "[server]\ntls_min_version = 1.1\n", "server", "tls_min_version", "not one of: 1.2, 1.3"),
    (ROUTE + "[acme]\ncache_dir = /tmp/x\n", "acme", "domains", "is required"),
    (ROUTE + "[acme]\ndomains = *.example.com\ncache_dir = /tmp/x\n", "acme", "domains",
     "'*.example.com': a wildcard can only be validated by dns-01: add it to [acme] challenges"),
    (ROUTE + "[acme]\ndomains = *.*.example.com\n", "acme", "domains", "not a host name"),
    (ROUTE + "[acme]\ndomains = example.com\ncache_dir = /tmp/x\nchallenges = http-01\n", "acme", "challenges",
     "set [server] http_bind"),
    (ROUTE + "[acme]\ndomains = example.com\ncache_dir = /tmp/x\nchallenges = dns-01\n", "acme", "dns_provider",
     "is required: dns-01 needs it"),
    (ROUTE + "[acme]\ndomains = example.com\ncache_dir = /tmp/x\ndns_provider = rfc2136\n", "acme", "dns_provider",
     "is set, but [acme] challenges does not name dns-01"),
    (ROUTE + "[acme]\ndomains = example.com\ncache_dir = /tmp/x\nchallenges = dns-01\ndns_provider = rfc2136\n",
     "acme", "dns_server", "is required: dns_provider = rfc2136 needs it"),
    (ROUTE + "[acme]\ndomains = example.com\ncache_dir = /tmp/x\nchallenges = dns-01\ndns_provider = rfc2136\n"
             "dns_server = 127.0.0.1:53\ndns_tsig_key_name = k\n", "acme", "dns_tsig_secret",
     "is required: dns_provider = rfc2136 needs it"),
    (ROUTE + "[acme]\ndomains = example.com\ncache_dir = /tmp/x\nchallenges = dns-01\ndns_provider = exec\n",
     "acme", "dns_exec", "is required: dns_provider = exec needs it"),
    (ROUTE + "[acme]\ndomains = example.com\ndns_provider = route53\n", "acme", "dns_provider",
     "'route53' is not one of: rfc2136, exec"),
    (ROUTE + "[acme]\ndomains = example.com\ndns_server = ns1.example.com\n", "acme", "dns_server",
     "'ns1.example.com' is not an IP address with an optional port"),
    (ROUTE + "[acme]\ndomains = example.com\ndns_server = 127.0.0.1:99999\n", "acme", "dns_server",
     "the port must be 1 to 65535"),
    (ROUTE + "[acme]\ndomains = example.com\ndns_tsig_key_name = acme key\n", "acme", "dns_tsig_key_name",
     "'acme key' is not a DNS name"),
    (ROUTE + "[acme]\ndomains = example.com\ndns_tsig_secret = not*base64\n", "acme", "dns_tsig_secret",
     "is not base64"),
    (ROUTE + "[acme]\ndomains = example.com\ndns_tsig_algorithm = rot13\n", "acme", "dns_tsig_algorithm",
     "'rot13' is not one of: hmac-sha256"),
    (ROUTE + "[acme]\ndomains = example.com\ndns_exec = /nonexistent/hook\n", "acme", "dns_exec",
     "'/nonexistent/hook' is not a file"),
    (ROUTE + "[acme]\ndomains = example.com\ndns_propagation_timeout = 0s\n", "acme", "dns_propagation_timeout",
     "must be more than"),
    (ROUTE + "[acme]\ndomains = example.com\nchallenges = tls-sni-01\n", "acme", "challenges",
     "'tls-sni-01' is not one of: tls-alpn-01, http-01, dns-01"),
    (ROUTE + "[acme]\ndomains = example.com\nchallenges = http-01 HTTP-01\n", "acme", "challenges", "twice"),
    (ROUTE + "[acme]\ndomains = example.com\ndirectory = ftp://x\n", "acme", "directory", "not an http(s)://"),
    (ROUTE + "[acme]\ndomains = example.com\nrenew_before = soon\n", "acme", "renew_before",
     "not a duration"),
    (ROUTE + "[server]\nhttp_bind = 127.0.0.1:80\n[acme]\ndomains = example.com\ncache_dir = /dev/null/x\n",
     "acme", "cache_dir", "'/dev/null' is not a directory"),
    (ROUTE + "[certificate:a]\ncertfile = /dev/null\n", "certificate:a", "keyfile", "is required"),
])
def test_errors_name_section_key_and_problem(tmp_path, text, section, key, words):
    e = error_for(tmp_path, text)
    assert e.path.endswith("rproxy.ini")
    assert (e.section, e.key) == (section, key)
    assert words in str(e)
    assert str(e).startswith(str(tmp_path / "rproxy.ini"))


def test_syntax_errors_give_line_numbers(tmp_path):
    e = error_for(tmp_path, "[server]\nworkers = 2\nworkers = 3\n")
    assert "line 3" in str(e) and "set twice" in str(e)
    e = error_for(tmp_path, "bind = 1\n")
    assert "line 1" in str(e)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        config.load(str(tmp_path / "nope.ini"))
    assert "cannot read" in str(info.value)


def test_paste_sections_are_left_to_paste(tmp_path):
    c = load_text(tmp_path, "[DEFAULT]\ndebug = true\n[app:main]\nuse = egg:rproxy\n"
                            "[upstream:a]\nservers = 127.0.0.1:1\n[route:r]\nupstream = a\n")
    assert c.routes[0].upstream == "a"


def test_readme_reference_matches_the_declarations():
    readme = (config.__file__.rsplit("/rproxy/", 1)[0] + "/README.md")
    text = open(readme).read()
    block = text.split("<!-- reference:start -->\n", 1)[1].split("<!-- reference:end -->", 1)[0]
    assert block.strip() == config.reference().strip(), "run `rproxy reference` into README.md"


def test_acme_dns01_with_rfc2136_and_a_secret_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TSIG_SECRET", "c2VjcmV0LXNlY3JldC1zZWNyZXQ=")
    c = load_text(tmp_path, "[upstream:a]\nservers = 127.0.0.1:1\n[route:r]\nupstream = a\n"
                            f"[acme]\ndomains = *.example.com example.com\ncache_dir = {tmp_path}/acme\n"
                            "challenges = dns-01\ndns_provider = rfc2136\ndns_server = 192.0.2.1\n"
                            "dns_tsig_key_name = rproxy_acme.\ndns_tsig_secret = ${TSIG_SECRET}\n")
    assert c.acme.domains == ("*.example.com", "example.com")
    assert c.acme.dns_server == ("192.0.2.1", 53) and c.acme.dns_tsig_key_name == "rproxy_acme"
    assert c.acme.dns_tsig_secret == "c2VjcmV0LXNlY3JldC1zZWNyZXQ="
    assert c.acme.dns_tsig_algorithm == "hmac-sha256" and c.acme.dns_propagation_timeout == 120


def test_acme_dns_server_takes_ipv6_and_a_port():
    assert addresses.ip_port("[2001:db8::1]:5353") == ("2001:db8::1", 5353)
    assert addresses.ip_port("2001:db8::1") == ("2001:db8::1", 53)
    assert addresses.ip_port(" 127.0.0.1:5353 ") == ("127.0.0.1", 5353)


def test_acme_defaults_and_durations_in_days(tmp_path):
    c = load_text(tmp_path, ROUTE + f"[server]\nhttp_bind = 127.0.0.1:8081 unix:{tmp_path}/plain.sock\n"
                                    f"[acme]\ndomains = Example.com www.example.com\ncache_dir = {tmp_path}/acme\n")
    assert c.tls and c.server.http_bind == ("127.0.0.1:8081", f"unix:{tmp_path}/plain.sock")
    assert c.acme.domains == ("example.com", "www.example.com")
    assert c.acme.directory == "https://acme-v02.api.letsencrypt.org/directory"
    assert c.acme.renew_before == 30 * 86400 and c.acme.retry_interval == 120
    assert not (tmp_path / "acme").exists()  # checking a config creates nothing


def test_environment_values_fill_in_and_defaults_apply(tmp_path, monkeypatch):
    monkeypatch.setenv("RPROXY_TEST_PORT", "9009")
    monkeypatch.setenv("RPROXY_TEST_EMPTY", "")
    monkeypatch.delenv("RPROXY_TEST_UNSET", raising=False)
    c = load_text(tmp_path, "[upstream:a]\nservers = 127.0.0.1:${RPROXY_TEST_PORT}\n"
                            "read_timeout = ${RPROXY_TEST_UNSET:-7s}\nconnect_timeout = ${RPROXY_TEST_EMPTY:-2s}\n"
                            "[route:r]\nupstream = a\nhost_header = pa$$word$x\n")
    assert c.upstreams["a"].servers[0].port == 9009
    assert c.upstreams["a"].read_timeout == 7 and c.upstreams["a"].connect_timeout == 2
    # $$ is a literal $; a $ not followed by { stays as written.
    assert c.routes[0].host_header == "pa$word$x"


def test_missing_environment_value_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("REDIS_PASSWORD", raising=False)
    e = error_for(tmp_path, ROUTE + "[rate_limit]\nlimit = 1/second\n"
                                   "storage = redis://:${REDIS_PASSWORD}@127.0.0.1:6379/0\n")
    assert (e.section, e.key) == ("rate_limit", "storage")
    assert str(e).endswith("[rate_limit] storage: ${REDIS_PASSWORD} is not set in the environment "
                           "(set it, or give a default: ${REDIS_PASSWORD:-...})")
    e = error_for(tmp_path, ROUTE + "[server]\nworkers = ${1}\n")
    assert (e.section, e.key) == ("server", "workers") and "write $$ for a literal $" in e.problem


def test_a_secret_from_the_environment_is_not_echoed_in_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("RPROXY_TEST_SECRET", "hunter2-secret")
    for text in ("[cache]\nstorage = mongo://${RPROXY_TEST_SECRET}\n",
                 "[upstream:b]\nservers = 127.0.0.1:1 ${RPROXY_TEST_SECRET}:x\n"):
        e = error_for(tmp_path, ROUTE + text)
        assert "hunter2" not in str(e) and "${RPROXY_TEST_SECRET}" in str(e)


@pytest.mark.parametrize("bind, problem", [
    ("127.0.0.1:8x", "'127.0.0.1:8x' is not host:port, [ipv6]:port, unix:/path or fd://N "
                     "('8x' is not a valid port number)"),
    ("127.0.0.1:70000", "'127.0.0.1:70000': the port must be 0 to 65535"),
    ("fd://x", "'fd://x' is not host:port"),
    ("unix:", "'unix:': a unix: address needs a path"),
    ("", "names no address to listen on"),
])
def test_bad_bind_addresses_are_config_errors(tmp_path, bind, problem):
    e = error_for(tmp_path, ROUTE + f"[server]\nbind = {bind}\n")
    assert (e.section, e.key) == ("server", "bind") and problem in e.problem


def test_far_too_long_durations_are_config_errors(tmp_path):
    e = error_for(tmp_path, ROUTE + "[server]\nkeepalive = " + "9" * 400 + "\n")
    assert (e.section, e.key) == ("server", "keepalive") and "too long" in e.problem


# --- any INI: a config or one precise message, never a traceback ---------------------

from dataclasses import fields as _fields  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st

from rproxy import instance  # noqa: E402
from rproxy.server import settings as server_settings

_KINDS = {**config.SINGLE_SECTIONS, **config.NAMED_SECTIONS, **config.MIDDLEWARE}
_SECTIONS = st.one_of(
    st.sampled_from([kind if kind in config.SINGLE_SECTIONS else f"{kind}:{name}"
                     for kind in _KINDS for name in ("a", "b")] + [*config.MIDDLEWARE, "acme", "route:", "x:y",
                                                                  "server:main", "DEFAULT", "  ", "Server"]),
    st.text(st.characters(blacklist_characters="[]\r\n"), min_size=1, max_size=10))
_ODD = [
    "127.0.0.1:8x", "127.0.0.1:70000", ":80", "[::1]:0", "unix:", "unix:/tmp/x.sock", "fd://3", "fd://x",
    "tcp://127.0.0.1:1", "${RPROXY_FUZZ_SET}", "${RPROXY_FUZZ_UNSET}", "${RPROXY_FUZZ_UNSET:-3s}", "${", "${}",
    "$${X}", "${A:-${B}}", "9" * 400, "1e999", "-0", "0x10", "１２", "1_000", "nan", "inf", "yes no", "%(here)s",
    "off", "", "a" * 300, "127.0.0.1:1 weight=99999999999999999999", "http://[::1", "https://:0", "\x00",
    "/dev/null", "/nonexistent/file", "header:", "10/minute;;", "memory://", "redis://", "200-100", "GET",
]
_ODD_VALUES = st.sampled_from(_ODD)
_VALUES = st.one_of(_ODD_VALUES, st.text(st.characters(blacklist_characters="\r\n"), max_size=30))


def _valid_value(kind, key) -> str:
    field = {f.name: f for f in _fields(kind)}[key]
    raw = field.metadata.get("raw")
    return raw if raw else {"servers": "127.0.0.1:1", "upstream": "app", "domains": "example.com",
                            "cache_dir": "/tmp", "certfile": "/dev/null", "keyfile": "/dev/null"}.get(key, "")


@st.composite
def _ini(draw) -> str:
    """Mostly a valid config with one or two values made odd, so that the
    checks after each value's own parser are reached too; now and then
    anything at all."""
    body = {"upstream:app": {"servers": "127.0.0.1:1"}, "route:r": {"upstream": "app"}} \
        if draw(st.integers(0, 4)) else {}
    for section in draw(st.lists(_SECTIONS, unique=True, max_size=4)):
        kind = _KINDS.get(section.split(":", 1)[0].strip())
        known = [f.name for f in _fields(kind) if "parse" in f.metadata] if kind else []
        keys = draw(st.lists(st.sampled_from(known) if known and draw(st.integers(0, 5)) else
                             st.text(st.characters(blacklist_characters="=:[]\r\n;#"), min_size=1, max_size=8),
                             unique=True, max_size=5))
        pairs = body.setdefault(section, {})
        for key in keys:
            odd = not known or key not in known or draw(st.integers(0, 2)) == 0
            pairs[key.strip() or "k"] = draw(_VALUES) if odd else _valid_value(kind, key)
    lines = []
    for section, pairs in body.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {value}" for key, value in pairs.items()]
    return "\n".join(lines) + "\n"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(text=_ini())
def test_any_ini_gives_a_config_that_starts_or_names_file_section_key(tmp_path, monkeypatch, text):
    monkeypatch.setenv("RPROXY_FUZZ_SET", "127.0.0.1:9")
    monkeypatch.delenv("RPROXY_FUZZ_UNSET", raising=False)
    path = tmp_path / "fuzz.ini"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _assert_precise(path, lambda: config.load(str(path)))


def _assert_precise(path, load):
    try:
        loaded = load()
    except ConfigError as e:
        message = str(e)
        assert message.startswith(f"{path}: ") and e.problem and message.endswith(e.problem)
        if e.section:
            assert f"[{e.section}]" in message
        if e.key:
            assert e.section and f"[{e.section}] {e.key}: " in message
        return
    # What start-up does with it next must not fail either.
    assert server_settings.to_gunicorn(loaded)["bind"] and instance.pidfile(loaded)


def test_every_key_with_every_odd_value_names_file_section_key(tmp_path, monkeypatch):
    """Each declared key of each section, set to each odd value on top of a
    valid config: the checks after a value's own parser are reached too."""
    monkeypatch.setenv("RPROXY_FUZZ_SET", "127.0.0.1:9")
    monkeypatch.delenv("RPROXY_FUZZ_UNSET", raising=False)
    path = tmp_path / "sweep.ini"
    base = "[upstream:app]\nservers = 127.0.0.1:1\n[route:r]\nupstream = app\n"
    tried = 0
    for kind, cls in _KINDS.items():
        section = {"upstream": "upstream:app", "route": "route:r", "certificate": "certificate:c"}.get(kind, kind)
        for field in _fields(cls):
            if "parse" not in field.metadata:
                continue
            for value in _ODD + ["${RPROXY_FUZZ_SET}x", "\u00e9\u00e9", "1/second"]:
                sections = {"upstream:app": {"servers": "127.0.0.1:1"}, "route:r": {"upstream": "app"}}
                sections.setdefault(section, {})[field.name] = value
                text = "".join(f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in pairs.items())
                               for name, pairs in sections.items())
                path.write_text(text, encoding="utf-8", errors="surrogatepass")
                _assert_precise(path, lambda: config.load(str(path)))
                tried += 1
    assert tried > 3000


def test_check_prints_one_line_for_odd_files(tmp_path):
    import subprocess

    from conftest import BIN
    cases = {"binary.ini": b"\xff\xfe[server]\x00\n", "dup.ini": b"[server]\n[server]\n",
             "nosection.ini": b"bind = 1\n", "bind.ini": b"[server]\nbind = 127.0.0.1:8x\n",
             "env.ini": b"[upstream:a]\nservers = ${RPROXY_FUZZ_UNSET}\n", "dir.ini": None}
    for name, content in cases.items():
        path = tmp_path / name
        if content is None:
            path.mkdir()
        else:
            path.write_bytes(content)
        out = subprocess.run([str(BIN / "rproxy"), "check", str(path)], capture_output=True, text=True,
                             timeout=60, env={k: v for k, v in __import__("os").environ.items()
                                              if k != "RPROXY_FUZZ_UNSET"})
        assert out.returncode == 1, (name, out.stdout)
        assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith(f"rproxy: {path}: "), out.stderr
