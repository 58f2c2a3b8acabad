"""The command line as a user meets it: help, unknown commands, bad flags."""

from __future__ import annotations

import subprocess
import sys

from heteroscale.cli import SUBCOMMANDS, main


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "heteroscale", *args],
                          capture_output=True, text=True, timeout=60)


def test_help_lists_every_subcommand():
    out = _run("--help")
    assert out.returncode == 0
    for name in ("demo", "sidecar", "coordinator", "validate", "simulate", "emulate-engine"):
        assert name in out.stdout
    assert len(SUBCOMMANDS) >= 6


def test_unknown_command_is_one_line_exit_2():
    out = _run("frobnicate")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1
    assert "unknown command 'frobnicate'" in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_flag_is_one_line_exit_2(capsys):
    code = main(["sidecar", "--no-such-flag"])
    err = capsys.readouterr().err
    assert code == 2 or code is None
    assert err.count("\n") == 1 and "error" in err


def test_without_the_sim_extra_the_simulator_says_what_to_install():
    """The container image (and `pip install heteroscale`) carry no numpy or matplotlib:
    simulate, curate and demo say in one line what to install; the rest works."""
    code = ("import sys; sys.modules['numpy'] = None; sys.modules['matplotlib'] = None\n"
            "from heteroscale.cli import main\n"
            "for name in ('simulate', 'curate', 'demo', 'emulate-engine', 'coordinator'):\n"
            "    print(name, main([name, '--help']))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    names = ("simulate", "curate", "demo", "emulate-engine", "coordinator")
    codes = dict(w for w in (line.split() for line in out.stdout.splitlines()) if len(w) == 2 and w[0] in names)
    assert codes == {"simulate": "2", "curate": "2", "demo": "2", "emulate-engine": "0", "coordinator": "0"}, out
    errors = out.stderr.strip().splitlines()
    assert len(errors) == 3 and "Traceback" not in out.stderr
    assert all("needs the sim extra" in e and "pip install 'heteroscale[sim]'" in e for e in errors)
