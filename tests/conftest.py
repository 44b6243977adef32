"""Fixtures that run the real thing: upstream servers and rproxy under
gunicorn, each its own process on a free loopback port, stopped by pid."""

from __future__ import annotations

import http.client
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import psutil
import pytest
import requests
from cryptography import x509

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
GUNICORN = str(BIN / "gunicorn")


# Ports for the tests' servers come from below the kernel's ephemeral range:
# every outgoing connection (a test's client, a proxy's upstream connection,
# in any process) takes its local port from that range, and could take a
# port picked there in the moment before its server binds it. Under
# pytest-xdist each worker walks its own share (port % workers), so two
# workers never pick the same port, nor does one start a server on a port
# another's test keeps as a dead address; within a worker the walk hands
# out no port twice until it wraps, and it starts at a random place, so
# that two runs on one machine seldom meet.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_SHARE = int(_WORKER.removeprefix("gw") or 0) % _WORKERS


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_PORTS_LOW = 10000
_PORTS = range(_PORTS_LOW + _SHARE, max(_ephemeral_low(), _PORTS_LOW + 1024), _WORKERS)
_next_port = random.randrange(len(_PORTS))


def free_port() -> int:
    global _next_port
    for _ in range(len(_PORTS)):
        port = _PORTS[_next_port % len(_PORTS)]
        _next_port += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # in use, or still in TIME_WAIT
                continue
        return port
    raise RuntimeError(f"no free port in worker {_WORKER}'s share of {_PORTS}")


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


class Process:
    """A child process with its output in a file, stopped with its children."""

    def __init__(self, args, log_path: Path, env=None, cwd=REPO):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, cwd=cwd, start_new_session=True)
        self.pid = self.proc.pid

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, sig=signal.SIGTERM, timeout: float = 10.0) -> None:
        kids = self.children()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for kid in kids:
            try:
                kid.kill()
            except psutil.NoSuchProcess:
                pass
        self._log.close()


class Upstream(Process):
    """tests/upstream.py; with `tls` (--certfile/--keyfile/--client-ca ...) it speaks HTTPS."""

    def __init__(self, tmp_dir: Path, port: int | None = None, tls: dict[str, str] | None = None):
        self.port = port or free_port()
        tls_args = [arg for key, value in (tls or {}).items() for arg in (f"--{key}", value)]
        super().__init__([sys.executable, str(REPO / "tests" / "upstream.py"), "--port", str(self.port),
                          *tls_args], tmp_dir / f"upstream-{self.port}.log")
        wait_for_port(self.port, self.proc)
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"

    def stats(self) -> dict:
        return self._control("/_stats").json()

    def reset(self) -> None:
        self._control("/_reset")

    def _control(self, path: str) -> requests.Response:
        # The tests' own channel: no need to verify a TLS upstream here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return requests.get(self.url + path, timeout=5, verify=False)


class Proxy(Process):
    def __init__(self, tmp_dir: Path, ini: str, server: dict | None = None, workers: int = 1,
                 args=(), env=None, control_socket: str | None = None):
        self.port = free_port()
        server_keys = {"bind": f"127.0.0.1:{self.port}", "workers": str(workers)}
        server_keys.update(server or {})
        self.head = "[server]\n" + "".join(f"{k} = {v}\n" for k, v in server_keys.items())
        self.head += "\n[log]\nlevel = debug\n\n"
        self.ini_path = tmp_dir / f"rproxy-{self.port}.ini"
        self.rewrite(ini)
        full_env = dict(os.environ, RPROXY_CONFIG=str(self.ini_path), **(env or {}))
        # Each gunicorn gets its own control socket, or none.
        control = ["--control-socket", control_socket] if control_socket else ["--no-control-socket"]
        super().__init__([GUNICORN, "-c", "gunicorn.conf.py", *control, *args],
                         tmp_dir / f"proxy-{self.port}.log", env=full_env)
        self.url = f"http://127.0.0.1:{self.port}"
        try:
            wait_for_port(self.port, self.proc)
        except RuntimeError as e:
            raise RuntimeError(f"{e}:\n{self.log()}") from None
        self.wait_for_workers(workers)

    def rewrite(self, ini: str) -> None:
        """Replace the INI's routes and upstreams, keeping [server] and [log]."""
        self.ini_path.write_text(self.head + textwrap.dedent(ini))

    def wait_for_workers(self, count: int, timeout: float = 15.0) -> list[psutil.Process]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # Ready, not just forked: its signal handlers are in place too.
            booted = len(re.findall(r"rproxy worker \d+ ready", self.log()))
            kids = self.children()
            if booted >= count and len(kids) >= count:
                return kids
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise TimeoutError(f"{count} workers did not boot:\n{self.log()}")

    def workers(self) -> list[psutil.Process]:
        return self.children()

    def log_lines(self, pattern: str) -> list[str]:
        return [line for line in self.log().splitlines() if re.search(pattern, line)]

    def wait_for_log(self, pattern: str, count: int = 1, timeout: float = 10.0) -> list[str]:
        """The log lines matching `pattern`, once there are `count` of them
        (an access line is written after the response has gone out)."""
        deadline = time.monotonic() + timeout
        while len(found := self.log_lines(pattern)) < count:
            assert time.monotonic() < deadline, f"{count} x {pattern!r} not logged:\n{self.log()[-5000:]}"
            time.sleep(0.05)
        return found


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("procs")


@pytest.fixture(scope="session")
def upstream(session_tmp):
    server = Upstream(session_tmp)
    yield server
    server.stop()


class Started(list):
    """What a fixture started, to stop at its end: `start` makes one with
    `make` and remembers it."""

    def __init__(self, make):
        super().__init__()
        self.make = make

    def start(self, *args, **kwargs):
        process = self.make(*args, **kwargs)
        self.append(process)
        return process

    def stop_all(self) -> None:
        for process in self:
            process.stop()


@pytest.fixture
def start_upstream(tmp_path):
    started = Started(lambda port=None, tls=None: Upstream(tmp_path, port, tls))
    yield started.start
    started.stop_all()


# gunicorn 27 stops its control server around every fork; on Python 3.11 a
# control client still connected then (gunicornc right after `reload`) leaves
# asyncio's "Exception in callback ... CancelledError" from gunicorn/ctl/server.py
# in the log (asyncio asks the cancelled handler task for its exception;
# Python 3.12 checks first). gunicorn's, not rproxy's: only that block is let pass.
_GUNICORN_CTL_CANCELLED = re.compile(r"Exception in callback StreamReaderProtocol\.connection_made\.<locals>\.callback"
                                     r".*?\nasyncio\.exceptions\.CancelledError\n", re.S)


def own_log(log: str) -> str:
    """The proxy's log without the one traceback gunicorn itself may leave."""
    return _GUNICORN_CTL_CANCELLED.sub(lambda m: "" if "gunicorn/ctl/server.py" in m.group(0) else m.group(0), log)


def stop_all_without_tracebacks(started: Started) -> None:
    """Stop every proxy `started` holds: whatever a test did, none logged a traceback."""
    started.stop_all()
    for proxy in started:
        assert "Traceback" not in own_log(proxy.log()), proxy.log()


@pytest.fixture
def start_proxy(tmp_path):
    started = Started(lambda ini, **kwargs: Proxy(tmp_path, ini, **kwargs))
    yield started.start
    stop_all_without_tracebacks(started)


class Certificates:
    """A throwaway CA (trustme) and PEM files it issued, under `folder`."""

    def __init__(self, folder: Path):
        import trustme
        self.folder = folder
        self.ca = trustme.CA()
        self.ca_file = self._write("ca.pem", self.ca.cert_pem)

    def _write(self, name: str, *blobs) -> str:
        path = self.folder / name
        path.write_bytes(b"".join(blob.bytes() for blob in blobs))
        return str(path)

    def issue(self, name: str, *hosts: str) -> tuple[str, str]:
        """(certfile, keyfile) for `hosts` (default 127.0.0.1 and localhost)."""
        cert = self.ca.issue_cert(*(hosts or ("127.0.0.1", "localhost")))
        return (self._write(f"{name}.pem", *cert.cert_chain_pems),
                self._write(f"{name}.key", cert.private_key_pem))


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Certificates:
    """A CA, and a server certificate for 127.0.0.1/localhost: certs.cert, certs.key."""
    made = Certificates(tmp_path_factory.mktemp("certs"))
    made.cert, made.key = made.issue("server")
    return made


def wait_until(predicate, timeout: float = 20.0) -> bool:
    """Poll `predicate` every 0.1 s: True as soon as it holds, False after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def status_of(url: str) -> int | None:
    """The status of a GET, or None when nothing answers."""
    try:
        return requests.get(url, timeout=5).status_code
    except requests.RequestException:
        return None


def read_until_closed(sock: socket.socket, limit: float = 10.0, reset: bytes = b"") -> tuple[bytes, float]:
    """All the proxy sends until it closes (`reset` appended if it reset the
    connection instead); and when it closed (monotonic)."""
    sock.settimeout(limit)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        data += reset
    return data, time.monotonic()


def read_until_ending(sock: socket.socket, ending: bytes, limit: float = 10.0) -> bytes:
    """What the proxy sends up to and with `ending` (the end of a response
    the test knows), or what came before it closed."""
    sock.settimeout(limit)
    data = b""
    while not data.endswith(ending):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def silent_for(sock: socket.socket, seconds: float) -> bool:
    """Does the proxy send nothing on `sock` for `seconds`?"""
    sock.settimeout(seconds)
    try:
        sock.recv(65536)
    except TimeoutError:
        return True
    return False


def raw_exchange(port: int, request: bytes) -> bytes:
    """Send bytes exactly as given; return all that comes back until the
    proxy closes (or resets, or stops talking for 10 s)."""
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        try:
            while chunk := s.recv(65536):
                data += chunk
        except (socket.timeout, ConnectionResetError):
            pass
    return data


class HttpsConnection(http.client.HTTPSConnection):
    """HTTPS to 127.0.0.1:port, presenting `server_name` as SNI and Host (None: no SNI)."""

    def __init__(self, port: int, server_name: str | None, context: ssl.SSLContext, timeout: float = 10):
        super().__init__("127.0.0.1", port, context=context, timeout=timeout)
        self.server_name = server_name

    def connect(self):
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.server_name)

    def get(self, path: str = "/", headers: dict | None = None) -> http.client.HTTPResponse:
        self.request("GET", path, headers={"Host": self.server_name or "127.0.0.1", **(headers or {})})
        response = self.getresponse()
        response.body = response.read()
        return response

    def certificate(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.sock.getpeercert(binary_form=True))


def served_certificate(port: int, server_name: str | None, context: ssl.SSLContext) -> x509.Certificate:
    """The certificate a fresh connection is given."""
    connection = HttpsConnection(port, server_name, context)
    try:
        connection.connect()
        return connection.certificate()
    finally:
        connection.close()


def single_route(port: int, route_extra: str = "", upstream_extra: str = "") -> str:
    """An INI body with one upstream server and a catch-all route."""
    return (f"[upstream:app]\nservers = 127.0.0.1:{port}\n{upstream_extra}\n"
            f"[route:default]\npath = /\nupstream = app\n{route_extra}\n")


@pytest.fixture
def proxy(start_proxy, upstream):
    """rproxy in front of the shared upstream, one worker, defaults."""
    return start_proxy(single_route(upstream.port))


class Redis(Process):
    """A real redis-server on a free port; stop() and start() it again on the same port.
    `extra` are more arguments (cluster mode), `config` a config file's lines (Sentinel
    mode needs one it can write)."""

    def __init__(self, tmp_dir: Path, port: int | None = None, *extra: str, config: str | None = None):
        self.tmp_dir = tmp_dir
        self.port = port or free_port()
        redis_server = shutil.which("redis-server")
        if redis_server is None:
            pytest.fail("redis-server is not installed: python3 scripts/dev.py test installs it")
        name = f"redis-{self.port}-{time.monotonic_ns()}"
        args = [redis_server]
        if config is not None:
            (tmp_dir / f"{name}.conf").write_text(config)
            args.append(str(tmp_dir / f"{name}.conf"))
        args += ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(tmp_dir), *extra]
        super().__init__(args, tmp_dir / f"{name}.log")
        wait_for_port(self.port, self.proc)
        self.url = f"redis://127.0.0.1:{self.port}/0"


@pytest.fixture
def redis_server(tmp_path):
    started = Started(lambda port=None: Redis(tmp_path, port))
    first = started.start()
    first.start_again = lambda: started.start(first.port)
    yield first
    started.stop_all()


def redis_cli(port: int, *args: str) -> str:
    return subprocess.run([shutil.which("redis-cli") or "redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
                          capture_output=True, text=True, timeout=20, check=True).stdout


@pytest.fixture
def redis_sentinel(tmp_path):
    """A Redis master and one Sentinel watching it as `mymaster`: .url is redis+sentinel://."""
    started = Started(lambda *args, **kwargs: Redis(tmp_path, None, *args, **kwargs))
    master = started.start()
    sentinel = started.start("--sentinel", config=f"sentinel monitor mymaster 127.0.0.1 {master.port} 1\n")
    try:
        assert wait_until(lambda: str(master.port) in redis_cli(
            sentinel.port, "SENTINEL", "get-master-addr-by-name", "mymaster"), 10), sentinel.log()
        sentinel.master = master
        sentinel.url = f"redis+sentinel://127.0.0.1:{sentinel.port}/mymaster"
        yield sentinel
    finally:
        started.stop_all()


@pytest.fixture
def redis_tls(tmp_path, certs):
    """A Redis that speaks TLS only, with a certificate from the test CA: .url is
    rediss://, the CA given by its ssl_ca_certs option; .cli are redis-cli's TLS flags."""
    port = free_port()
    started = Started(lambda: Redis(tmp_path, port, "--port", "0", "--tls-port", str(port),
                                    "--tls-cert-file", certs.cert, "--tls-key-file", certs.key,
                                    "--tls-ca-cert-file", certs.ca_file, "--tls-auth-clients", "no"))
    try:
        server = started.start()
        server.cli = ("--tls", "--cacert", certs.ca_file)
        server.url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={certs.ca_file}"
        assert redis_cli(port, *server.cli, "PING").strip() == "PONG", server.log()
        yield server
    finally:
        started.stop_all()


@pytest.fixture
def redis_cluster(tmp_path):
    """Three Redis masters in one cluster, the slots spread over them: .url is redis+cluster://."""
    started = Started(lambda: Redis(tmp_path, None, "--cluster-enabled", "yes", "--cluster-port", str(free_port()),
                                    "--cluster-config-file", f"nodes-{time.monotonic_ns()}.conf",
                                    "--cluster-node-timeout", "5000"))
    try:
        nodes = [started.start() for _ in range(3)]
        redis_cli(nodes[0].port, "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in nodes], "--cluster-yes")
        assert wait_until(lambda: all("cluster_state:ok" in redis_cli(n.port, "CLUSTER", "INFO") for n in nodes), 15)
        nodes[0].nodes = nodes
        nodes[0].url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in nodes)
        yield nodes[0]
    finally:
        started.stop_all()


# (test file, row) of this process; an xdist controller adds its workers'.
_hardening_rows: list[tuple[str, tuple[str, str, str]]] = []


@pytest.fixture
def hardening_record(request):
    """Rows of docs/hardening.md's table, as this run found them: each test
    that attacks the proxy adds (what was tried, how many, what happened).
    Written to test-artifacts/hardening.md at the end of the run."""
    return lambda row: _hardening_rows.append((request.path.name, tuple(row)))


def pytest_sessionfinish(session):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: the controller writes the table
        workeroutput["hardening"] = [[name, list(row)] for name, row in _hardening_rows]
        return
    if _hardening_rows:
        # By file, then in the order the tests ran: the same table whichever worker ran which file.
        rows = [row for _, row in sorted(_hardening_rows, key=lambda entry: entry[0])]
        out = REPO / "test-artifacts" / "hardening.md"
        out.parent.mkdir(exist_ok=True)
        lines = ["| what was tried | how many | what happened |", "|---|---|---|"]
        lines += [f"| {what} | {count} | {result} |" for what, count, result in rows]
        out.write_text("\n".join(lines) + "\n")


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    _hardening_rows.extend((name, tuple(row)) for name, row in getattr(node, "workeroutput", {}).get("hardening", []))


# The fixtures that start servers (and those that start tools from apt);
# a test that uses none of them, even through another fixture, is in the fast
# tier: `python3 scripts/dev.py test --quick` (pytest -m "not process").
PROCESS_FIXTURES = frozenset({"start_proxy", "start_upstream", "upstream", "redis_server", "redis_sentinel",
                              "redis_cluster", "pebble", "installed",
                              "ws_upstream", "aio_upstream", "start_starting_proxy", "unit"})


# The files that took longest (--durations): under pytest-xdist, which hands
# whole files to workers in collection order, they go first, so that none
# starts late and runs alone at the end.
LONGEST_FIRST = ("test_reload.py", "test_client_limits.py", "test_websocket.py", "test_acme.py",
                 "test_http2.py", "test_packaging.py", "test_middleware.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if PROCESS_FIXTURES.intersection(item.fixturenames):
            item.add_marker(pytest.mark.process)
    if _WORKERS > 1:
        rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order
