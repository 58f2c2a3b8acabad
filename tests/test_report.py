"""The /v1/report contract: round trip and refusal of untrustworthy documents."""

from __future__ import annotations

import json

import pytest

import math
from dataclasses import fields

from hypothesis import given, settings
from hypothesis import strategies as st

from heteroscale.report import (
    BOUNDS, MAX_JSON_DEPTH, MAX_REPORT_BYTES, SIGNAL_FIELDS, UNKNOWN_ENGINE, EngineSignals, GpuReading,
    ReportFormatError, ReportJsonError, SidecarReport, clean_signals, finite_json, parse_report_json,
)


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
    ({"decode_tps": -1.0}, "outside"),
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


# -- ARCHITECTURE §3.2: what the contract promises, and no more ---------------------------

ARCH_FIELDS = dict(service="chat", role="decode", pod="p-0", engine_up=True, decode_tps=1.0, prefill_tps=2.0,
                   prefill_uncached_tps=1.5, ttft_p90_s=0.2, tbt_p90_s=0.03, observed_at=1.7e9, window_s=5.0)


def test_a_report_with_exactly_the_architecture_fields_is_accepted():
    # §3.2 lists no 'engine' and no 'stale'; 'stale' is required by this contract (schema 1)
    # because acting on a report must be an explicit decision, 'engine' is not.
    report = SidecarReport.from_dict(ARCH_FIELDS | {"stale": False})
    assert report.engine == UNKNOWN_ENGINE and report.decode_tps == 1.0
    assert SidecarReport.from_dict(ARCH_FIELDS | {"stale": False, "engine": None}).engine == UNKNOWN_ENGINE


def test_new_optional_fields_round_trip():
    report = _report(requests_deferred=3.0, requests_by_kv_stage={"in_progress": 2.0, "waiting_to_start": 1.0},
                     preemptions_per_s=0.5)
    assert parse_report_json(json.dumps(report.to_dict())) == report
    # an older sidecar leaves them out: not measured
    old = {k: v for k, v in report.to_dict().items()
           if k not in ("requests_deferred", "requests_by_kv_stage", "preemptions_per_s")}
    again = SidecarReport.from_dict(old)
    assert again.requests_deferred is None and again.requests_by_kv_stage == {} and again.preemptions_per_s is None


def test_from_signals_copies_every_signal_field():
    values = {name: ({"decode_transfer": 4.0} if name == "requests_by_kv_stage" else 0.5) for name in SIGNAL_FIELDS}
    report = SidecarReport.from_signals(EngineSignals(**values), service="s", role="decode", pod="p",
                                        engine_up=True, stale=False, observed_at=1.0, window_s=5.0)
    assert {name: getattr(report, name) for name in SIGNAL_FIELDS} == values
    # one definition: the report's signal fields are EngineSignals' fields
    assert set(SIGNAL_FIELDS) <= {f.name for f in fields(SidecarReport)}


@pytest.mark.parametrize("name", sorted(n for n in BOUNDS if "." not in n))
def test_every_bound_is_enforced_at_both_ends(name):
    lo, hi = BOUNDS[name]
    base = _report().to_dict()
    for ok in (lo, hi):
        assert getattr(SidecarReport.from_dict(base | {name: ok}), name) == ok
    for bad in (hi * 1.001 + 1, lo - 1 if lo == 0 else lo * 1.001, math.inf, -math.inf, 10 ** 400):
        with pytest.raises(ReportFormatError):
            SidecarReport.from_dict(base | {name: bad})


@pytest.mark.parametrize("patch", [
    {"service": "x" * 254}, {"engine": ""}, {"engine": "e" * 65}, {"node": 5}, {"gpu_mode": 1},
    {"gpus": [{"gpu": "0", "utilization_ratio": 1.5}]}, {"gpus": [{"gpu": "0"}] * 65},
    {"gpus": [{"gpu": "0", "memory_used_bytes": -1}]},
    {"requests_by_kv_stage": {"a": -1}}, {"requests_by_kv_stage": {"a": float("inf")}},
    {"requests_by_kv_stage": [1]}, {"requests_by_kv_stage": {str(i): 1 for i in range(33)}},
    {"kv_transfer": {"sources": {"engine": {"bytes_per_second": float("inf")}}}},
    {"kv_transfer": {"x": 10 ** 30}}, {"schema_version": True}, {"schema_version": 0},
])
def test_out_of_contract_values_are_refused(patch):
    with pytest.raises(ReportFormatError):
        SidecarReport.from_dict(_report().to_dict() | patch)


def test_clean_signals_drops_what_the_contract_refuses():
    dirty = EngineSignals(decode_tps=math.inf, prefill_tps=2e9, requests_running=3.0, kv_cache_usage_ratio=1.2,
                          ttft_p90_s=float("nan"), requests_by_kv_stage={"ok": 1.0, "bad": -2.0})
    clean, dropped = clean_signals(dirty)
    assert clean == EngineSignals(requests_running=3.0, requests_by_kv_stage={"ok": 1.0})
    assert set(dropped) == {"decode_tps", "prefill_tps", "kv_cache_usage_ratio", "ttft_p90_s",
                            "requests_by_kv_stage"}
    assert clean_signals(clean) == (clean, ())


def test_finite_json_replaces_non_finite_numbers():
    assert finite_json({"a": [1.0, math.inf, {"b": math.nan}], "c": "x"}) == {"a": [1.0, None, {"b": None}], "c": "x"}


# -- decoding a body ---------------------------------------------------------------------------

@pytest.mark.parametrize("body", [
    b"", b"not json", b"[1, 2]", b'"a string"', b"null",
    b'{"decode_tps": Infinity}', b"NaN", b"-Infinity",
    b"[" * 100_000 + b"]" * 100_000,                     # RecursionError inside json.loads
    b'{"kv_transfer": ' + b'{"a": ' * 40 + b"1" + b"}" * 40 + b"}",   # legal JSON, deeper than the limit
    b'{"observed_at": 1' + b"0" * 5000 + b"}",           # more digits than int() converts
    b"\xff\xfe\x00garbage",
    b" " * (MAX_REPORT_BYTES + 1),
])
def test_parse_report_json_refuses_every_bad_body_with_one_error_type(body):
    with pytest.raises(ReportFormatError):
        parse_report_json(body)


def test_parse_report_json_separates_json_from_contract_errors():
    with pytest.raises(ReportJsonError):
        parse_report_json(b'{"decode_tps": Infinity}')
    with pytest.raises(ReportFormatError) as err:
        parse_report_json(json.dumps(_report().to_dict() | {"decode_tps": -5}))
    assert not isinstance(err.value, ReportJsonError)
    doc = json.dumps(_report().to_dict() | {"kv_transfer": {"a": {"b": [1, 2, {"c": None}]}}})
    assert parse_report_json(doc.encode()).kv_transfer == {"a": {"b": [1, 2, {"c": None}]}}
    assert MAX_JSON_DEPTH >= 8


JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 30, 10 ** 30), st.text(max_size=10),
                      st.floats(allow_nan=True, allow_infinity=True))
JSON_VALUE = st.recursive(JSON_LEAF, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                              st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                          max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted({f.name for f in fields(SidecarReport)})), JSON_VALUE, max_size=12))
def test_any_document_is_a_report_or_a_format_error(patch):
    doc = _report().to_dict() | patch
    try:
        report = SidecarReport.from_dict(doc)
    except ReportFormatError:
        return
    for name in SIGNAL_FIELDS + ("observed_at", "window_s", "started_at"):
        value = getattr(report, name)
        if isinstance(value, float):
            assert math.isfinite(value)
    json.dumps(report.to_dict(), allow_nan=False)     # what it holds serialises as strict JSON
