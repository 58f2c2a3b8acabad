"""Which GPUs belong to this pod's engine: the kubelet pod-resources API.

A sidecar container without a GPU request sees no GPUs through the device
plugin, and even with ``NVIDIA_VISIBLE_DEVICES=all`` it sees every GPU of the
node. The kubelet knows exactly which devices it gave each container: its
pod-resources gRPC service (``v1.PodResourcesLister/List`` on
``/var/lib/kubelet/pod-resources/kubelet.sock``, GA since Kubernetes 1.28, the
same source dcgm-exporter uses) lists, per pod and container, the device IDs of
each extended resource. For ``nvidia.com/gpu`` the NVIDIA device plugin hands
out GPU UUIDs (``GPU-…``, or ``MIG-…`` for MIG slices), which NVML can select.

The response is decoded by a small protobuf wire-format reader (four message
types, six fields) rather than generated stubs, so the only dependency is
grpcio. Field numbers follow kubelet's ``podresources/v1/api.proto``;
unknown fields (topology, cpu_ids, memory, dynamic resources of newer kubelets)
are skipped.

Limits (also in docs/gpu.md): the socket is owned by root, so the sidecar needs
to run with a UID or group that can write to it (or as root with every
capability dropped); Pod Security "baseline" forbids the hostPath mount; a GPU
shared through time-slicing shows the same UUID in several pods.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from heteroscale.errors import TransientError

DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
GPU_RESOURCE = "nvidia.com/gpu"
_LIST_METHOD = "/v1.PodResourcesLister/List"


class PodResourcesError(TransientError):
    """The kubelet could not be asked, or did not know this pod."""


@dataclass(frozen=True)
class ContainerDevices:
    resource_name: str
    device_ids: tuple[str, ...]


@dataclass(frozen=True)
class ContainerResources:
    name: str
    devices: tuple[ContainerDevices, ...]


@dataclass(frozen=True)
class PodResources:
    name: str
    namespace: str
    containers: tuple[ContainerResources, ...]


# --- protobuf wire format (pure) ---------------------------------------------------------

def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(data: bytes):
    """Yield (field_number, wire_type, value) of one message; value is bytes for
    length-delimited fields and int otherwise. Groups (wire types 3, 4) are refused."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = int.from_bytes(data[pos:pos + 8], "little"), pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise ValueError("truncated field")
            value, pos = data[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = int.from_bytes(data[pos:pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(data):
            raise ValueError("truncated field")
        yield number, wire, value


def _strings(data: bytes) -> dict[int, list]:
    out: dict[int, list] = {}
    for number, wire, value in _fields(data):
        if wire == 2:
            out.setdefault(number, []).append(value)
    return out


def _devices(data: bytes) -> ContainerDevices:
    f = _strings(data)
    return ContainerDevices(
        resource_name=f.get(1, [b""])[0].decode(),
        device_ids=tuple(v.decode() for v in f.get(2, [])),
    )


def _container(data: bytes) -> ContainerResources:
    f = _strings(data)
    return ContainerResources(name=f.get(1, [b""])[0].decode(),
                              devices=tuple(_devices(d) for d in f.get(2, [])))


def _pod(data: bytes) -> PodResources:
    f = _strings(data)
    return PodResources(name=f.get(1, [b""])[0].decode(),
                        namespace=f.get(2, [b""])[0].decode(),
                        containers=tuple(_container(c) for c in f.get(3, [])))


def decode_list_response(data: bytes) -> tuple[PodResources, ...]:
    """Decode a ``ListPodResourcesResponse``; raises ValueError on a malformed message."""
    return tuple(_pod(p) for p in _strings(data).get(1, []))


def gpu_ids_for(pods: tuple[PodResources, ...], *, pod: str, namespace: str,
                container: str | None = None, resource: str = GPU_RESOURCE) -> tuple[str, ...]:
    """The device IDs of ``resource`` held by ``pod`` (one container, or all of them).

    Raises PodResourcesError when the kubelet does not list the pod (not admitted
    yet, or the wrong name) so the caller retries instead of reading every GPU.
    """
    for entry in pods:
        if entry.name == pod and entry.namespace == namespace:
            ids: list[str] = []
            for c in entry.containers:
                if container is not None and c.name != container:
                    continue
                for d in c.devices:
                    if d.resource_name == resource:
                        ids.extend(i for i in d.device_ids if i not in ids)
            return tuple(ids)
    raise PodResourcesError(f"kubelet lists no pod {namespace}/{pod}")


# --- the call (I/O) ----------------------------------------------------------------------

def _list_blocking(socket_path: str, timeout_s: float) -> bytes:
    import grpc  # imported here: only sidecars that use this method need it loaded

    with grpc.insecure_channel(f"unix://{socket_path}") as channel:
        call = channel.unary_unary(_LIST_METHOD,
                                   request_serializer=lambda _: b"",
                                   response_deserializer=lambda raw: raw)
        try:
            return call(None, timeout=timeout_s)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            raise PodResourcesError(f"kubelet pod-resources {socket_path}: {code}") from exc


async def query_gpu_ids(*, pod: str, namespace: str, container: str | None = None,
                        socket_path: str = DEFAULT_SOCKET, timeout_s: float = 2.0,
                        resource: str = GPU_RESOURCE) -> tuple[str, ...]:
    """Ask the kubelet which ``resource`` devices this pod's engine holds (off the event loop)."""
    raw = await asyncio.wait_for(asyncio.to_thread(_list_blocking, socket_path, timeout_s),
                                 timeout=timeout_s + 1.0)
    try:
        pods = decode_list_response(raw)
    except ValueError as exc:
        raise PodResourcesError(f"kubelet pod-resources answer is malformed: {exc}") from exc
    return gpu_ids_for(pods, pod=pod, namespace=namespace, container=container, resource=resource)
