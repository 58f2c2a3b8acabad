"""Build time, size and start time of the container image (buildah, root).

Builds the image from scratch (no layer cache) with ``scripts/build-image.sh`` on the given
base (default: the Debian base ``scripts/build-image.sh --debian-base`` makes, made first if
missing), then measures:

- the wheelhouse and build phases, wall seconds;
- the image size, uncompressed and gzip-compressed (``buildah push`` to a ``dir:``), its
  base's, and the biggest installed distributions;
- start times in a ``buildah run --isolation=chroot`` container: ``heteroscale --version``
  and a sidecar's first ``/healthz`` (beside ``true``, buildah's own overhead), once as
  built (no bytecode) and once after ``compileall``, with what bytecode would add in size.

Writes a result file (``--replace``: ``benchmarks/results/image.json``; ``benchmarks/record.py``) (with the machine's load around the run) and prints
a summary. A busy machine makes the times longer, never a failure.

    .venv/bin/python benchmarks/image_bench.py [--base IMAGE] [--replace | --out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import record

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BASE = "localhost/heteroscale-base:bookworm"
IMAGE = "localhost/heteroscale:bench"


def sh(*cmd: str, timeout: float = 1800, **kw) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out.stdout + out.stderr


def image_exists(name: str) -> bool:
    return subprocess.run(["buildah", "inspect", "--type", "image", name], capture_output=True).returncode == 0


def pushed_bytes(image: str, *, compressed: bool) -> int:
    """Sum of the layer blobs of ``image`` pushed to a dir: (gzip or uncompressed)."""
    with tempfile.TemporaryDirectory(prefix="image-bench-") as tmp:
        flags = ["--compression-format", "gzip"] if compressed else ["--disable-compression"]
        sh("buildah", "push", "--quiet", *flags, image, f"dir:{tmp}/out")
        manifest = json.loads(Path(tmp, "out", "manifest.json").read_text())
        return sum(layer["size"] for layer in manifest["layers"])


def tree_bytes(root: Path) -> int:
    total = 0
    for d, _, files in os.walk(root):
        for f in files:
            try:
                total += os.lstat(os.path.join(d, f)).st_size
            except OSError:
                pass
    return total


def timed(cmd: list[str], repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        started = time.monotonic()
        sh(*cmd, timeout=300)
        times.append(round(time.monotonic() - started, 2))
    return times


def sidecar_healthz_s(ctr: str, port: int) -> float:
    started = time.monotonic()
    proc = subprocess.Popen(["buildah", "run", "--isolation=chroot", ctr, "--", "heteroscale", "sidecar",
                             "--engine", "vllm", "--engine-url", "http://127.0.0.1:9", "--role", "decode",
                             "--service", "bench", "--listen", f"127.0.0.1:{port}", "--gpu-source", "none",
                             "--no-rdma"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.monotonic() - started < 120:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:  # noqa: S310
                    if r.status == 200:
                        return round(time.monotonic() - started, 2)
            except OSError:
                pass
            if proc.poll() is not None:
                raise SystemExit(f"sidecar exited {proc.returncode} before /healthz answered")
            time.sleep(0.05)
        raise SystemExit("sidecar /healthz did not answer in 120 s")
    finally:
        proc.terminate()
        proc.wait(30)


def start_times(ctr: str, repeat: int) -> dict:
    sys.path.insert(0, str(REPO))
    from heteroscale.net import free_port
    return {
        "buildah_run_true_s": timed(["buildah", "run", "--isolation=chroot", ctr, "--", "true"], repeat),
        "version_s": timed(["buildah", "run", "--isolation=chroot", ctr, "--", "heteroscale", "--version"], repeat),
        "sidecar_healthz_s": [sidecar_healthz_s(ctr, free_port()) for _ in range(repeat)],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=os.environ.get("HETEROSCALE_IMAGE_BASE", DEFAULT_BASE))
    parser.add_argument("--repeat", type=int, default=3)
    record.add_output_arguments(parser, "image")
    args = parser.parse_args()
    out = record.output_path(args, "image")
    if shutil.which("buildah") is None:
        raise SystemExit("buildah is not installed (scripts/test-deps.sh installs it)")
    load_before = os.getloadavg()
    result: dict = {"command": "benchmarks/image_bench.py " + " ".join(sys.argv[1:]), "base": args.base,
                    "machine_cores": os.cpu_count(), "buildah": sh("buildah", "--version").strip(),
                    "date": time.strftime("%Y-%m-%d")}
    if args.base == DEFAULT_BASE and not image_exists(args.base):
        started = time.monotonic()
        sh(str(REPO / "scripts" / "build-image.sh"), "--debian-base", args.base, env={**os.environ, "BUILDER": "buildah"})
        result["debian_base_s"] = round(time.monotonic() - started, 1)

    env = {**os.environ, "BASE_IMAGE": args.base, "IMAGE": IMAGE, "BUILDER": "buildah", "PYTHON": sys.executable,
           "BUILDAH_LAYERS": "false"}
    started = time.monotonic()
    log = sh(str(REPO / "scripts" / "build-image.sh"), cwd=REPO, env=env)
    total = time.monotonic() - started
    build = float(re.search(r"with buildah in (\d+) s", log).group(1))
    result |= {"script_s": round(total, 1), "build_s": build, "wheelhouse_s": round(total - build, 1)}
    wheelhouse = REPO / "build" / "image" / "wheelhouse"
    result["wheelhouse_mb"] = round(tree_bytes(wheelhouse) / 1e6, 1)

    result["image_mb"] = round(pushed_bytes(IMAGE, compressed=False) / 1e6, 1)
    result["image_gzip_mb"] = round(pushed_bytes(IMAGE, compressed=True) / 1e6, 1)
    result["base_mb"] = round(pushed_bytes(args.base, compressed=False) / 1e6, 1)
    result["base_gzip_mb"] = round(pushed_bytes(args.base, compressed=True) / 1e6, 1)

    ctr = sh("buildah", "from", "--quiet", "--pull=never", IMAGE).strip()
    try:
        mnt = Path(sh("buildah", "mount", ctr).strip())
        (site,) = (mnt / "opt" / "heteroscale" / "lib").glob("python3*/site-packages")
        result["venv_mb"] = round(tree_bytes(mnt / "opt" / "heteroscale") / 1e6, 1)
        sizes = {p.name: tree_bytes(p) for p in site.iterdir() if p.is_dir() and not p.name.endswith("-info")}
        result["largest_mb"] = {k: round(v / 1e6, 1) for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])[:10]}
        result["python"] = sh("buildah", "run", "--isolation=chroot", ctr, "--", "python3", "-c",
                              "import platform; print(platform.python_version())").strip()
        result["start_no_bytecode"] = start_times(ctr, args.repeat)
        sh("buildah", "run", "--isolation=chroot", "--user", "0:0", ctr, "--", "python3", "-m", "compileall", "-q",
           "-j", "0", "/opt/heteroscale", timeout=900)
        result["bytecode_adds_mb"] = round(tree_bytes(mnt / "opt" / "heteroscale") / 1e6 - result["venv_mb"], 1)
        result["start_with_bytecode"] = start_times(ctr, args.repeat)
        sh("buildah", "umount", ctr)
    finally:
        subprocess.run(["buildah", "rm", ctr], capture_output=True)
        subprocess.run(["buildah", "rmi", IMAGE], capture_output=True)
    result["loadavg_before"] = [round(x, 2) for x in load_before]
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    result["host"] = platform.platform()
    result["met"] = {"image <= 250 MB": result["image_mb"] <= 250}
    record.write(out, result)

    def med(key: str, block: str) -> float:
        return statistics.median(result[block][key])
    print(f"image {result['image_mb']} MB ({result['image_gzip_mb']} MB gzip; base {result['base_mb']} MB), "
          f"wheelhouse {result['wheelhouse_s']} s + build {result['build_s']} s; "
          f"--version {med('version_s', 'start_no_bytecode')} s, sidecar /healthz "
          f"{med('sidecar_healthz_s', 'start_no_bytecode')} s (with bytecode: "
          f"{med('version_s', 'start_with_bytecode')} s, {med('sidecar_healthz_s', 'start_with_bytecode')} s, "
          f"+{result['bytecode_adds_mb']} MB); load {result['loadavg_before'][0]} -> {result['loadavg_after'][0]}")
    return record.verdict(result["met"], out)


if __name__ == "__main__":
    sys.exit(main())
