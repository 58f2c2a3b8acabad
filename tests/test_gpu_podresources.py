"""The kubelet pod-resources client, against a real gRPC server on a unix socket.

The kubelet cannot run here, so a grpcio server stands in for it, speaking the
same service and method. Its answers are encoded by Google's protobuf library
from a descriptor with kubelet's field numbers (plus a newer-kubelet field our
decoder must skip), so the hand-written decoder is checked against an
independent encoder.
"""

from __future__ import annotations

from concurrent import futures

import pytest
from hypothesis import given, settings, strategies as st

from heteroscale.sidecar.gpu.podresources import (PodResourcesError, decode_list_response, gpu_ids_for,
                                      query_gpu_ids)

grpc = pytest.importorskip("grpc")
pytest.importorskip("google.protobuf")
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory  # noqa: E402


def _messages():
    f = descriptor_pb2.FileDescriptorProto(name="podresources_test.proto", package="v1", syntax="proto3")
    T = descriptor_pb2.FieldDescriptorProto

    def msg(name, *fields):
        m = f.message_type.add(name=name)
        for fname, number, ftype, label, tname in fields:
            fld = m.field.add(name=fname, number=number, type=ftype, label=label)
            if tname:
                fld.type_name = tname

    rep, opt = T.LABEL_REPEATED, T.LABEL_OPTIONAL
    msg("TopologyInfo", ("numa", 1, T.TYPE_INT64, rep, None))
    msg("ContainerDevices", ("resource_name", 1, T.TYPE_STRING, opt, None),
        ("device_ids", 2, T.TYPE_STRING, rep, None),
        ("topology", 3, T.TYPE_MESSAGE, opt, ".v1.TopologyInfo"))
    msg("ContainerResources", ("name", 1, T.TYPE_STRING, opt, None),
        ("devices", 2, T.TYPE_MESSAGE, rep, ".v1.ContainerDevices"),
        ("cpu_ids", 3, T.TYPE_INT64, rep, None))
    msg("PodResources", ("name", 1, T.TYPE_STRING, opt, None),
        ("namespace", 2, T.TYPE_STRING, opt, None),
        ("containers", 3, T.TYPE_MESSAGE, rep, ".v1.ContainerResources"))
    msg("ListPodResourcesResponse", ("pod_resources", 1, T.TYPE_MESSAGE, rep, ".v1.PodResources"))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("v1.ListPodResourcesResponse"))


ListResponse = _messages()


def _response() -> bytes:
    resp = ListResponse()
    pod = resp.pod_resources.add(name="chat-decode-7", namespace="llm")
    engine = pod.containers.add(name="vllm", cpu_ids=[2, 3])
    dev = engine.devices.add(resource_name="nvidia.com/gpu", device_ids=["GPU-aaaa", "GPU-bbbb"])
    dev.topology.numa.extend([0])
    engine.devices.add(resource_name="rdma/hca", device_ids=["mlx5_0"])
    pod.containers.add(name="heteroscale-sidecar")
    other = resp.pod_resources.add(name="chat-decode-8", namespace="llm")
    other.containers.add(name="vllm").devices.add(resource_name="nvidia.com/gpu", device_ids=["GPU-cccc"])
    return resp.SerializeToString()


@pytest.fixture
def kubelet(tmp_path):
    """A gRPC server on a unix socket answering v1.PodResourcesLister/List."""
    path = tmp_path / "kubelet.sock"
    payload = {"bytes": _response()}

    def list_handler(request, context):
        return payload["bytes"]

    handler = grpc.method_handlers_generic_handler("v1.PodResourcesLister", {
        "List": grpc.unary_unary_rpc_method_handler(
            list_handler, request_deserializer=lambda raw: raw, response_serializer=lambda b: b),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"unix://{path}")
    server.start()
    yield str(path), payload
    server.stop(grace=None)


async def test_engine_container_gpus_come_from_the_kubelet(kubelet):
    path, _ = kubelet
    ids = await query_gpu_ids(pod="chat-decode-7", namespace="llm", container="vllm", socket_path=path)
    assert ids == ("GPU-aaaa", "GPU-bbbb")
    # Whole pod (no container named): the same two, the RDMA device is not a GPU.
    assert await query_gpu_ids(pod="chat-decode-7", namespace="llm", socket_path=path) == ("GPU-aaaa", "GPU-bbbb")
    # The sidecar's own container holds none.
    assert await query_gpu_ids(pod="chat-decode-7", namespace="llm", container="heteroscale-sidecar",
                               socket_path=path) == ()


async def test_unknown_pod_is_an_error_not_every_gpu(kubelet):
    path, _ = kubelet
    with pytest.raises(PodResourcesError, match="no pod llm/chat-decode-9"):
        await query_gpu_ids(pod="chat-decode-9", namespace="llm", socket_path=path)


async def test_malformed_answer_is_reported(kubelet):
    path, payload = kubelet
    payload["bytes"] = b"\x0a\xff\xff"          # field 1, length far past the end
    with pytest.raises(PodResourcesError, match="malformed"):
        await query_gpu_ids(pod="chat-decode-7", namespace="llm", socket_path=path)


async def test_missing_socket_fails_fast_and_clearly(tmp_path):
    with pytest.raises(PodResourcesError, match="kubelet pod-resources"):
        await query_gpu_ids(pod="p", namespace="n", socket_path=str(tmp_path / "absent.sock"), timeout_s=0.5)


def test_decoder_matches_protobuf_encoder():
    pods = decode_list_response(_response())
    assert [p.name for p in pods] == ["chat-decode-7", "chat-decode-8"]
    assert gpu_ids_for(pods, pod="chat-decode-8", namespace="llm") == ("GPU-cccc",)
    assert decode_list_response(b"") == ()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_decoder_raises_only_value_error_on_garbage(blob):
    try:
        decode_list_response(blob)
    except ValueError:
        pass
