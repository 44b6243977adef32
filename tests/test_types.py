"""mypy over rproxy/ (in-process tier: no servers). The settings are in
pyproject.toml: strict for the server boundary and the core's interfaces
(app, record, messages, target, routing, forwarding, upstreams), default
mode elsewhere. Its cache stays in the checkout's .mypy_cache, so a run
after the first takes a second or two."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_mypy_finds_no_type_errors_in_rproxy():
    result = subprocess.run([sys.executable, "-m", "mypy", "--no-pretty", "--no-error-summary"],
                            cwd=ROOT, capture_output=True, text=True, timeout=290)
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert result.returncode == 0 and not errors, (
        f"mypy exited {result.returncode}:\n{result.stdout}{result.stderr}")
