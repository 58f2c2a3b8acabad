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
