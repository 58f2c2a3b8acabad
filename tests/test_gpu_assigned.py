"""GPUs learnt after start-up: ``--gpus file:PATH`` and ``--gpus kubelet``.

The NVML side runs on the faithful fake pynvml (no GPU here); the kubelet side on
the real gRPC server of tests/test_gpu_podresources.py.
"""

from __future__ import annotations

import logging

import pytest

from heteroscale.errors import UsageError
from heteroscale.sidecar.gpu.assigned import AssignedGpuReader, assignment_method, file_resolver
from heteroscale.sidecar.gpu.factory import open_reader
from tests.test_gpu_fake_pynvml import UUID_A, UUID_B, UUID_C, FakeNvml, three_gpus
from tests.test_gpu_podresources import ListResponse, kubelet  # noqa: F401  (fixture)


class Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


@pytest.mark.parametrize("gpus, method", [
    (None, None), ("0,1", None), (("GPU-a",), None), ("kubelet", "kubelet"),
    (("kubelet",), "kubelet"), (("file:/run/heteroscale/gpus",), "file"),
])
def test_assignment_method(gpus, method):
    assert assignment_method(gpus) == method


def test_deferred_methods_stand_alone():
    with pytest.raises(UsageError, match="stand alone"):
        assignment_method(("0", "kubelet"))


async def test_file_written_late_then_nvml_reads_exactly_those_gpus(tmp_path, caplog):
    fake = FakeNvml(three_gpus())
    path = tmp_path / "gpus"
    reader = await open_reader("nvml", gpus=(f"file:{path}",), env={}, nvml=fake.module)
    clock = Clock()
    reader._clock = clock                       # drive the retry timer by hand
    caplog.set_level(logging.INFO, logger="heteroscale.gpu")
    assert reader.mode == "pending"
    assert await reader.read() == ()
    assert await reader.read() == ()            # within the retry interval: not even asked
    assert "not written yet" in reader.reason
    path.write_text(f"{UUID_C},{UUID_A}\n")       # the engine container starts and writes its list
    assert await reader.read() == ()            # still inside the retry interval
    clock.now_s += 5.0
    readings = await reader.read()
    assert reader.mode == "nvml"
    assert [r.gpu for r in readings] == [UUID_C, UUID_A]
    assert readings[1].utilization_ratio == pytest.approx(0.86)
    # each state logged once, however many reads
    messages = [r.getMessage() for r in caplog.records]
    assert sum("not known yet" in m for m in messages) == 1
    assert sum("GPU assignment (file): " in m for m in messages) == 1
    await reader.close()


@pytest.mark.parametrize("content, reason", [
    ("all", "holds no specific GPU"),
    ("void", "holds no specific GPU"),
    ("GPU-8f3a1c2e,banana", "neither a GPU index nor"),
])
async def test_file_without_a_usable_list_gives_no_gpu_mode(tmp_path, content, reason):
    path = tmp_path / "gpus"
    path.write_text(content)
    reader = await open_reader("nvml", gpus=(f"file:{path}",), env={}, nvml=FakeNvml(three_gpus()).module)
    assert await reader.read() == ()
    assert reader.mode == "none"
    assert reason in reader.reason


async def test_engine_gpus_invisible_to_the_sidecar_is_explained(tmp_path):
    path = tmp_path / "gpus"
    path.write_text("GPU-deadbeef-0000-0000-0000-000000000000")
    reader = await open_reader("nvml", gpus=(f"file:{path}",), env={}, nvml=FakeNvml(three_gpus()).module)
    assert await reader.read() == ()
    assert reader.mode == "none"
    assert "not visible to the sidecar" in reader.reason


async def test_kubelet_method_reads_this_pods_gpus(kubelet, tmp_path):  # noqa: F811
    path, payload = kubelet
    # Point the stand-in kubelet's answer at GPUs the fake NVML has.
    resp = ListResponse()
    pod = resp.pod_resources.add(name="chat-decode-7", namespace="llm")
    pod.containers.add(name="engine").devices.add(resource_name="nvidia.com/gpu", device_ids=[UUID_B])
    pod.containers.add(name="heteroscale-sidecar")
    payload["bytes"] = resp.SerializeToString()
    env = {"POD_NAME": "chat-decode-7", "POD_NAMESPACE": "llm", "HETEROSCALE_PODRESOURCES_SOCKET": path}
    reader = await open_reader("nvml", gpus="kubelet", env=env, nvml=FakeNvml(three_gpus()).module)
    readings = await reader.read()
    assert reader.mode == "nvml"
    assert [r.gpu for r in readings] == [UUID_B]
    await reader.close()


async def test_kubelet_method_waits_for_the_pod_to_be_admitted(kubelet):  # noqa: F811
    path, _ = kubelet
    env = {"POD_NAME": "not-admitted-yet", "POD_NAMESPACE": "llm", "HETEROSCALE_PODRESOURCES_SOCKET": path}
    reader = await open_reader("nvml", gpus="kubelet", env=env, nvml=FakeNvml(three_gpus()).module)
    assert await reader.read() == ()
    assert reader.mode == "pending"
    assert "no pod llm/not-admitted-yet" in reader.reason


async def test_kubelet_method_without_downward_api_env_is_a_usage_error():
    with pytest.raises(UsageError, match="POD_NAME and POD_NAMESPACE"):
        await open_reader("nvml", gpus="kubelet", env={}, nvml=FakeNvml(three_gpus()).module)


async def test_file_method_needs_a_path():
    with pytest.raises(UsageError, match="needs a path"):
        file_resolver("")


async def test_pending_reader_closes_cleanly():
    async def never():
        from heteroscale.sidecar.gpu.assigned import NotYetKnown
        raise NotYetKnown("not yet")

    async def opener(uuids):
        raise AssertionError("must not open")

    reader = AssignedGpuReader(method="file", resolve=never, open_reader=opener)
    assert await reader.read() == ()
    await reader.close()
