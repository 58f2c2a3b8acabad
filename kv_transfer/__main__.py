"""``python -m heteroscale.kv_transfer``: the KV-transfer extension without the rest of the sidecar.

Two commands, both built from the very flags ``heteroscale sidecar`` takes:

* ``serve``  - run the probe server (``--probe-listen``) until SIGTERM/SIGINT;
  prints ``listening HOST:PORT`` once bound and, on the way out, the server's
  counters (``probe.server`` of the report) as one JSON line. For a decode host,
  or a testbed.
* ``sample`` - run ``--rounds`` probe rounds over ``--probe-peers`` (plus one
  RDMA/exporter sample) and print the ``kv_transfer`` object the sidecar would
  put in ``/v1/report``, as JSON. For a prefill host, or a one-off measurement.

Bad flags are one line on stderr and exit status 2, like the main CLI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time

from heteroscale.kv_transfer import extension
from heteroscale.errors import ConfigError, UsageError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m heteroscale.kv_transfer")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("serve", "sample"):
        p = sub.add_parser(name)
        p.add_argument("--role", choices=("prefill", "decode"), default="prefill" if name == "sample" else "decode")
        p.add_argument("--pod", help="this pod's name (announced by the probe server)")
        extension.add_arguments(p)
        if name == "sample":
            p.add_argument("--rounds", type=int, default=1, help="probe rounds before printing (default 1)")
    return parser


async def _serve(ext: extension.KvTransferExtension) -> int:
    if ext.probe_server_port is None:
        raise UsageError("serve needs --probe-listen")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    host = ext.settings.probe_listen[0] if ext.settings.probe_listen else "?"
    print(f"listening {host}:{ext.probe_server_port}", flush=True)
    await stop.wait()
    print(json.dumps(ext.build_sample(time.monotonic()).get("probe", {}).get("server", {}), sort_keys=True),
          flush=True)
    return 0


async def _sample(ext: extension.KvTransferExtension, rounds: int) -> int:
    runner = ext.probe_runner
    if runner is not None:
        for _ in range(max(1, rounds)):         # no background schedule: rounds run here, back to back
            await runner.probe_all()
    print(json.dumps(await ext.sample(time.monotonic()), sort_keys=True), flush=True)
    return 0


async def _main(args: argparse.Namespace) -> int:
    ext = extension.build(args, schedule_probes=False)
    await ext.start()
    try:
        return await (_serve(ext) if args.command == "serve" else _sample(ext, args.rounds))
    finally:
        await ext.close()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return asyncio.run(_main(args))
    except ConfigError as exc:
        print(f"python -m heteroscale.kv_transfer: {exc.source}: {'; '.join(exc.problems)}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"python -m heteroscale.kv_transfer: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
