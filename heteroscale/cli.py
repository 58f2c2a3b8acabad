"""The ``heteroscale`` command line: one entry, one subcommand per job.

Each subcommand's module is imported only when that subcommand runs (a plain import
inside a small loader function), so ``heteroscale --help`` imports none of them and
stays fast. Each module exposes ``add_arguments(parser)``-style and ``run(args) -> int``
functions; the table below names them.

Errors the user can cause end with one line naming the problem and exit status 2
(ARCHITECTURE §3.1): argparse errors, ``UsageError`` (and ``ConfigError``, whose
problems are all listed, one per line), a missing file. Ctrl-C exits 130 without a
traceback.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any, Callable, NoReturn, Sequence

from heteroscale import __version__
from heteroscale.errors import ConfigError, UsageError

EXIT_USAGE = 2

SIM_EXTRA = ("numpy", "matplotlib")      # the [sim] extra: simulate, curate, demo
AddArguments = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]


def _needs_sim_extra(command: str, exc: ModuleNotFoundError) -> UsageError:
    return UsageError(f"'heteroscale {command}' needs the sim extra ({exc.name} is not installed): "
                      "pip install 'heteroscale[sim]'")


def _demo() -> tuple[AddArguments, Run]:
    try:
        from heteroscale.demo import app
    except ModuleNotFoundError as exc:
        if exc.name not in SIM_EXTRA:
            raise
        raise _needs_sim_extra("demo", exc) from None
    return app.add_arguments, app.run


def _sidecar() -> tuple[AddArguments, Run]:
    from heteroscale.sidecar import agent
    return agent.add_arguments, agent.run


def _coordinator() -> tuple[AddArguments, Run]:
    from heteroscale.coordinator import app
    return app.add_coordinator_arguments, app.run_coordinator


def _validate() -> tuple[AddArguments, Run]:
    from heteroscale.coordinator import app
    return app.add_validate_arguments, _run_validate


def _run_validate(args: argparse.Namespace) -> int:
    """A coordinator config, or a simulator config (one with a ``simulation:`` block,
    checked whole by the simulator's reader): every problem on its own line, exit 2."""
    import yaml

    from heteroscale.coordinator.app import report_problems
    from heteroscale.coordinator.config import read_config, read_text
    text = read_text(args.config)
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        doc = None                           # the coordinator's reader says where
    try:
        if isinstance(doc, dict) and "simulation" in doc:
            from heteroscale.simulator.config import load_sim_config
            services = load_sim_config(text, origin=args.config).coordinator.services
        else:
            services = read_config(args.config).services
    except ConfigError as exc:
        return report_problems(args.config, exc)
    print(f"ok: {len(services)} service{'s' if len(services) != 1 else ''}")
    return 0


def _place() -> tuple[AddArguments, Run]:
    from heteroscale.coordinator import place_cli
    return place_cli.add_arguments, place_cli.run


def _simulator_cli(command: str) -> Any:
    try:
        from heteroscale.simulator import cli
    except ModuleNotFoundError as exc:
        if exc.name not in SIM_EXTRA:
            raise
        raise _needs_sim_extra(command, exc) from None
    return cli


def _simulate() -> tuple[AddArguments, Run]:
    cli = _simulator_cli("simulate")
    return cli.add_simulate_arguments, cli.run_simulate


def _curate() -> tuple[AddArguments, Run]:
    cli = _simulator_cli("curate")
    return cli.add_curate_arguments, cli.run_curate


def _emulate_engine() -> tuple[AddArguments, Run]:
    from heteroscale.demo.emulator import server         # the scalar perf model: no numpy needed
    return server.add_arguments, server.run


@dataclass(frozen=True)
class Subcommand:
    name: str
    load: Callable[[], tuple[AddArguments, Run]]
    help: str


SUBCOMMANDS: tuple[Subcommand, ...] = (
    Subcommand("demo", _demo, "run a local P/D cluster on this machine, replaying a trace, autoscaled live"),
    Subcommand("sidecar", _sidecar, "per-pod agent: scrape the engine and GPUs, serve /metrics and /v1/report"),
    Subcommand("coordinator", _coordinator,
               "leader-elected coordinator: decide and act for every configured service"),
    Subcommand("validate", _validate, "check a coordinator config and print every problem at once"),
    Subcommand("place", _place, "show where the placement code would put a service's instances on given nodes"),
    Subcommand("simulate", _simulate, "replay a trace against scaling policies and compare them"),
    Subcommand("curate", _curate, "pressure-test P/D ratios and pick the ratio, target and policy for a service"),
    Subcommand("emulate-engine", _emulate_engine,
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
        sub.add_parser(command.name, help=command.help, add_help=False)
    return parser


def _report_usage_error(prog: str, exc: UsageError) -> int:
    """One line per problem: a ``ConfigError`` lists each of its problems on its own line."""
    if isinstance(exc, ConfigError) and exc.problems:
        for problem in exc.problems:
            sys.stderr.write(f"{prog}: error: {exc.source}: {problem}\n")
    else:
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
        add_arguments, run = command.load()
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
