"""A real Prometheus server on loopback for tests (Debian package ``prometheus``).

``PrometheusServer(tmp_path, targets={job: [host:port, ...]}, scrape_interval_s=1)``
writes a config, starts ``prometheus`` with its TSDB in the temp dir, waits until it
answers ``/-/ready``, and stops it (SIGTERM, then SIGKILL) on ``close()``. Tests skip
when the binary is missing.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Mapping, Sequence

import pytest
import yaml

from heteroscale.net import free_port




def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.skip("prometheus is not installed (Debian package 'prometheus'; scripts/test-deps.sh installs it)")
    return path


class PrometheusServer:
    def __init__(self, workdir: Path, *, targets: Mapping[str, Sequence[str]],
                 scrape_interval_s: float = 1.0, labels: Mapping[str, Mapping[str, str]] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": f"{scrape_interval_s:g}s", "evaluation_interval": f"{scrape_interval_s:g}s"},
            "scrape_configs": [
                {"job_name": job, "scrape_interval": f"{scrape_interval_s:g}s",
                 "static_configs": [{"targets": list(addrs), "labels": dict((labels or {}).get(job, {}))}]}
                for job, addrs in targets.items()
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self._log = open(workdir / "prometheus.log", "wb")
        self._proc = subprocess.Popen(
            [prometheus_binary(), f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--storage.tsdb.retention.time=1h", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready(timeout_s=30.0)

    def _wait_ready(self, *, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self._proc.returncode}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("prometheus did not become ready")

    def query(self, expr: str) -> list[dict]:
        qs = urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{qs}", timeout=5) as resp:
            doc = json.load(resp)
        assert doc["status"] == "success", doc
        return doc["data"]["result"]

    def wait_for(self, expr: str, *, timeout_s: float = 20.0) -> list[dict]:
        """Poll an instant query until it returns at least one series."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            result = self.query(expr)
            if result:
                return result
            time.sleep(0.5)
        raise AssertionError(f"no series for {expr!r} within {timeout_s}s")

    def targets_health(self) -> list[dict]:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=5) as resp:
            return json.load(resp)["data"]["activeTargets"]

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._log.close()
