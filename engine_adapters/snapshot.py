"""Engine-neutral snapshot of one engine scrape, and the parsing helpers both adapters share (pure).

An ``EngineSnapshot`` is what one ``/metrics`` page says, already reduced to the
few signals the autoscaler needs and summed across data-parallel engines/ranks
the way each engine requires (the adapters decide how):

* counters (cumulative, monotone while the engine lives): generated tokens,
  prompt tokens, prompt tokens served from a cache, and - where the engine
  says so directly - prompt tokens computed here (missed every cache);
  preempted (vLLM) or retracted (SGLang) requests;
* gauges: running, waiting and deferred requests, KV-cache usage as a 0..1
  ratio; requests per KV-transfer stage (``kv_stages``);
* histograms: TTFT and TBT (inter-token latency) as cumulative buckets.

A missing series is absent from the mappings (never 0). ``ranks`` names the
engines/ranks whose series were summed; the rate window refuses to difference
two snapshots whose rank sets differ (an engine appearing or vanishing would
otherwise look like a counter jump or a reset).

Sample lines are read by the project's own parser (``heteroscale.promtext``, text format
0.0.4). To keep a scrape cheap on a full page (hundreds of bucket lines the
sidecar never reads), the lines of the families an adapter wants are picked out
with one compiled regular expression, and only those are parsed. Lines of other
families are not read at all, so garbage inside a family the sidecar ignores is
ignored too; garbage in a wanted family, an empty page, a page without a final
newline (truncated - the text format ends every line with one), or a page of
another engine is a ``ScrapeError`` with reason ``parse``, ``empty`` or
``wrong_engine``; a page over ``MAX_PAGE_CHARS`` or a wanted line over
``promtext.MAX_LINE_CHARS`` is ``too_large``. Memory stays bounded in bytes:
the page is capped, the cache of parsed label sets is bounded by the size of its
keys (``promtext.SampleParser``), and what a snapshot keeps from labels (the rank
set, KV stage names) is bounded too (``MAX_RANKS``, ``MAX_RANK_CHARS``,
``MAX_KV_STAGES``, ``MAX_STAGE_CHARS``).

Samples are indexed by sample name (``vllm:prompt_tokens_total``), not family
name: the family name depends on the ``# TYPE`` line (a counter family drops
``_total``, an untyped one keeps it) while sample names do not. ``_created``
samples are never wanted and so never parsed. Nothing depends on sample order.
"""

from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence


from heteroscale import promtext
from heteroscale.errors import ScrapeError

# Keys of EngineSnapshot.counters
GENERATION_TOKENS = "generation_tokens"
PROMPT_TOKENS = "prompt_tokens"
PROMPT_CACHED_TOKENS = "prompt_cached_tokens"
PROMPT_UNCACHED_TOKENS = "prompt_uncached_tokens"
PREEMPTIONS = "preemptions"              # vLLM preemptions / SGLang retracted requests
# Keys of EngineSnapshot.gauges
REQUESTS_RUNNING = "requests_running"
REQUESTS_WAITING = "requests_waiting"    # waiting for capacity (vLLM reason="capacity" when exposed)
REQUESTS_DEFERRED = "requests_deferred"  # waiting, deferred for a transient constraint (vLLM)
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
    kv_stages: Mapping[str, float] = field(default_factory=dict)   # requests per KV-transfer stage
    # Which family the token counters came from (SGLang: "realtime" per batch, or "finished"
    # per finished request). Two snapshots whose sources differ are never differenced.
    token_source: str = ""


# -- page -> samples ---------------------------------------------------------------

SampleIndex = Mapping[str, list]   # sample name -> list of promtext.Sample

# One parser (and so one bounded key cache) for the process: a sidecar reads one engine.
_PARSER = promtext.SampleParser()
MAX_PAGE_CHARS = promtext.MAX_PAGE_BYTES   # the fetch applies the same cap in bytes
SCAN_CHUNK_CHARS = promtext.SCAN_CHUNK_CHARS


@functools.lru_cache(maxsize=32)
def wanted_sample_names(families: tuple[str, ...]) -> frozenset[str]:
    """Every sample name (and TYPE/HELP name) the given families can produce."""
    return frozenset(f + s for f in families for s in SAMPLE_SUFFIXES)


@functools.lru_cache(maxsize=32)
def _wanted_lines_re(families: tuple[str, ...]) -> tuple[re.Pattern, re.Pattern]:
    """(first line, every later line) patterns for the sample lines of ``families``.

    The later-lines pattern starts with the literal "newline + the families' common
    prefix" (``\nvllm:``), which the regex engine finds with a fast substring scan.
    """
    common = os.path.commonprefix(families)
    # Longest names first, so that a family whose name extends another's is tried before it.
    names = "|".join(re.escape(f[len(common):]) for f in sorted(families, key=len, reverse=True))
    suffixes = "|".join(re.escape(s) for s in SAMPLE_SUFFIXES if s)
    line = rf"{re.escape(common)}(?:{names})(?:{suffixes})?(?=[{{ \t])[^\n]*"
    return re.compile(line), re.compile(rf"\n({line})")


@functools.lru_cache(maxsize=32)
def _prefix_re(prefix: str) -> re.Pattern:
    return re.compile(rf"\n(?:#[ \t]+(?:TYPE|HELP)[ \t]+)?{re.escape(prefix)}")


def select_lines(text: str, families: Iterable[str], *, prefix: str) -> tuple[list[str], bool]:
    """The sample lines of wanted families, and whether the page mentions ``prefix`` at all.

    Lines are found with compiled regular expressions over the whole page, so the
    lines of other families are skipped at C speed and never become objects.
    """
    first, later = _wanted_lines_re(tuple(families))
    kept = promtext.find_lines(later, text)
    m = first.match(text)
    if m is not None:
        kept.insert(0, m.group())
    if kept:
        return kept, True
    seen = (text.startswith(prefix) or _prefix_re(prefix).search(text) is not None
            or _prefix_re(prefix).match("\n" + text[:len(prefix) + 16]) is not None)
    return kept, seen


def index_lines(lines: Iterable[str], parser: promtext.SampleParser | None = None) -> dict[str, list]:
    """Sample-name index of sample lines (``promtext``; a bounded cache of parsed label sets)."""
    parse = (parser or _PARSER).parse
    index: dict[str, list] = {}
    for line in lines:
        try:
            sample = parse(line)
        except promtext.LineTooLong as exc:
            raise ScrapeError("too_large", f"{exc}: {line[:80]!r}...") from exc
        except ValueError as exc:
            raise ScrapeError("parse", f"bad sample line {line[:120]!r}: {exc}"[:300]) from exc
        index.setdefault(sample.name, []).append(sample)
    return index


def _classify(text: str, *, engine: str, prefix: str, other_prefixes: Sequence[str]) -> ScrapeError:
    """What a page without any ``prefix`` metric is: empty, garbage, or another engine's."""
    names: set[str] = set()
    for line in text.split("\n"):
        if not line or line[0] == "#" or line.isspace():
            continue
        try:
            sample = promtext.parse_line(line)
        except promtext.LineTooLong as exc:
            return ScrapeError("too_large", str(exc))
        except ValueError as exc:
            return ScrapeError("parse", f"not a Prometheus text page: {exc}"[:300])
        names.add(sample.name)
    if not names:
        return ScrapeError("empty", "the page has no samples")
    for other in other_prefixes:
        if any(n.startswith(other) for n in names):
            return ScrapeError("wrong_engine", f"expected {engine} metrics ('{prefix}*'), found '{other}*' metrics")
    return ScrapeError("wrong_engine", f"expected {engine} metrics ('{prefix}*'), found none")


def parse_page(text: str, *, families: Iterable[str], prefix: str, engine: str,
               other_prefixes: Sequence[str] = ()) -> SampleIndex:
    """Parse the wanted families of a page into a sample-name index.

    Raises ``ScrapeError`` with reason ``empty`` (nothing on the page),
    ``parse`` (garbage in a wanted family, truncated page), ``too_large`` (a page
    over ``MAX_PAGE_CHARS`` or a wanted line over ``promtext.MAX_LINE_CHARS``)
    or ``wrong_engine`` (a valid page without any ``prefix`` metric).
    """
    if not isinstance(text, str) or not text or text.isspace():
        raise ScrapeError("empty", "the engine returned an empty page")
    if len(text) > MAX_PAGE_CHARS:
        raise ScrapeError("too_large", f"page of {len(text)} characters exceeds the {MAX_PAGE_CHARS} limit")
    if not text.endswith("\n"):
        raise ScrapeError("parse", "page does not end with a newline (truncated)")
    lines, seen_prefix = select_lines(text, families, prefix=prefix)
    index = index_lines(lines)
    if seen_prefix:
        return index
    raise _classify(text, engine=engine, prefix=prefix, other_prefixes=other_prefixes)


# -- samples -> values ---------------------------------------------------------------

SampleFilter = Callable[[Mapping[str, str]], bool]


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def samples_of(index: SampleIndex, name: str, where: SampleFilter | None = None) -> list:
    return [s for s in index.get(name, ()) if _finite(s.value) and (where is None or where(s.labels))]


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def sum_values(samples: Sequence) -> float | None:
    """Sum of finite sample values; ``None`` when there is none (missing, not zero) or
    when the sum overflows (two engines' counters near the float limit)."""
    return _finite_or_none(float(sum(s.value for s in samples))) if samples else None


def mean_values(samples: Sequence) -> float | None:
    return _finite_or_none(float(sum(s.value for s in samples)) / len(samples)) if samples else None


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
    """Sum of several engines' histograms; counts that overflow when added are a broken page."""
    merged: Histogram | None = None
    for h in histograms:
        try:
            merged = h if merged is None else merged.merge(h)
        except ValueError as exc:
            raise ScrapeError("parse", f"histograms cannot be summed: {exc}") from exc
    return merged


MAX_RANKS = 1024          # distinct engines/ranks on one page (a pod runs a handful)
MAX_RANK_CHARS = 128      # an engine index or DP rank is a small number
MAX_KV_STAGES = 32
MAX_STAGE_CHARS = 64


def checked_ranks(values: Iterable[str]) -> frozenset[str]:
    """The set of rank label values, refused (``too_large``) past ``MAX_RANKS`` or ``MAX_RANK_CHARS``:
    every snapshot in the rate window keeps this set, so its size must stay bounded."""
    ranks = frozenset(values)
    if len(ranks) > MAX_RANKS or any(len(r) > MAX_RANK_CHARS for r in ranks):
        raise ScrapeError("too_large", f"{len(ranks)} engine ranks on one page, or a rank label over "
                                       f"{MAX_RANK_CHARS} characters (limits {MAX_RANKS} / {MAX_RANK_CHARS})")
    return ranks


def drop_none(values: Mapping[str, float | None]) -> dict[str, float]:
    return {k: v for k, v in values.items() if v is not None}
