"""A bad config names its file, section and key, and says what is wrong."""

import textwrap

import pytest

from rproxy import config
from rproxy.config import ConfigError

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
    (ROUTE + "[acme]\ndomains = *.example.com\n", "acme", "domains", "a wildcard cannot be validated"),
    (ROUTE + "[acme]\ndomains = example.com\ncache_dir = /tmp/x\n", "acme", "domains",
     "set [server] http_bind"),
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


def test_acme_defaults_and_durations_in_days(tmp_path):
    c = load_text(tmp_path, ROUTE + f"[server]\nhttp_bind = 127.0.0.1:8081 unix:{tmp_path}/plain.sock\n"
                                    f"[acme]\ndomains = Example.com www.example.com\ncache_dir = {tmp_path}/acme\n")
    assert c.tls and c.server.http_bind == ("127.0.0.1:8081", f"unix:{tmp_path}/plain.sock")
    assert c.acme.domains == ("example.com", "www.example.com")
    assert c.acme.directory == "https://acme-v02.api.letsencrypt.org/directory"
    assert c.acme.renew_before == 30 * 86400 and c.acme.retry_interval == 120
    assert not (tmp_path / "acme").exists()  # checking a config creates nothing
