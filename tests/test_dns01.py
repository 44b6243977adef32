"""DNS-01's pure parts, in process: where the TXT record goes, and what an
exec hook's failure says."""

import sys
import textwrap

import pytest

from rproxy.tls import dns01


@pytest.mark.parametrize("domain,name", [("example.com", "_acme-challenge.example.com"),
                                         ("*.example.com", "_acme-challenge.example.com"),
                                         ("a.b.example.com", "_acme-challenge.a.b.example.com")])
def test_a_wildcard_is_answered_at_its_base_name(domain, name):
    assert dns01.txt_name(domain) == name


def hook(tmp_path, body: str) -> str:
    path = tmp_path / "hook"
    path.write_text(f"#!{sys.executable}\nimport sys\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


def test_exec_hook_gets_action_domain_name_and_value(tmp_path):
    calls = tmp_path / "calls"
    provider = dns01.Exec(hook(tmp_path, f"open({str(calls)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"))
    provider.present("*.example.com", "_acme-challenge.example.com", "v4lue")
    provider.cleanup("*.example.com", "_acme-challenge.example.com", "v4lue")
    assert calls.read_text().splitlines() == ["present *.example.com _acme-challenge.example.com v4lue",
                                              "cleanup *.example.com _acme-challenge.example.com v4lue"]


def test_exec_hook_failure_says_the_status_and_its_last_line(tmp_path):
    command = hook(tmp_path, "print('working...', file=sys.stderr)\nprint('zone not found', file=sys.stderr)\n"
                             "sys.exit(2)\n")
    with pytest.raises(dns01.DnsProblem) as info:
        dns01.Exec(command).present("a.example.com", "_acme-challenge.a.example.com", "v")
    assert str(info.value) == (f"dns_exec {command} present a.example.com _acme-challenge.a.example.com: "
                               "exited with status 2: zone not found")


def test_exec_hook_that_cannot_run_is_a_clear_problem(tmp_path):
    with pytest.raises(dns01.DnsProblem, match="cannot run: No such file or directory"):
        dns01.Exec(str(tmp_path / "gone")).present("a.example.com", "_acme-challenge.a.example.com", "v")
