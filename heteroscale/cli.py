"""The ``heteroscale`` command line: one entry, one subcommand per job.

Subcommands live in their own modules and are imported only when asked for, so
``heteroscale --help`` stays fast and a module that is not built yet says so
plainly instead of failing with a traceback. Each subcommand module exposes an
``add_*_arguments(parser)`` function and a ``run_*(args) -> int`` function.

Errors the user can cause end with one line naming the problem and exit status 2
(ARCHITECTURE §3.1): argparse errors, ``UsageError`` (and ``ConfigError``, whose
problems are all listed), a missing file. Ctrl-C exits 130 without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from typing import Callable, NoReturn, Sequence

from heteroscale import __version__
from heteroscale.errors import UsageError

EXIT_USAGE = 2


@dataclass(frozen=True)
class Subcommand:
    name: str
    module: str
    add_arguments: str
    run: str
    help: str


SUBCOMMANDS: tuple[Subcommand, ...] = (
    Subcommand("demo", "heteroscale.demo.app", "add_arguments", "run",
               "run a local P/D cluster on this machine, replaying a trace, autoscaled live"),
    Subcommand("sidecar", "heteroscale.sidecar.agent", "add_arguments", "run",
               "per-pod agent: scrape the engine and GPUs, serve /metrics and /v1/report"),
    Subcommand("coordinator", "heteroscale.coordinator.app", "add_coordinator_arguments", "run_coordinator",
               "leader-elected coordinator: decide and act for every configured service"),
    Subcommand("validate", "heteroscale.coordinator.app", "add_validate_arguments", "run_validate",
               "check a coordinator config and print every problem at once"),
    Subcommand("place", "heteroscale.coordinator.place_cli", "add_arguments", "run",
               "show where the placement code would put a service's instances on given nodes"),
    Subcommand("simulate", "heteroscale.simulator.cli", "add_simulate_arguments", "run_simulate",
               "replay a trace against scaling policies and compare them"),
    Subcommand("curate", "heteroscale.simulator.cli", "add_curate_arguments", "run_curate",
               "pressure-test P/D ratios and pick the ratio, target and policy for a service"),
    Subcommand("emulate-engine", "heteroscale.demo.emulator.server", "add_arguments", "run",
               "one engine emulator process (vLLM metric names, OpenAI-compatible API)"),
)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``heteroscale X: error: ...`` and exit 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(EXIT_USAGE)


def _top_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="heteroscale",
        description="Coordinated autoscaling for prefill/decode-disaggregated LLM serving.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'heteroscale COMMAND --help' for a command's flags.",
    )
    parser.add_argument("--version", action="version", version=f"heteroscale {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for command in SUBCOMMANDS:
        note = "" if _available(command) else " [not built yet]"
        sub.add_parser(command.name, help=command.help + note, add_help=False)
    return parser


def _available(command: Subcommand) -> bool:
    try:
        module = importlib.import_module(command.module)
    except ModuleNotFoundError as exc:
        if exc.name and command.module.startswith(exc.name):
            return False
        raise
    return hasattr(module, command.run)


def _load(command: Subcommand) -> tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]:
    if not _available(command):
        raise UsageError(f"'heteroscale {command.name}' is not built yet in this version ({__version__})")
    module = importlib.import_module(command.module)
    return getattr(module, command.add_arguments), getattr(module, command.run)


def _report_usage_error(prog: str, exc: UsageError) -> int:
    # One line, always. A ConfigError's message names its first problem and the
    # count of the others; ``heteroscale validate`` prints every problem itself.
    sys.stderr.write(f"{prog}: error: {exc}\n")
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if not args_in or args_in[0] in ("-h", "--help", "--version"):
        parser = _top_parser()
        if not args_in:
            parser.print_help()
            return EXIT_USAGE
        parser.parse_args(args_in)
        return 0
    name, rest = args_in[0], args_in[1:]
    by_name = {c.name: c for c in SUBCOMMANDS}
    if name not in by_name:
        sys.stderr.write(f"heteroscale: error: unknown command '{name}' "
                         f"(choose from {', '.join(by_name)})\n")
        return EXIT_USAGE
    command = by_name[name]
    prog = f"heteroscale {name}"
    try:
        add_arguments, run = _load(command)
        parser = _Parser(prog=prog, description=command.help)
        add_arguments(parser)
        try:
            args = parser.parse_args(rest)
        except SystemExit as exc:   # _Parser.error / --help: already printed; return the status
            return exc.code if isinstance(exc.code, int) else EXIT_USAGE
        return int(run(args) or 0)
    except UsageError as exc:
        return _report_usage_error(prog, exc)
    except FileNotFoundError as exc:
        sys.stderr.write(f"{prog}: error: no such file: {exc.filename or exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into `head` and closed early: not an error of ours.
        _silence_stdout()
        return 0


def _silence_stdout() -> None:
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass


def entry() -> NoReturn:
    raise SystemExit(main())


if __name__ == "__main__":
    entry()
