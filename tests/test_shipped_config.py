"""What ships in conf/: the default config does what the README says, every
example passes `rproxy check`, and the systemd unit passes systemd's own
checks."""

import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import requests
from conftest import BIN, GUNICORN, REPO, Certificates, Process, free_port, wait_for_port

CONF = REPO / "conf"
# What conf/examples/ must show, by file.
EXAMPLES = {"tls-from-files", "acme", "cache-redis", "rate-limits", "filter", "admin",
            "balancing-health-checks", "websocket", "h2c-behind-load-balancer", "behind-load-balancer",
            "hosts-and-apis"}


def localised(text: str, tmp_path) -> str:
    """An example with its machine-specific paths made real: each
    /etc/rproxy/... certificate and key pair issued here, /var/lib/rproxy
    and /var/log/rproxy under tmp_path."""
    certs = Certificates(tmp_path)
    issued: dict[str, tuple[str, str]] = {}
    for path in sorted(set(re.findall(r"/etc/rproxy/\S+\.(?:pem|key)", text))):
        stem = path.rsplit(".", 1)[0]
        if stem not in issued:
            issued[stem] = certs.issue(os.path.basename(stem), "example.com")
        text = text.replace(path, issued[stem][0] if path.endswith(".pem") else issued[stem][1])
    for folder in ("/var/lib/rproxy", "/var/log/rproxy", "/run/rproxy"):
        text = text.replace(folder, str(tmp_path / folder.strip("/").replace("/", "-")))
    return text


def test_examples_cover_what_the_readme_promises():
    assert {p.stem for p in (CONF / "examples").glob("*.ini")} >= EXAMPLES


@pytest.mark.parametrize("example", sorted(p.name for p in (CONF / "examples").glob("*.ini")))
def test_every_example_passes_rproxy_check(example, tmp_path):
    path = tmp_path / example
    path.write_text(localised((CONF / "examples" / example).read_text(), tmp_path))
    out = subprocess.run([str(BIN / "rproxy"), "check", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert ": ok (" in out.stdout


@pytest.mark.process
def test_shipped_default_config_does_what_the_readme_says(tmp_path):
    """conf/rproxy.ini, with its ports moved to free ones, in front of the
    demo upstream: `curl -i localhost:8080/anything` shows the echo with
    the forwarding headers, security headers and a Server of its own; the
    admin listener answers /healthz and /readyz."""
    port, admin, demo_port = free_port(), free_port(), free_port()
    text = (CONF / "rproxy.ini").read_text()
    for shipped, moved in [("127.0.0.1:8080", port), ("127.0.0.1:9180", admin), ("127.0.0.1:8081", demo_port)]:
        assert shipped in text
        text = text.replace(shipped, f"127.0.0.1:{moved}")
    ini = tmp_path / "rproxy.ini"
    ini.write_text(text)
    demo = Process([sys.executable, str(REPO / "scripts" / "demo_upstream.py"), "--port", str(demo_port)],
                   tmp_path / "demo.log")
    env = dict(os.environ, RPROXY_CONFIG=str(ini))
    proxy = Process([GUNICORN, "-c", "gunicorn.conf.py", "--no-control-socket"], tmp_path / "proxy.log", env=env)
    try:
        wait_for_port(demo_port, demo.proc)
        wait_for_port(port, proxy.proc)
        wait_for_port(admin, proxy.proc)
        r = requests.get(f"http://127.0.0.1:{port}/anything", timeout=10)
        assert r.status_code == 200
        seen = r.json()["headers"]
        for name in ("X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "X-Real-Ip", "X-Request-Id"):
            assert name in seen, (name, seen)
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["X-Frame-Options"] == "SAMEORIGIN"
        assert r.headers["Referrer-Policy"] == "strict-origin-when-cross-origin"
        assert "Strict-Transport-Security" not in r.headers  # plain HTTP: HSTS only over HTTPS
        assert r.headers["Server"] == "rproxy"
        assert r.headers["X-Request-ID"] == seen["X-Request-Id"]
        # The proxy's own answers carry them too.
        bad = requests.get(f"http://127.0.0.1:{port}/a/%2e%2e%2f", timeout=10)
        assert bad.status_code == 400 and bad.headers["X-Content-Type-Options"] == "nosniff"
        assert requests.get(f"http://127.0.0.1:{admin}/healthz", timeout=10).status_code == 200
        ready = requests.get(f"http://127.0.0.1:{admin}/readyz", timeout=10)
        assert ready.status_code == 200 and ready.json()["ready"] is True
        assert requests.get(f"http://127.0.0.1:{admin}/status", timeout=10).status_code == 200
    finally:
        proxy.stop()
        demo.stop()
    assert "Traceback" not in proxy.log()


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze is not installed (Debian package systemd): "
                    "python3 scripts/dev.py test installs it")
    return path


@pytest.fixture
def unit(tmp_path):
    """conf/rproxy.service with the package installed where this test runs
    (the unit's /opt/rproxy virtualenv is this one), so that systemd finds
    the programs it starts."""
    path = tmp_path / "rproxy.service"
    text = (CONF / "rproxy.service").read_text()
    assert "/opt/rproxy/bin/" in text
    path.write_text(text.replace("/opt/rproxy/bin/", f"{BIN}/"))
    return path


def test_systemd_unit_passes_systemd_analyze_verify(unit):
    out = subprocess.run([systemd_analyze(), "verify", "--man=no", str(unit)],
                         capture_output=True, text=True, timeout=60)
    # Unknown keys and bad values are only warnings to systemd: none allowed here.
    assert out.returncode == 0 and out.stdout + out.stderr == "", out.stdout + out.stderr
    text = unit.read_text()
    for line in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "NoNewPrivileges=yes",
                 "ProtectSystem=strict", "Environment=RPROXY_CONFIG=/etc/rproxy/rproxy.ini"):
        assert f"\n{line}\n" in text, line
    assert re.search(r"\nExecStart=\S+/gunicorn -c python:rproxy\.gunicorn_conf\b", text)


def test_systemd_unit_sandbox_exposure_is_low(unit):
    out = subprocess.run([systemd_analyze(), "security", "--offline=yes", "--no-pager", str(unit)],
                         capture_output=True, text=True, timeout=60)
    score = re.search(r"Overall exposure level for \S+: ([\d.]+)", out.stdout)
    assert score, out.stdout + out.stderr
    # 0 is a sealed box, 10 unprotected; "OK" is below 2.5 (systemd's own scale).
    assert float(score.group(1)) <= 2.0, out.stdout


@pytest.mark.process
def test_gunicorn_tells_systemd_it_is_ready(tmp_path):
    """Type=notify: the master sends READY=1 once it listens."""
    notify = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.settimeout(30)
    port = free_port()
    ini = tmp_path / "rproxy.ini"
    ini.write_text(f"[server]\nbind = 127.0.0.1:{port}\n[upstream:app]\nservers = 127.0.0.1:1\n"
                   "[route:default]\nupstream = app\n")
    env = dict(os.environ, RPROXY_CONFIG=str(ini), NOTIFY_SOCKET=str(notify))
    proxy = Process([GUNICORN, "-c", "gunicorn.conf.py", "--no-control-socket"], tmp_path / "proxy.log", env=env)
    try:
        message = listener.recv(4096).decode()
        assert "READY=1" in message.split("\n")
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # listening by then
    finally:
        proxy.stop()
        listener.close()
