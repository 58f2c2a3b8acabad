"""The container image, built for real and run (tier ``image``: ``pytest -m image``).

``scripts/build-image.sh`` builds the Dockerfile with buildah once per session, on a Debian
base made here from Debian packages (``scripts/build-image.sh --debian-base``: mmdebstrap) or
on the image HETEROSCALE_IMAGE_BASE names (e.g. ``docker.io/library/python:3.12-slim`` where a
registry is reachable). Then, in that image: the configured user is a numeric non-root UID;
``heteroscale --version`` runs; no pip, wheel, compiler, test suite or bytecode cache is left;
the build context held nothing but the wheelhouse; a sidecar started with ``buildah run``
scrapes an engine emulator on the host and answers /healthz; and under podman, with read-only
root filesystems as the manifests run them, a sidecar with no writable path and a coordinator
with only /tmp writable work together and stop cleanly on SIGTERM.

Skips, saying why, where buildah is missing or cannot run containers (not root and no user
namespaces), where no base image can be had, or (the read-only test) where podman cannot run
containers. A failed build is a failure, not a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, free_port

pytestmark = [pytest.mark.image, pytest.mark.slow, pytest.mark.timeout(1800)]

IMAGE = "localhost/heteroscale:test"
DEFAULT_BASE = "localhost/heteroscale-base:bookworm"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
HETEROSCALE = [sys.executable, "-m", "heteroscale"]
# Limits below any host's own: podman's defaults (1M open files) are more than a root
# without CAP_SYS_RESOURCE (e.g. inside another sandbox) may set.
PODMAN_LIMITS = ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]


@dataclass(frozen=True)
class Built:
    image: str
    base: str
    build_s: float


def _run(cmd: list[str], *, timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check:
        assert out.returncode == 0, (f"{' '.join(cmd)} exited {out.returncode}\n"
                                     f"{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
    return out


def _last_line(text: str) -> str:
    """The line that says why: the last error line, else the last line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.lower().startswith(("error", "e:"))]
    return (errors or lines or ["(no output)"])[-1]


def _image_id(name: str) -> str | None:
    out = _run(["buildah", "inspect", "--type", "image", "--format", "{{.FromImageID}}", name], check=False)
    return out.stdout.strip() if out.returncode == 0 else None


def _buildah_problem() -> str | None:
    if shutil.which("buildah") is None:
        return ("buildah is not installed (scripts/test-deps.sh installs it as root: "
                "apt-get install buildah mmdebstrap podman runc)")
    if os.geteuid() != 0:
        probe = _run(["buildah", "unshare", "true"], check=False)
        if probe.returncode != 0:
            return (f"buildah cannot run as uid {os.geteuid()} here (needs root, or user namespaces "
                    f"with /etc/subuid ranges): {_last_line(probe.stderr)}")
    probe = _run(["buildah", "from", "--quiet", "scratch"], check=False)
    if probe.returncode != 0:
        return f"buildah cannot create containers here: {_last_line(probe.stderr)}"
    _run(["buildah", "rm", probe.stdout.strip()], check=False)
    return None


@pytest.fixture(scope="session")
def built() -> Built:
    """The image, built once per session by the same script users run."""
    problem = _buildah_problem()
    if problem:
        pytest.skip(problem)
    base = os.environ.get("HETEROSCALE_IMAGE_BASE", DEFAULT_BASE)
    if base == DEFAULT_BASE and _image_id(base) is None:
        if shutil.which("mmdebstrap") is None:
            pytest.skip(f"no base image: {base} is not in local storage and mmdebstrap (which makes it) "
                        "is not installed; or set HETEROSCALE_IMAGE_BASE")
        made = _run([str(REPO / "scripts" / "build-image.sh"), "--debian-base", base], check=False,
                    timeout=1200, env={**os.environ, "BUILDER": "buildah"})
        if made.returncode != 0:    # no Debian mirror reachable: a missing prerequisite
            pytest.skip(f"could not make the Debian base image {base}: {_last_line(made.stderr)}")
    before = _image_id(IMAGE)
    started = time.monotonic()
    # No layer cache: every session builds from scratch, and no intermediate images pile up.
    env = {**os.environ, "BASE_IMAGE": base, "IMAGE": IMAGE, "BUILDER": "buildah",
           "PYTHON": sys.executable, "BUILDAH_LAYERS": "false"}
    _run([str(REPO / "scripts" / "build-image.sh")], cwd=REPO, env=env, timeout=1500)
    build_s = time.monotonic() - started
    after = _image_id(IMAGE)
    assert after is not None
    if before and before != after:              # the previous session's image, now untagged
        _run(["buildah", "rmi", before], check=False)
    return Built(image=IMAGE, base=base, build_s=build_s)


@pytest.fixture
def container(built: Built):
    """A buildah working container of the image (runs commands as the image's user)."""
    ctr = _run(["buildah", "from", "--quiet", "--pull=never", built.image]).stdout.strip()
    yield ctr
    _run(["buildah", "rm", ctr], check=False)


def _in(ctr: str, *cmd: str, **kw) -> subprocess.CompletedProcess:
    return _run(["buildah", "run", "--isolation=chroot", ctr, "--", *cmd], **kw)


def _get(url: str, timeout_s: float = 1.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:   # noqa: S310 (loopback only)
            return resp.status, resp.read()
    except Exception:
        return 0, b""


def _wait(url: str, *, proc: subprocess.Popen | None = None, log: Path | None = None,
          deadline_s: float = 60.0, want=lambda body: True) -> bytes:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {url} answered:\n"
                                 + (log.read_text()[-4000:] if log else ""))
        status, body = _get(url)
        if status == 200 and want(body):
            return body
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer in {deadline_s} s:\n" + (log.read_text()[-4000:] if log else ""))


def _stop(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def engine(tmp_path: Path):
    """An engine emulator on the host's loopback (vLLM metric names)."""
    port = free_port()
    log = tmp_path / "engine.log"
    proc = subprocess.Popen(HETEROSCALE + ["emulate-engine", "--role", "decode", "--gpu", "H20", "--model", "8b",
                                           "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=log.open("w"))
    try:
        _wait(f"http://127.0.0.1:{port}/metrics", proc=proc, log=log)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)


def test_image_runs_as_a_numeric_non_root_user(built: Built, container: str):
    config = json.loads(_run(["buildah", "inspect", "--type", "image", built.image]).stdout)["OCIv1"]["config"]
    uid, _, gid = config["User"].partition(":")
    assert uid.isdigit() and gid.isdigit() and int(uid) > 0 and int(gid) > 0, config["User"]
    assert config["Entrypoint"] == ["heteroscale"]
    assert {"9400/tcp", "9500/tcp"} <= set(config["ExposedPorts"])
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert config["Labels"]["org.opencontainers.image.version"] == VERSION
    ids = _in(container, "python3", "-c", "import os; print(os.getuid(), os.getgid())").stdout.split()
    assert ids == [uid, gid]


def test_cli_version_in_the_image(container: str):
    out = _in(container, "heteroscale", "--version")
    assert out.stdout.strip() == f"heteroscale {VERSION}"


def test_the_simulator_is_not_in_the_image_and_says_so(container: str):
    out = _in(container, "heteroscale", "simulate", "--help", check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "needs the sim extra" in out.stderr and "pip install 'heteroscale[sim]'" in out.stderr


CONTENTS = r"""
import importlib.metadata as m, importlib.resources as r, importlib.util, json, os, shutil, sys
tree = list(os.walk("/opt/heteroscale"))
wheels = [os.path.join(d, f) for top in ("/opt", "/tmp", "/root", "/usr", "/var", "/wheelhouse")
          for d, _, files in os.walk(top) for f in files if f.endswith(".whl")]
print(json.dumps({
    "prefix": sys.prefix,
    "pip_module": importlib.util.find_spec("pip") is not None,
    "dists": sorted(d.metadata["Name"].lower().replace("_", "-") for d in m.distributions()),
    "pycache": [d for d, _, _ in tree if os.path.basename(d) == "__pycache__"],
    "test_dirs": [d for d, _, _ in tree if os.path.basename(d) in ("tests", "test")],
    "wheels": wheels,
    "wheelhouse": os.path.exists("/wheelhouse"),
    "tools": sorted(t for t in ("pip", "pip3", "gcc", "cc", "make", "git") if shutil.which(t)),
    "top_level": sorted({f.parts[0] for f in m.distribution("heteroscale").files if f.parts[0] != ".."}),
    "static": sorted(p.name for p in (r.files("heteroscale.coordinator") / "static").iterdir()),
    "demo": sorted(n for n in ("demo.html", "topology.yaml", "azure_conv_sample.csv")
                   if (r.files("heteroscale.demo") / n).is_file()),
    "package_dir": str(r.files("heteroscale")),
}))
"""


def test_image_holds_the_package_and_no_build_leftovers(container: str):
    facts = json.loads(_in(container, "python3", "-c", CONTENTS).stdout)
    assert facts["prefix"] == "/opt/heteroscale"
    assert facts["package_dir"].startswith("/opt/heteroscale/lib/python3")
    # one import name; every file the commands read at run time is in the installed copy
    assert [n for n in facts["top_level"] if not n.endswith(".dist-info")] == ["heteroscale"]
    assert {"index.html", "app.js", "style.css"} <= set(facts["static"])
    assert facts["demo"] == ["azure_conv_sample.csv", "demo.html", "topology.yaml"]
    assert {"heteroscale", "aiohttp", "prometheus-client", "kubernetes", "grpcio"} <= set(facts["dists"])
    assert not {"numpy", "matplotlib"} & set(facts["dists"])          # the sim extra stays out
    # nothing to build or install with, and nothing left from the build
    assert not facts["pip_module"] and not {"pip", "setuptools", "wheel"} & set(facts["dists"])
    assert facts["tools"] == []
    assert facts["wheels"] == [] and not facts["wheelhouse"]
    assert facts["pycache"] == [] and facts["test_dirs"] == []


def test_build_context_is_only_the_wheelhouse(built: Built, tmp_path: Path):
    """What .dockerignore lets into the context, as buildah reads it: the wheelhouse, nothing else."""
    probe = tmp_path / "Containerfile"
    probe.write_text(f"FROM {built.base}\nCOPY . /context/\n")
    tag = f"localhost/heteroscale-context-probe:{uuid.uuid4().hex[:8]}"
    _run(["buildah", "bud", "--isolation=chroot", "--layers=false", "--quiet", "-f", str(probe), "-t", tag,
          str(REPO)], timeout=600)
    ctr = _run(["buildah", "from", "--quiet", "--pull=never", tag]).stdout.strip()
    try:
        listing = _in(ctr, "python3", "-c", "import os, json; print(json.dumps(sorted("
                      "os.path.relpath(os.path.join(d, f), '/context') for d, _, fs in os.walk('/context') for f in fs)))")
    finally:
        _run(["buildah", "rm", ctr], check=False)
        _run(["buildah", "rmi", tag], check=False)
    files = json.loads(listing.stdout)
    assert any(f.startswith("build/image/wheelhouse/heteroscale-") for f in files), files[:20]
    assert [f for f in files if not f.startswith("build/image/wheelhouse/")] == []


def test_sidecar_in_the_image_scrapes_a_host_engine_and_answers_healthz(container: str, engine: str,
                                                                         tmp_path: Path):
    port = free_port()
    log = tmp_path / "sidecar.log"
    # chroot isolation shares the host's network: the sidecar reaches the engine on 127.0.0.1
    proc = subprocess.Popen(["buildah", "run", "--isolation=chroot", container, "--",
                             "heteroscale", "sidecar", "--engine", "vllm", "--engine-url", engine,
                             "--role", "decode", "--service", "chat", "--pod", "chat-decode-0",
                             "--listen", f"127.0.0.1:{port}", "--gpu-source", "none", "--interval", "0.5",
                             "--no-rdma"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        assert _wait(f"http://127.0.0.1:{port}/healthz", proc=proc, log=log)
        body = _wait(f"http://127.0.0.1:{port}/v1/report", proc=proc, log=log,
                     want=lambda b: json.loads(b).get("decode_tps") is not None)
        report = json.loads(body)
        assert report["pod"] == "chat-decode-0" and report["engine_up"] is True
        assert _get(f"http://127.0.0.1:{port}/readyz")[0] == 200
    finally:
        _stop(proc)       # buildah run ends its command with SIGKILL; podman's stop is checked below
    assert "Traceback" not in log.read_text()


@pytest.fixture(scope="session")
def podman(built: Built) -> list[str]:
    """The podman command line that runs containers here (runtime chosen by trying)."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (scripts/test-deps.sh installs it: apt-get install podman runc)")
    tried = []
    for runtime in ([], ["--runtime", "runc"], ["--runtime", "crun"]):
        if runtime and shutil.which(runtime[1]) is None:
            continue
        out = _run(["podman", *runtime, "run", "--rm", *PODMAN_LIMITS, "--read-only", "--network", "host",
                    built.image, "--version"], check=False)
        if out.returncode == 0:
            assert out.stdout.strip() == f"heteroscale {VERSION}"   # the ENTRYPOINT, as Kubernetes runs it
            return ["podman", *runtime]
        tried.append(f"{runtime[1] if runtime else 'default runtime'}: {_last_line(out.stderr)}")
    pytest.skip("podman cannot run containers here: " + "; ".join(tried))


WRITABLE = r"""
import json, os
result = {}
for path in ("/", "/opt/heteroscale", "/etc/heteroscale", "/tmp", "/var/tmp", "/run"):
    probe = os.path.join(path, ".write-probe")
    try:
        open(probe, "w").close()
        os.unlink(probe)
        result[path] = "writable"
    except OSError as e:
        result[path] = e.strerror
result["tmp_entries"] = sorted(os.listdir("/tmp"))
print(json.dumps(result))
"""


def test_sidecar_and_coordinator_on_read_only_root_filesystems(podman: list[str], built: Built, engine: str,
                                                                tmp_path: Path):
    """As manifests/ run them: read-only root; the sidecar has no writable path, the coordinator /tmp."""
    sidecar_port, coord_port = free_port(), free_port()
    tag = uuid.uuid4().hex[:8]
    names = {"sidecar": f"heteroscale-test-sidecar-{tag}", "coordinator": f"heteroscale-test-coordinator-{tag}"}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "coordinator": {"backend": "static", "interval_s": 1, "collect": {"timeout_s": 0.5},
                        "listen": f"127.0.0.1:{coord_port}"},      # lease file: the default, under /tmp
        "services": [{"name": "chat", "pd_ratio": "1:1", "target_decode_tps_per_instance": 1000,
                      "slo": {"tbt_s": 0.05}, "policy": {"warmup_s": 0},
                      "prefill": {"sidecars": [f"http://127.0.0.1:{free_port()}/v1/report"]},
                      "decode": {"sidecars": [f"http://127.0.0.1:{sidecar_port}/v1/report"]}}]}))
    config.chmod(0o644)
    run = [*podman, "run", "--rm", *PODMAN_LIMITS, "--network", "host", "--read-only", "--read-only-tmpfs=false"]
    logs = {name: tmp_path / f"{name}.log" for name in names}
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["sidecar"] = subprocess.Popen(
            run + ["--name", names["sidecar"], built.image, "sidecar", "--engine", "vllm", "--engine-url", engine,
                   "--role", "decode", "--service", "chat", "--pod", "chat-decode-0",
                   "--listen", f"127.0.0.1:{sidecar_port}", "--gpu-source", "none", "--interval", "0.5",
                   "--no-rdma"],
            stdout=logs["sidecar"].open("w"), stderr=subprocess.STDOUT)
        procs["coordinator"] = subprocess.Popen(
            run + ["--name", names["coordinator"], "--tmpfs", "/tmp:rw,mode=1777,size=64m",
                   "--volume", f"{config}:/etc/heteroscale/config.yaml:ro", built.image,
                   "coordinator", "--config", "/etc/heteroscale/config.yaml", "--identity", "image-coordinator"],
            stdout=logs["coordinator"].open("w"), stderr=subprocess.STDOUT)
        _wait(f"http://127.0.0.1:{sidecar_port}/healthz", proc=procs["sidecar"], log=logs["sidecar"])
        _wait(f"http://127.0.0.1:{coord_port}/healthz", proc=procs["coordinator"], log=logs["coordinator"])
        body = _wait(f"http://127.0.0.1:{coord_port}/api/v1/status", proc=procs["coordinator"],
                     log=logs["coordinator"], deadline_s=90,
                     want=lambda b: json.loads(b)["leader"] is True
                     and json.loads(b)["services"][0]["reports"]["fresh_decode"] == 1)
        status = json.loads(body)
        assert status["identity"] == "image-coordinator" and status["backend"] == "static"
        assert status["services"][0]["decode"]["current"] == 1

        writable = {name: json.loads(_run([*podman, "exec", names[name], "python3", "-c", WRITABLE]).stdout)
                    for name in names}
        for name in names:
            for path in ("/", "/opt/heteroscale", "/var/tmp", "/run"):
                assert writable[name][path] == "Read-only file system", (name, path, writable[name])
        assert writable["coordinator"]["/etc/heteroscale"] == "Read-only file system"
        assert writable["coordinator"]["/tmp"] == "writable"
        assert any(entry.endswith(".lease") for entry in writable["coordinator"]["tmp_entries"]), writable
        assert writable["sidecar"]["/tmp"] == "Read-only file system"

        # /tmp is the coordinator's one writable need: without it, one line and exit 2.
        bare = _run(run + ["--volume", f"{config}:/etc/heteroscale/config.yaml:ro", built.image, "coordinator",
                           "--config", "/etc/heteroscale/config.yaml", "--listen", f"127.0.0.1:{free_port()}"],
                    check=False, timeout=120)
        assert bare.returncode == 2, bare.stdout + bare.stderr
        assert len(bare.stderr.strip().splitlines()) == 1 and "temporary directory" in bare.stderr, bare.stderr

        # SIGTERM (podman stop, as the kubelet does): both exit 0
        for name in ("coordinator", "sidecar"):
            _run([*podman, "stop", "--time", "20", names[name]], timeout=60)
            assert procs[name].wait(60) == 0, logs[name].read_text()[-4000:]
    finally:
        for name, proc in procs.items():
            if proc.poll() is None:
                _run([*podman, "rm", "--force", names[name]], check=False, timeout=60)
                proc.send_signal(signal.SIGTERM)
                _stop(proc)
    for name in names:
        text = logs[name].read_text()
        assert "Traceback" not in text and "Read-only file system" not in text, text[-4000:]
