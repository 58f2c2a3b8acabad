"""Seeded fuzzing of the sidecar's inputs and outputs (a helper, not a test module).

Two streams, each from a seeded ``random.Random`` so a failure is reproducible by its
seed and index:

* **engine pages**: every captured or constructed engine page in tests/data, mutated
  (characters deleted or inserted, lines dropped, duplicated, swapped or cut, values
  replaced by NaN / Inf / 1e308 / 1e400 / hex / underscores / non-ASCII digits, labels
  of 1 MiB, counters near the float limit on several engines, CRLF, NUL, binary), plus
  pure garbage. Each page goes through both engine adapters, the KV-connector parser,
  a rate window, the report (``SidecarReport.from_signals`` -> strict JSON ->
  ``parse_report_json``) and ``/metrics`` rendering.
* **report bodies**: a valid ``/v1/report`` document mutated (fields replaced by huge,
  negative, non-finite, wrongly typed or deeply nested values, removed, renamed), JSON
  text with ``Infinity``/``NaN`` tokens, nesting up to 100,000 deep, truncation, garbage
  bytes, oversize bodies. Each goes through ``parse_report_json``.

What must hold (``FuzzResult.ok``): nothing raises except the documented error types
(``ScrapeError`` for pages, ``ReportFormatError`` for reports); nothing non-finite comes
out (report JSON, ``/metrics`` samples of rates and quantiles, accepted reports); every
report the sidecar builds is accepted by the coordinator's parser.

``tests/test_sidecar_fuzz.py`` runs a short stream in the default suite;
``benchmarks/fuzz_bench.py`` runs >= 10,000 of each and records the counts.
"""

from __future__ import annotations

import json
import math
import random
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from heteroscale.engine_adapters import sglang, vllm
from heteroscale.engine_adapters.rates import SignalWindow
from heteroscale.errors import ScrapeError
from heteroscale.kv_transfer import connectors as kvc
from heteroscale.report import (
    BOUNDS, MAX_REPORT_BYTES, SIGNAL_FIELDS, GpuReading, ReportFormatError, SidecarReport, parse_report_json,
)
from heteroscale.sidecar.metrics import MetricsView, SidecarCollector

DATA = Path(__file__).resolve().parent / "data"
PAGE_FILES = sorted(p for p in DATA.glob("*.txt") if p.name.startswith(("vllm", "sglang", "kv_")))

SPECIAL_VALUES = ("NaN", "+Inf", "-Inf", "Inf", "1e308", "1.7e308", "-1", "1e400", "-1e400", "0x1p3", "1_000",
                  "\u0663", "", "inf", "Infinity", "9" * 400, "1e-400", "0", "4.9e-324", "nan", "+", "1e", "..")
GARBAGE_CHARS = '{}="\\,# \n\tle+Inf-0123456789.eE_:abcvllmsglang\x00\x01\u00e9\r\ufffd'


@dataclass
class FuzzResult:
    pages: int = 0
    pages_parsed: int = 0                                   # adapter parses that succeeded
    page_errors: Counter = field(default_factory=Counter)  # ScrapeError reasons
    reports: int = 0
    reports_accepted: int = 0
    reports_refused: int = 0
    crashes: list[str] = field(default_factory=list)        # an exception of an undocumented type
    non_finite: list[str] = field(default_factory=list)     # Infinity/NaN out of the sidecar
    rejected_own_reports: list[str] = field(default_factory=list)   # a sidecar report its coordinator refuses

    @property
    def ok(self) -> bool:
        return not (self.crashes or self.non_finite or self.rejected_own_reports)

    def summary(self) -> dict:
        return {"pages": self.pages, "pages_parsed": self.pages_parsed, "page_errors": dict(self.page_errors),
                "reports": self.reports, "reports_accepted": self.reports_accepted,
                "reports_refused": self.reports_refused, "crashes": len(self.crashes),
                "non_finite_out": len(self.non_finite), "own_reports_rejected": len(self.rejected_own_reports),
                "first_problems": (self.crashes + self.non_finite + self.rejected_own_reports)[:5]}


# -- pages ---------------------------------------------------------------------------------

def _mutate_page(rng: random.Random, page: str) -> str:
    lines = page.split("\n")
    for _ in range(rng.randint(1, 8)):
        if not lines:
            break
        op = rng.choice(("delete_char", "insert", "drop_line", "dup_line", "swap", "value", "value", "cut",
                         "huge_label", "overflow", "crlf", "nul", "type_line", "many_series"))
        i = rng.randrange(len(lines))
        line = lines[i]
        if op == "delete_char" and line:
            j = rng.randrange(len(line))
            lines[i] = line[:j] + line[j + 1:]
        elif op == "insert":
            j = rng.randint(0, len(line))
            lines[i] = line[:j] + "".join(rng.choice(GARBAGE_CHARS) for _ in range(rng.randint(1, 6))) + line[j:]
        elif op == "drop_line":
            del lines[i]
        elif op == "dup_line":
            lines.insert(i, line)
        elif op == "swap":
            k = rng.randrange(len(lines))
            lines[i], lines[k] = lines[k], lines[i]
        elif op == "value" and " " in line and not line.startswith("#"):
            lines[i] = line.rsplit(" ", 1)[0] + " " + rng.choice(SPECIAL_VALUES)
        elif op == "cut":
            text = "\n".join(lines)
            return text[: rng.randint(0, len(text))]
        elif op == "huge_label" and "{" in line and not line.startswith("#"):
            size = rng.choice((20_000, 1 << 20))
            lines[i] = line.replace("{", '{huge="' + "x" * size + '",', 1)
        elif op == "overflow" and " " in line and not line.startswith("#"):
            # the same series on several engines, each near the float limit: sums overflow
            name_labels = line.rsplit(" ", 1)[0]
            for engine in range(4):
                lines.insert(i, name_labels.replace("{", f'{{engine="x{engine}",', 1) + " 1.7e308")
        elif op == "crlf":
            lines[i] = line + "\r"
        elif op == "nul":
            lines[i] = line.replace(" ", " \x00", 1)
        elif op == "type_line" and line.startswith("# TYPE"):
            lines[i] = line.rsplit(" ", 1)[0] + " " + rng.choice(("gauge", "counter", "histogram", "summary",
                                                                    "untyped", "bogus"))
        elif op == "many_series" and "{" in line and not line.startswith("#"):
            lines[i:i + 1] = [line.replace("{", f'{{fz="{k}",', 1) for k in range(rng.randint(2, 200))]
    return "\n".join(lines)


def _garbage_page(rng: random.Random) -> str:
    kind = rng.choice(("chars", "bytes", "empty", "blank", "html", "json", "long_line", "comments"))
    if kind == "chars":
        return "".join(rng.choice(GARBAGE_CHARS) for _ in range(rng.randint(0, 2000)))
    if kind == "bytes":
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 2000))).decode("latin-1")
    if kind == "empty":
        return ""
    if kind == "blank":
        return " \n\t\n" * rng.randint(1, 50)
    if kind == "html":
        return "<html><body>502 Bad Gateway</body></html>\n"
    if kind == "json":
        return '{"vllm:num_requests_running": 3}\n'
    if kind == "long_line":
        return "vllm:num_requests_running{" + "a" * rng.choice((100, 20_000, 1 << 20)) + "} 1\n"
    return "# HELP vllm:x y\n# TYPE vllm:x gauge\n" * rng.randint(1, 20)


def pages(seed: int) -> Iterator[str]:
    rng = random.Random(seed)
    bases = [p.read_text() for p in PAGE_FILES]
    while True:
        if rng.random() < 0.1:
            yield _garbage_page(rng)
        else:
            yield _mutate_page(rng, rng.choice(bases))


# -- report bodies ------------------------------------------------------------------------------

def _valid_report() -> dict:
    return SidecarReport(service="chat", role="decode", pod="chat-decode-0", engine="vllm", engine_up=True,
                         stale=False, observed_at=1.7e9, window_s=5.0, started_at=1.7e9 - 60, decode_tps=2400.0,
                         prefill_tps=9000.0, requests_running=12.0, requests_waiting=1.0, requests_deferred=2.0,
                         requests_by_kv_stage={"in_progress": 2.0}, kv_cache_usage_ratio=0.5, preemptions_per_s=0.1,
                         ttft_p90_s=0.4, tbt_p90_s=0.03, gpus=(GpuReading(gpu="0", utilization_ratio=0.8),),
                         kv_transfer={"bytes_per_second": 1e9, "sources": {"engine": {"bytes_per_second": 1e9}}},
                         ).to_dict()


def _json_value(rng: random.Random, depth: int = 0):
    kind = rng.choice(("none", "bool", "int", "bigint", "float", "special", "str", "list", "dict"))
    if kind == "none":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.randint(-10 ** 6, 10 ** 6)
    if kind == "bigint":
        return rng.choice((10 ** 30, -10 ** 30, 2 ** 64, 10 ** 400))
    if kind == "float":
        return rng.choice((1e308, -1e308, 1.7e308, 5e-324, -0.0, 1e9, 0.5, -1.0, 86401.0, 1e8 + 1))
    if kind == "special":
        return rng.choice((math.inf, -math.inf, math.nan))
    if kind == "str":
        return rng.choice(("", "x", "1e3", "NaN", "decode", "\u00e9" * rng.randint(1, 300), "a" * 300))
    if depth > 3:
        return None
    if kind == "list":
        return [_json_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(("a", "b", "bytes_per_second", "gpu", "")): _json_value(rng, depth + 1)
            for _ in range(rng.randint(0, 4))}


def _dumps(doc) -> bytes:
    # Python writes inf/nan as Infinity/NaN: exactly the tokens a broken sidecar would send.
    return json.dumps(doc, allow_nan=True).encode()


def _mutate_report(rng: random.Random) -> bytes:
    doc = _valid_report()
    keys = list(doc) + ["future_field", "Service", ""]
    kind = rng.choice(("field", "field", "field", "delete", "nest", "text", "cut", "bytes", "wrap", "big"))
    if kind == "field":
        for _ in range(rng.randint(1, 4)):
            doc[rng.choice(keys)] = _json_value(rng)
        return _dumps(doc)
    if kind == "delete":
        for _ in range(rng.randint(1, 4)):
            doc.pop(rng.choice(keys), None)
        return _dumps(doc)
    if kind == "nest":
        depth = rng.choice((5, 31, 33, 100, 1000, 100_000))
        inner = "1"
        body = '{"a": ' * depth + inner + "}" * depth if rng.random() < 0.5 else "[" * depth + "]" * depth
        if rng.random() < 0.5:
            doc["kv_transfer"] = {"x": None}
            return _dumps(doc).replace(b'{"x": null}', body.encode())
        return body.encode()
    if kind == "text":
        body = _dumps(doc).decode()
        field_name = rng.choice(SIGNAL_FIELDS[:6])
        return body.replace(f'"{field_name}": ', f'"{field_name}": {rng.choice(("Infinity", "-Infinity", "NaN", "1e999", "01", "+1", ".5"))}, "_": ', 1).encode()
    if kind == "cut":
        body = _dumps(doc)
        return body[: rng.randint(0, len(body))]
    if kind == "bytes":
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300)))
    if kind == "wrap":
        return _dumps(rng.choice(([doc], {"report": doc}, "report", 3, None)))
    return b" " * (MAX_REPORT_BYTES + 1) + _dumps(doc)


def report_bodies(seed: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    while True:
        yield _mutate_report(rng)


# -- checks -------------------------------------------------------------------------------------

def _finite_numbers(value, path: str = "") -> Iterator[str]:
    if isinstance(value, float) and not math.isfinite(value):
        yield path
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _finite_numbers(v, f"{path}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _finite_numbers(v, f"{path}[{i}]")


RATE_FAMILIES = ("heteroscale_decode_tokens_per_second", "heteroscale_prefill_tokens_per_second",
                 "heteroscale_prefill_uncached_tokens_per_second", "heteroscale_ttft_seconds",
                 "heteroscale_tbt_seconds", "heteroscale_preemptions_per_second", "heteroscale_requests_running",
                 "heteroscale_requests_waiting", "heteroscale_requests_deferred", "heteroscale_requests_kv_stage",
                 "heteroscale_kv_cache_usage_ratio")


def check_page(text: str, windows: dict, t_s: float, result: FuzzResult, where: str) -> None:
    result.pages += 1
    for name, adapter in (("vllm", vllm), ("sglang", sglang)):
        try:
            snapshot = adapter.parse(text)
        except ScrapeError as exc:
            result.page_errors[exc.reason] += 1
            continue
        except Exception:   # noqa: BLE001 - the point: anything else is a crash
            result.crashes.append(f"{where} {name}.parse: {traceback.format_exc(limit=3)}")
            continue
        result.pages_parsed += 1
        try:
            window = windows.setdefault(name, SignalWindow(5.0))
            window.add(t_s, snapshot)
            stats = window.stats(t_s)
            report = SidecarReport.from_signals(stats, service="s", role="decode", pod="p", engine=name,
                                                engine_up=True, stale=False, observed_at=1.7e9 + t_s,
                                                window_s=stats.span_s)
            try:
                body = json.dumps(report.to_dict(), allow_nan=False)
            except ValueError:
                result.non_finite.append(f"{where} {name}: report JSON holds a non-finite number")
                continue
            try:
                parse_report_json(body.encode())
            except ReportFormatError as exc:
                result.rejected_own_reports.append(f"{where} {name}: {exc}")
            view = MetricsView(service="s", role="decode", engine_up=True, stale=False, stats=stats,
                               window_s=stats.span_s)
            for family in SidecarCollector(lambda: view).collect():
                if family.name in RATE_FAMILIES:
                    for sample in family.samples:
                        if not math.isfinite(sample.value):
                            result.non_finite.append(f"{where} {name}: /metrics {sample.name} = {sample.value}")
        except Exception:   # noqa: BLE001
            result.crashes.append(f"{where} {name} window/report/metrics: {traceback.format_exc(limit=3)}")
    try:
        kvc.parse_engine_page(text, direction="send")
    except ScrapeError as exc:
        result.page_errors["kv:" + exc.reason] += 1
    except Exception:   # noqa: BLE001
        result.crashes.append(f"{where} connectors.parse_engine_page: {traceback.format_exc(limit=3)}")


def check_report(body: bytes, result: FuzzResult, where: str) -> None:
    result.reports += 1
    try:
        report = parse_report_json(body)
    except ReportFormatError:
        result.reports_refused += 1
        return
    except Exception:   # noqa: BLE001
        result.crashes.append(f"{where} parse_report_json: {traceback.format_exc(limit=3)}")
        return
    result.reports_accepted += 1
    doc = report.to_dict()
    bad = list(_finite_numbers(doc))
    for name, (lo, hi) in BOUNDS.items():
        value = doc.get(name)
        if isinstance(value, float) and not lo <= value <= hi:
            bad.append(name)
    if bad:
        result.non_finite.append(f"{where}: accepted report holds {bad}")


def run(*, pages_n: int, reports_n: int, seed: int = 0,
        progress: Callable[[str, int], None] | None = None) -> FuzzResult:
    """``pages_n`` fuzzed pages and ``reports_n`` fuzzed report bodies from ``seed``."""
    result = FuzzResult()
    windows: dict = {}
    for i, text in zip(range(pages_n), pages(seed)):
        check_page(text, windows, float(i), result, f"page seed={seed} #{i}")
        if progress and i % 1000 == 999:
            progress("pages", i + 1)
    for i, body in zip(range(reports_n), report_bodies(seed)):
        check_report(body, result, f"report seed={seed} #{i}")
        if progress and i % 2000 == 1999:
            progress("reports", i + 1)
    return result
