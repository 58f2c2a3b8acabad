"""Fuzz the parser path: random text and mutated real-format pages never raise
anything but ScrapeError, and a successful parse always yields sane values."""

from __future__ import annotations

import math
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from heteroscale.engine_adapters import sglang, vllm
from heteroscale.errors import ScrapeError

DATA = Path(__file__).resolve().parent / "data"
PAGES = [(DATA / n).read_text() for n in ("vllm_constructed_dp1.txt", "vllm_constructed_dp2.txt",
                                          "vllm_constructed_decode_kv_consumer.txt",
                                          "sglang_0.5.23_decode_dp2_tp2_priority.txt", "sglang_0.5.23_prefill_tp1.txt",
                                          "sglang_pre_realtime_decode_dp2_tp2.txt", "sglang_pre_realtime_prefill_tp1.txt")]
REASONS = {"parse", "empty", "wrong_engine", "too_large"}
ALPHABET = st.sampled_from(list('{}="\\,# \n\tle+Inf-0123456789.eE_:abcvllmsglang') + ["\x00", "é", "\r"])


def check(text: str) -> None:
    for adapter in (vllm, sglang):
        try:
            snap = adapter.parse(text)
        except ScrapeError as exc:
            assert exc.reason in REASONS
            continue
        for value in list(snap.counters.values()) + list(snap.gauges.values()):
            assert math.isfinite(value) and value >= 0
        for h in snap.histograms.values():
            assert h.bounds[-1] == math.inf
            assert all(b <= a for b, a in zip(h.cumulative, h.cumulative[1:]))


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=ALPHABET, max_size=400))
def test_random_text(text):
    check(text)


@st.composite
def mutated(draw):
    page = draw(st.sampled_from(PAGES))
    lines = page.split("\n")
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["delete_char", "insert", "drop_line", "dup_line", "swap", "number", "cut"]))
        i = draw(st.integers(0, max(0, len(lines) - 1)))
        line = lines[i]
        if op == "delete_char" and line:
            j = draw(st.integers(0, len(line) - 1))
            lines[i] = line[:j] + line[j + 1:]
        elif op == "insert":
            j = draw(st.integers(0, len(line)))
            lines[i] = line[:j] + draw(st.text(alphabet=ALPHABET, min_size=1, max_size=5)) + line[j:]
        elif op == "drop_line":
            del lines[i]
        elif op == "dup_line":
            lines.insert(i, line)
        elif op == "swap":
            k = draw(st.integers(0, max(0, len(lines) - 1)))
            lines[i], lines[k] = lines[k], lines[i]
        elif op == "number" and " " in line:
            value = draw(st.sampled_from(["NaN", "+Inf", "-Inf", "-1", "1e308", "0x10", "1_0", "", "٣"]))
            lines[i] = line.rsplit(" ", 1)[0] + " " + value
        elif op == "cut":
            text = "\n".join(lines)
            return text[: draw(st.integers(0, len(text)))]
        if not lines:
            break
    return "\n".join(lines)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_pages(text):
    check(text)
