"""The /v1/report contract: round trip and refusal of untrustworthy documents."""

from __future__ import annotations

import json

import pytest

from heteroscale.report import GpuReading, ReportFormatError, SidecarReport


def _report(**over) -> SidecarReport:
    base = dict(service="chat", role="decode", pod="chat-decode-0", engine="vllm",
                engine_up=True, stale=False, observed_at=1_700_000_000.0, window_s=10.0,
                decode_tps=2400.0, tbt_p90_s=0.031,
                gpus=(GpuReading(gpu="0", utilization_ratio=0.86),))
    base.update(over)
    return SidecarReport(**base)


def test_round_trip_through_json():
    report = _report()
    again = SidecarReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again == report


def test_unknown_keys_are_ignored():
    doc = _report().to_dict() | {"future_field": 1}
    assert SidecarReport.from_dict(doc).decode_tps == 2400.0


@pytest.mark.parametrize("patch, message", [
    ({"role": "router"}, "role"),
    ({"decode_tps": -1.0}, "negative"),
    ({"decode_tps": "fast"}, "number"),
    ({"observed_at": None}, "required"),
    ({"engine_up": 1}, "boolean"),
    ({"gpus": [{"gpu": 0}]}, "gpus"),
])
def test_bad_documents_are_refused(patch, message):
    doc = _report().to_dict() | patch
    with pytest.raises(ReportFormatError, match=message):
        SidecarReport.from_dict(doc)


def test_nan_is_refused():
    doc = _report().to_dict() | {"decode_tps": float("nan")}
    with pytest.raises(ReportFormatError, match="finite"):
        SidecarReport.from_dict(doc)
