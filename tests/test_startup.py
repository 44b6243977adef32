"""Starting rproxy the documented ways, and refusing to start on a bad config."""

import os
import re
import subprocess
import sys

import requests
from conftest import BIN, GUNICORN, REPO, Process, free_port, single_route, wait_for_port

RPROXY = str(BIN / "rproxy")


def run(args, env_extra=None, cwd=REPO, timeout=60):
    env = {k: v for k, v in os.environ.items() if k != "RPROXY_CONFIG"}
    env.update(env_extra or {})
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def write_ini(tmp_path, text, name="rproxy.ini"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def printed_config(out) -> dict:
    assert out.returncode == 0, out.stderr
    pairs = (line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def test_gunicorn_settings_come_from_the_ini(tmp_path):
    ini = write_ini(tmp_path, "[server]\nbind = 127.0.0.1:18081 127.0.0.1:18082\nworkers = 3\n"
                              "worker_connections = 77\nkeepalive = 7s\ngraceful_timeout = 11s\n"
                              + single_route(1))
    config = printed_config(run([GUNICORN, "-c", "gunicorn.conf.py", "--print-config"],
                                {"RPROXY_CONFIG": ini}))
    assert config["bind"] == "['127.0.0.1:18081', '127.0.0.1:18082']"
    expected = {"workers": "3", "worker_connections": "77", "keepalive": "7", "graceful_timeout": "11",
                "worker_class": "rproxy.server.worker.Worker", "wsgi_app": "rproxy.app:application"}
    assert {k: config[k] for k in expected} == expected


def test_gunicorn_flags_override_the_ini(tmp_path):
    ini = write_ini(tmp_path, "[server]\nworkers = 3\n" + single_route(1))
    config = printed_config(run([GUNICORN, "-c", "gunicorn.conf.py", "--print-config", "--workers", "2",
                                 "-b", "127.0.0.1:18099"], {"RPROXY_CONFIG": ini}))
    assert config["workers"] == "2" and config["bind"] == "['127.0.0.1:18099']"


def test_default_config_is_conf_rproxy_ini():
    config = printed_config(run([GUNICORN, "-c", "gunicorn.conf.py", "--print-config"]))
    assert config["bind"] == "['127.0.0.1:8080', '127.0.0.1:9180']"  # the proxy, the admin listener


def test_bad_config_stops_gunicorn_with_the_check_message(tmp_path):
    ini = write_ini(tmp_path, "[upstream:app]\nservers = 127.0.0.1:1\nconect_timeout = 1s\n"
                              "[route:r]\nupstream = app\n")
    started = run([GUNICORN, "-c", "gunicorn.conf.py", "--no-control-socket",
                   "-b", f"127.0.0.1:{free_port()}"], {"RPROXY_CONFIG": ini}, timeout=30)
    checked = run([RPROXY, "check", ini])
    assert started.returncode != 0 and checked.returncode != 0
    message = f"{ini}: [upstream:app] conect_timeout: unknown key; did you mean 'connect_timeout'?"
    assert message in started.stderr
    assert message in checked.stderr
    assert "Traceback" not in started.stderr + started.stdout


def test_check_accepts_a_good_config(tmp_path):
    ini = write_ini(tmp_path, single_route(9001))
    out = run([RPROXY, "check", ini])
    assert out.returncode == 0 and "ok (1 routes, 1 upstreams, 1 servers)" in out.stdout
    assert run([RPROXY, "check", str(REPO / "conf" / "rproxy.ini")]).returncode == 0
    # conf/examples/: test_shipped_config.py, with their certificate paths made real.


def test_several_workers_all_serve(start_proxy, upstream):
    proxy = start_proxy(single_route(upstream.port), workers=2)
    assert len(proxy.workers()) == 2
    for _ in range(20):
        assert requests.get(proxy.url + "/echo", timeout=10).status_code == 200


def paste_ini(tmp_path, upstream_port):
    return write_ini(tmp_path, single_route(upstream_port) + "\n[app:main]\nuse = egg:rproxy\n",
                     name="paste.ini")


def test_bare_paste_elsewhere_refuses_with_the_command_that_works(tmp_path, upstream):
    ini = paste_ini(tmp_path, upstream.port)
    port = free_port()
    # From a directory holding only the INI: gunicorn reads no rproxy settings.
    for worker in ([], ["-k", "gevent"]):
        out = run([GUNICORN, "--paste", ini, "-b", f"127.0.0.1:{port}", "--no-control-socket", *worker],
                  cwd=tmp_path, timeout=60)
        assert out.returncode != 0
        refusal = [line for line in out.stderr.splitlines() if line.startswith("rproxy:")]
        assert refusal == [f"rproxy: gunicorn ran without rproxy's settings (worker, bind, limits from "
                           f"[server]); start it with: gunicorn -c python:rproxy.gunicorn_conf --paste "
                           f"{ini} -b 127.0.0.1:{port} --no-control-socket"]
        assert "Traceback" not in out.stderr + out.stdout


def test_paste_with_the_settings_module_serves_the_ini_from_anywhere(tmp_path, upstream):
    ini = paste_ini(tmp_path, upstream.port)
    port = free_port()
    with open(ini, "a") as f:
        f.write(f"\n[server]\nbind = 127.0.0.1:{port}\n")
    env = {k: v for k, v in os.environ.items() if k != "RPROXY_CONFIG"}
    proc = Process([GUNICORN, "-c", "python:rproxy.gunicorn_conf", "--paste", ini, "--no-control-socket"],
                   tmp_path / "paste.log", env=env, cwd=tmp_path)
    try:
        wait_for_port(port, proc.proc)
        r = requests.get(f"http://127.0.0.1:{port}/echo", timeout=15)
        assert r.status_code == 200 and r.json()["request_line"] == "GET /echo HTTP/1.1"
        assert "Using worker: rproxy.server.worker.Worker" in proc.log()
    finally:
        proc.stop()


# What pserve and other PasteDeploy launchers do with an INI.
PASTE_LAUNCHER = """
import sys
from paste.deploy import loadapp, loadserver
uri = "config:" + sys.argv[1]
app = loadapp(uri, relative_to=".")
loadserver(uri, relative_to=".")(app)
"""


def test_paste_server_runner_serves_with_rproxy_settings(tmp_path, upstream):
    port = free_port()
    ini = write_ini(tmp_path, f"[server]\nbind = 127.0.0.1:{free_port()}\n" + single_route(upstream.port)
                    + f"\n[app:main]\nuse = egg:rproxy\n\n[server:main]\nuse = egg:rproxy\n"
                      f"host = 127.0.0.1\nport = {port}\n", name="legacy.ini")
    env = {k: v for k, v in os.environ.items() if k != "RPROXY_CONFIG"}
    proc = Process([sys.executable, "-c", PASTE_LAUNCHER, ini], tmp_path / "pserve.log", env=env, cwd=tmp_path)
    try:
        wait_for_port(port, proc.proc)
        r = requests.get(f"http://127.0.0.1:{port}/echo", timeout=15)
        assert r.status_code == 200
        log = proc.log()
        assert "Using worker: rproxy.server.worker.Worker" in log and "rproxy worker" in log
        # Stopped the documented way: its pidfile names the launcher itself.
        out = run([RPROXY, "stop", ini], timeout=60)
        assert out.returncode == 0, out.stderr
        assert proc.proc.wait(10) == 0
        assert "Traceback" not in proc.log() and "MonkeyPatchWarning" not in proc.log()
    finally:
        proc.stop()


def test_paste_server_runner_refuses_a_bad_config_in_one_line(tmp_path):
    ini = write_ini(tmp_path, "[upstream:app]\nservers = 127.0.0.1:1\n[route:r]\nupstream = app\n"
                              "[server]\nbind = 127.0.0.1:8x\n[app:main]\nuse = egg:rproxy\n"
                              "[server:main]\nuse = egg:rproxy\n", name="legacy.ini")
    out = run([sys.executable, "-c", PASTE_LAUNCHER, ini], cwd=tmp_path, timeout=60)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert f"rproxy: {ini}: [server] bind: '127.0.0.1:8x' is not host:port" in out.stderr


def test_paste_deployment_beside_gunicorn_conf_uses_the_paste_ini(tmp_path, upstream):
    ini = paste_ini(tmp_path, upstream.port)
    port = free_port()
    with open(ini, "a") as f:
        f.write(f"\n[server]\nbind = 127.0.0.1:{port}\n")
    proc = Process([GUNICORN, "--paste", ini, "--no-control-socket"], tmp_path / "paste2.log",
                   env={k: v for k, v in os.environ.items() if k != "RPROXY_CONFIG"})
    try:
        wait_for_port(port, proc.proc)
        r = requests.get(f"http://127.0.0.1:{port}/echo", timeout=15)
        assert r.status_code == 200
        assert "Using worker: rproxy.server.worker.Worker" in proc.log()
    finally:
        proc.stop()


def test_access_log_has_one_line_per_request_with_upstream_timing(proxy, upstream):
    requests.get(proxy.url + "/echo/logged?x=1", headers={"X-Request-ID": "log-me-1"}, timeout=10)
    requests.get(proxy.url + "/slow?delay=0.2", headers={"X-Request-ID": "log-me-2"}, timeout=10)
    first, second = proxy.wait_for_log(r"rid=log-me-", count=2)
    assert '"GET /echo/logged?x=1 HTTP/1.1" 200 ' in first
    assert f"upstream=127.0.0.1:{upstream.port}" in first and "route=default" in first
    upstream_ms = float(re.search(r"upstream_ms=([\d.]+)", second).group(1))
    total_ms = float(re.search(r" ([\d.]+)ms upstream=", second).group(1))
    assert 200 <= upstream_ms <= total_ms
    bytes_sent = int(re.search(r'" 200 (\d+) ', first).group(1))
    assert bytes_sent > 0


def test_version_from_the_command_and_the_module():
    from rproxy import __version__
    assert run([RPROXY, "--version"]).stdout.strip() == f"rproxy {__version__}"
    assert run([sys.executable, "-m", "rproxy", "--version"], cwd="/").stdout.strip() == f"rproxy {__version__}"


def test_sample_config_is_the_default_ini_and_checks_ok(tmp_path):
    out = run([RPROXY, "sample-config"], cwd=tmp_path)
    assert out.returncode == 0 and out.stdout == (REPO / "conf" / "rproxy.ini").read_text()
    sample = write_ini(tmp_path, out.stdout)
    assert run([RPROXY, "check", sample]).returncode == 0


def test_settings_module_without_a_config_says_how_to_name_one(tmp_path):
    out = run([GUNICORN, "-c", "python:rproxy.gunicorn_conf", "--no-control-socket"], cwd=tmp_path)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"rproxy: no config: {tmp_path}/conf/rproxy.ini does not exist; name yours with "
        "RPROXY_CONFIG=/path/to/rproxy.ini (`rproxy sample-config` prints a commented one to start from)")


def test_bind_typo_is_one_line_from_check_and_from_start(tmp_path):
    ini = write_ini(tmp_path, "[server]\nbind = 127.0.0.1:8x\n" + single_route(1))
    message = (f"rproxy: {ini}: [server] bind: '127.0.0.1:8x' is not host:port, [ipv6]:port, unix:/path "
               "or fd://N ('8x' is not a valid port number)")
    checked = run([RPROXY, "check", ini])
    started = run([GUNICORN, "-c", "python:rproxy.gunicorn_conf", "--no-control-socket"],
                  {"RPROXY_CONFIG": ini}, cwd=tmp_path)
    for out in (checked, started):
        assert out.returncode != 0
        assert out.stderr.strip() == message
        assert "Traceback" not in out.stdout


def test_explain_into_a_pipe_closed_early_is_quiet(tmp_path):
    ini = write_ini(tmp_path, single_route(9001))
    # `rproxy explain ... | head`, with a reader that has already left.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        explain = subprocess.run([RPROXY, "explain", ini, "http://example.com/x"], stdout=write_end,
                                 stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert explain.returncode != 0
    assert explain.stderr == ""


def test_the_master_imports_nothing_gevent_must_patch_first():
    # gunicorn's master imports the worker class and the settings module
    # before forking; a worker patches ssl with gevent when it starts, and
    # urllib3 imported before that keeps the unpatched ssl (RecursionError
    # in every HTTPS request the worker makes, ACME's too).
    code = ("import sys, rproxy.server.worker, rproxy.server.settings; "
            "print(sorted(m for m in ('urllib3', 'requests', 'acme.client') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
