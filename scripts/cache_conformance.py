"""Run the public HTTP cache conformance suite (cache-tests.fyi) with rproxy
as the cache in front of the suite's origin.

    python3 scripts/cache_conformance.py --suite DIR     # a checkout (current tests)
    python3 scripts/cache_conformance.py [--version 0.4.5] [--keep DIR]   # the npm package

Needs node and npm. `--suite DIR` runs a checkout of
https://github.com/http-tests/cache-tests (its tests/ and test-engine/;
`npm install` is run in it when node_modules is missing): the current suite,
with the CDN-Cache-Control and interim-response groups the npm package
(0.4.5) lacks. Without it, the npm package is installed into a temporary
folder (or --keep DIR). Starts the suite's origin server and rproxy (gunicorn
-c gunicorn.conf.py, one worker, a [cache] section with
`targeted_fields = CDN-Cache-Control`, as the suite's CDN tests expect) on
free loopback ports, runs every test, and prints rproxy's counts by the
suite's own verdicts (pass, required failure, optional failure, ...) beside
the results the suite ships for other caches, then the required and optional
failures by name.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import free_port, wait_port  # scripts/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = ROOT / ".venv" / "bin" / "gunicorn"

# Scores results files by the suite's own display rules. {verdicts} is the
# module holding determineTestResult (lib/display.mjs in the npm package,
# test-engine/lib/results.mjs in a checkout); {extra} adds test groups the
# package's index leaves out.
SCORE = """
import fs from 'fs'
import tests from './tests/index.mjs'
import * as display from './{verdicts}'
{extra}
const names = {'#1aa123': 'pass', '#c33131': 'required_fail', '#bbbd15': 'optional_fail',
  '#999696': 'check', '#b4b2b2': 'dependency_fail', '#4c61ae': 'setup_or_harness_fail', '': 'untested'}
const out = {}
for (const file of process.argv.slice(2)) {
  const results = JSON.parse(fs.readFileSync(file))
  const counts = {}, failed = [], optional = []
  for (const suite of tests) for (const t of suite.tests) {
    const verdict = names[display.determineTestResult(tests, t.id, results)[1]] || 'other'
    counts[verdict] = (counts[verdict] || 0) + 1
    if (verdict === 'required_fail') failed.push(`${t.id}: ${t.name}`)
    if (verdict === 'optional_fail') optional.push(`${t.id}: ${t.name}`)
  }
  out[file] = {counts, failed, optional}
}
console.log(JSON.stringify(out))
"""


def start(args, log: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True, **kw)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default="0.4.5", help="http-cache-tests version")
    parser.add_argument("--keep", help="install the suite here and keep it (and the results)")
    parser.add_argument("--suite", help="a checkout of github.com/http-tests/cache-tests to run instead")
    args = parser.parse_args()
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed")
    if not GUNICORN.exists():
        sys.exit("rproxy is not installed in .venv: python3 scripts/dev.py test first")
    work = Path(args.keep or tempfile.mkdtemp(prefix="cache-tests-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.suite:
        suite = Path(args.suite).resolve()
        if not (suite / "tests" / "index.mjs").exists():
            sys.exit(f"{suite} is not a cache-tests checkout (no tests/index.mjs)")
        if not (suite / "node_modules").exists():
            subprocess.run(["npm", "install", "--silent", "--omit=dev"], cwd=suite, check=True)
    else:
        suite = work / "node_modules" / "http-cache-tests"
        if not suite.exists():
            subprocess.run(["npm", "install", "--silent", f"http-cache-tests@{args.version}"], cwd=work, check=True)
    # A checkout keeps its engine in test-engine/; the npm package at its top.
    engine = "test-engine/" if (suite / "test-engine").is_dir() else ""
    label = f"cache-tests checkout {suite}" if args.suite else f"http-cache-tests {args.version}"
    origin_port, proxy_port = free_port(), free_port()
    env = dict(os.environ, npm_config_port=str(origin_port), npm_config_protocol="http",
               npm_config_pidfile=str(work / "origin.pid"))
    origin = start(["node", f"{engine}server/server.mjs"], work / "origin.log", cwd=suite, env=env)
    ini = work / "rproxy.ini"
    ini.write_text(f"[server]\nbind = 127.0.0.1:{proxy_port}\n[log]\naccess_log = off\nlevel = warning\n"
                   f"[upstream:origin]\nservers = 127.0.0.1:{origin_port}\n"
                   f"[route:default]\nupstream = origin\n[cache]\ntargeted_fields = CDN-Cache-Control\n")
    proxy = start([str(GUNICORN), "-c", "gunicorn.conf.py", "--no-control-socket"], work / "rproxy.log",
                  cwd=ROOT, env=dict(os.environ, RPROXY_CONFIG=str(ini)))
    try:
        wait_port(origin_port)
        wait_port(proxy_port)
        time.sleep(1)  # the worker boots after the master listens
        results = work / "rproxy-results.json"
        run_env = dict(os.environ, npm_config_base=f"http://127.0.0.1:{proxy_port}", npm_package_config_id="")
        with open(results, "wb") as out:
            subprocess.run(["node", "--no-warnings", f"{engine}cli.mjs"], cwd=suite, env=run_env, stdout=out,
                           check=True, timeout=1800)
    finally:
        stop(proxy)
        stop(origin)
    extra = ("" if engine or not (suite / "tests" / "surrogate-control.mjs").exists() else
             "import surrogate from './tests/surrogate-control.mjs'\ntests.push(surrogate)")
    verdicts = f"{engine}lib/results.mjs" if engine else "lib/display.mjs"
    (suite / "rproxy-score.mjs").write_text(SCORE.replace("{verdicts}", verdicts).replace("{extra}", extra))
    files = [str(results), *sorted(str(p) for p in (suite / "results").glob("*.json") if p.stem != "rproxy")]
    scores = json.loads(subprocess.run(["node", "rproxy-score.mjs", *files], cwd=suite, capture_output=True,
                                       text=True, check=True).stdout)
    print(f"{label}: verdicts per cache (the suite's own display rules)")
    print(f"  {'cache':<16} {'pass':>5} {'required_fail':>14} {'optional_fail':>14}")
    for file, score in sorted(scores.items(), key=lambda kv: -kv[1]["counts"].get("pass", 0)):
        name = "rproxy" if file == str(results) else Path(file).stem
        c = score["counts"]
        print(f"  {name:<16} {c.get('pass', 0):>5} {c.get('required_fail', 0):>14} {c.get('optional_fail', 0):>14}")
    print("\nrproxy's required failures:")
    for line in scores[str(results)]["failed"]:
        print(f"  {line}")
    print("\nrproxy's optional failures (the suite's SHOULD and MAY, not MUST):")
    for line in scores[str(results)]["optional"]:
        print(f"  {line}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
