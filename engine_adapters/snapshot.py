"""Engine-neutral snapshot of one engine scrape, and the parsing helpers both adapters share (pure).

An ``EngineSnapshot`` is what one ``/metrics`` page says, already reduced to the
few signals the autoscaler needs and summed across data-parallel engines/ranks
the way each engine requires (the adapters decide how):

* counters (cumulative, monotone while the engine lives): generated tokens,
  prompt tokens, prompt tokens served from a cache, and - where the engine
  says so directly - prompt tokens computed here (missed every cache);
* gauges: running and waiting requests, KV-cache usage as a 0..1 ratio;
* histograms: TTFT and TBT (inter-token latency) as cumulative buckets.

A missing series is absent from the mappings (never 0). ``ranks`` names the
engines/ranks whose series were summed; the rate window refuses to difference
two snapshots whose rank sets differ (an engine appearing or vanishing would
otherwise look like a counter jump or a reset).

Parsing is done by ``prometheus_client``'s own text parser. To keep a scrape
cheap on a full page (hundreds of bucket lines the sidecar never reads), the
page is first cut down to the lines of the families an adapter wants, and only
those go through the parser. Lines of other families are not read at all, so
garbage inside a family the sidecar ignores is ignored too; garbage in a wanted
family, an empty page, a page without a final newline (truncated - the text
format ends every line with one), or a page of another engine is a
``ScrapeError`` with reason ``parse``, ``empty`` or ``wrong_engine``.

Samples are indexed by sample name (``vllm:prompt_tokens_total``), not family
name: the family name depends on the ``# TYPE`` line (a counter family drops
``_total``, an untyped one keeps it) while sample names do not. ``_created``
samples are never wanted and so never parsed. Nothing depends on sample order.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

from prometheus_client.parser import Sample, _parse_sample, _parse_value, text_string_to_metric_families

from heteroscale.errors import ScrapeError

# Keys of EngineSnapshot.counters
GENERATION_TOKENS = "generation_tokens"
PROMPT_TOKENS = "prompt_tokens"
PROMPT_CACHED_TOKENS = "prompt_cached_tokens"
PROMPT_UNCACHED_TOKENS = "prompt_uncached_tokens"
# Keys of EngineSnapshot.gauges
REQUESTS_RUNNING = "requests_running"
REQUESTS_WAITING = "requests_waiting"
KV_CACHE_USAGE = "kv_cache_usage_ratio"
# Keys of EngineSnapshot.histograms
TTFT = "ttft_seconds"
TBT = "tbt_seconds"

HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")
SAMPLE_SUFFIXES = ("", "_total") + HISTOGRAM_SUFFIXES


@dataclass(frozen=True)
class Histogram:
    """Cumulative histogram: ``cumulative[i]`` observations were ``<= bounds[i]``.

    ``bounds`` ascend strictly and end with ``+inf``; ``count`` equals the
    ``+Inf`` bucket (the ``_count`` sample is not trusted over it).
    """

    bounds: tuple[float, ...]
    cumulative: tuple[float, ...]
    sum: float = 0.0

    def __post_init__(self) -> None:
        if not self.bounds or self.bounds[-1] != math.inf:
            raise ValueError("histogram must end with a +Inf bucket")
        if len(self.bounds) != len(self.cumulative):
            raise ValueError("histogram bounds and counts differ in length")
        if any(b2 <= b1 for b1, b2 in zip(self.bounds, self.bounds[1:])):
            raise ValueError("histogram bounds must ascend strictly")
        if any(not math.isfinite(c) or c < 0 for c in self.cumulative):
            raise ValueError("histogram counts must be finite and non-negative")
        if any(c2 < c1 for c1, c2 in zip(self.cumulative, self.cumulative[1:])):
            raise ValueError("histogram counts must be cumulative (non-decreasing)")

    @property
    def count(self) -> float:
        return self.cumulative[-1]

    def cumulative_at(self, bound: float) -> float:
        """Observations known to be ``<= bound`` (step function between bounds)."""
        best = 0.0
        for b, c in zip(self.bounds, self.cumulative):
            if b > bound:
                break
            best = c
        return best

    def merge(self, other: "Histogram") -> "Histogram":
        """Sum of two histograms (two engines/ranks). Identical bounds add bucket
        by bucket; different bounds are merged on the union of bounds, each side
        counted as a step function (a lower bound of its true cumulative count)."""
        if self.bounds == other.bounds:
            return Histogram(self.bounds, tuple(a + b for a, b in zip(self.cumulative, other.cumulative)),
                             self.sum + other.sum)
        bounds = tuple(sorted(set(self.bounds) | set(other.bounds)))
        cumulative = tuple(self.cumulative_at(b) + other.cumulative_at(b) for b in bounds)
        return Histogram(bounds, cumulative, self.sum + other.sum)


@dataclass(frozen=True)
class EngineSnapshot:
    """One scrape, engine-neutral. Missing series are absent keys, never zero."""

    engine: str
    counters: Mapping[str, float] = field(default_factory=dict)
    gauges: Mapping[str, float] = field(default_factory=dict)
    histograms: Mapping[str, Histogram] = field(default_factory=dict)
    ranks: frozenset[str] = frozenset()
    engine_role: str | None = None    # the role the page itself states (SGLang engine_type), if any


# -- page -> samples ---------------------------------------------------------------

SampleIndex = Mapping[str, list]   # sample name -> list of prometheus_client Sample


@functools.lru_cache(maxsize=32)
def wanted_sample_names(families: tuple[str, ...]) -> frozenset[str]:
    """Every sample name (and TYPE/HELP name) the given families can produce."""
    return frozenset(f + s for f in families for s in SAMPLE_SUFFIXES)


def _line_name(line: str) -> str:
    name = line.partition("{")[0]
    if " " in name or "\t" in name:
        name = name.split(None, 1)[0] if name.strip() else ""
    return name


def select_lines(text: str, wanted: frozenset[str], *, prefix: str) -> tuple[list[str], bool]:
    """The sample lines of wanted families, and whether the page mentions ``prefix`` at all."""
    kept: list[str] = []
    seen_prefix = False
    for line in text.split("\n"):
        if not line:
            continue
        if line[0] == "#":
            if not seen_prefix:
                parts = line.split(None, 3)
                seen_prefix = len(parts) >= 3 and parts[1] in ("TYPE", "HELP") and parts[2].startswith(prefix)
            continue
        name = _line_name(line)
        if name in wanted:
            kept.append(line)
        elif not seen_prefix and name.startswith(prefix):
            seen_prefix = True
    return kept, seen_prefix or bool(kept)


# Label sets repeat on every scrape; only values change. The real parser reads
# each distinct "name{labels}" once; later lines with the same key reuse its
# result and only the value goes through the parser's value reader. Bounded.
_KEY_CACHE: dict[str, tuple[str, Mapping[str, str]]] = {}
_KEY_CACHE_MAX = 16384


def _parse_line(line: str) -> Sample:
    key, _, value_text = line.rpartition(" ")
    hit = _KEY_CACHE.get(key)
    if hit is not None:
        return Sample(hit[0], hit[1], _parse_value(value_text), None)
    sample = _parse_sample(line)
    # Cache only when the simple split agrees with the parser (no timestamp,
    # no tab or exemplar): then "key + value" is all the line says.
    if sample.timestamp is None and key and value_text and _parse_value(value_text) == sample.value:
        if len(_KEY_CACHE) >= _KEY_CACHE_MAX:
            _KEY_CACHE.clear()
        _KEY_CACHE[key] = (sample.name, sample.labels)
    return sample


def index_lines(lines: Iterable[str]) -> dict[str, list]:
    """Sample-name index of sample lines, parsed with prometheus_client's sample parser."""
    index: dict[str, list] = {}
    for line in lines:
        try:
            sample = _parse_line(line)
        except Exception as exc:   # ValueError, IndexError...: all mean "bad line"
            raise ScrapeError("parse", f"bad sample line {line[:120]!r}: {type(exc).__name__}") from exc
        index.setdefault(sample.name, []).append(sample)
    return index


def _parse(text: str) -> list:
    try:
        return list(text_string_to_metric_families(text))
    except Exception as exc:   # the parser raises ValueError, IndexError, TypeError...: all mean "bad page"
        raise ScrapeError("parse", f"not a Prometheus text page: {type(exc).__name__}: {exc}"[:300]) from exc


def parse_page(text: str, *, families: Iterable[str], prefix: str, engine: str,
               other_prefixes: Sequence[str] = ()) -> SampleIndex:
    """Parse the wanted families of a page into a sample-name index.

    Raises ``ScrapeError`` with reason ``empty`` (nothing on the page),
    ``parse`` (garbage in a wanted family, truncated page) or ``wrong_engine``
    (a valid page without any ``prefix`` metric).
    """
    if not isinstance(text, str) or not text.strip():
        raise ScrapeError("empty", "the engine returned an empty page")
    if not text.endswith("\n"):
        raise ScrapeError("parse", "page does not end with a newline (truncated)")
    lines, seen_prefix = select_lines(text, wanted_sample_names(tuple(families)), prefix=prefix)
    index = index_lines(lines)
    if seen_prefix:
        return index
    # Nothing of this engine on the page: find out what the page is instead.
    all_families = _parse(text)
    if not any(f.samples for f in all_families):
        raise ScrapeError("empty", "the page has no samples")
    names = {s.name for f in all_families for s in f.samples}
    for other in other_prefixes:
        if any(n.startswith(other) for n in names):
            raise ScrapeError("wrong_engine", f"expected {engine} metrics ('{prefix}*'), found '{other}*' metrics")
    raise ScrapeError("wrong_engine", f"expected {engine} metrics ('{prefix}*'), found none")


# -- samples -> values ---------------------------------------------------------------

SampleFilter = Callable[[Mapping[str, str]], bool]


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def samples_of(index: SampleIndex, name: str, where: SampleFilter | None = None) -> list:
    return [s for s in index.get(name, ()) if _finite(s.value) and (where is None or where(s.labels))]


def sum_values(samples: Sequence) -> float | None:
    """Sum of finite sample values; ``None`` when there is none (missing, not zero)."""
    return float(sum(s.value for s in samples)) if samples else None


def mean_values(samples: Sequence) -> float | None:
    return float(sum(s.value for s in samples)) / len(samples) if samples else None


def counter_total(index: SampleIndex, family: str, where: SampleFilter | None = None) -> float | None:
    """A counter family summed over its series (``_total`` sample; negatives dropped)."""
    found = [s for s in samples_of(index, family + "_total", where) if s.value >= 0]
    if not found:   # a counter exposed without the suffix (untyped pages)
        found = [s for s in samples_of(index, family, where) if s.value >= 0]
    return sum_values(found)


def _series_key(labels: Mapping[str, str], drop: str = "le") -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in labels.items() if k != drop))


def _bound(text: str) -> float:
    value = float(text)   # accepts "+Inf", "1.0", "2.097152e+06"
    if math.isnan(value):
        raise ValueError("NaN bucket bound")
    return value


def histogram_series(index: SampleIndex, family: str,
                     where: SampleFilter | None = None) -> dict[tuple, Histogram]:
    """Each labelled series of a histogram family, keyed by its labels (without ``le``).

    A series with a malformed bucket set (no ``+Inf``, non-cumulative, bad bound)
    is a ``ScrapeError("parse")``: an engine never writes one, so the page is broken.
    """
    buckets: dict[tuple, dict[float, float]] = {}
    for s in samples_of(index, family + "_bucket", where):
        try:
            bound = _bound(s.labels.get("le", ""))
        except ValueError as exc:
            raise ScrapeError("parse", f"{family}: bad bucket bound {s.labels.get('le')!r}") from exc
        buckets.setdefault(_series_key(s.labels), {})[bound] = float(s.value)
    sums = {_series_key(s.labels): float(s.value) for s in samples_of(index, family + "_sum", where)}
    out: dict[tuple, Histogram] = {}
    for key, by_bound in buckets.items():
        bounds = tuple(sorted(by_bound))
        try:
            out[key] = Histogram(bounds, tuple(by_bound[b] for b in bounds), sums.get(key, 0.0))
        except ValueError as exc:
            raise ScrapeError("parse", f"{family}: {exc}") from exc
    return out


def merge_histograms(histograms: Iterable[Histogram]) -> Histogram | None:
    merged: Histogram | None = None
    for h in histograms:
        merged = h if merged is None else merged.merge(h)
    return merged


def drop_none(values: Mapping[str, float | None]) -> dict[str, float]:
    return {k: v for k, v in values.items() if v is not None}
