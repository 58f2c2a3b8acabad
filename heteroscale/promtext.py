"""Prometheus text format 0.0.4 sample lines -> (name, labels, value) (pure).

The project's own reader of one sample line, so that parsing does not depend on
another library's private helpers, whose bodies change between releases. It
follows the exposition format (prometheus.io "Exposition formats", text 0.0.4):

    metric_name [ "{" label_name "=" '"' label_value '"' { "," ... } [ "," ] "}" ] value [ timestamp ]

* ``metric_name`` matches ``[a-zA-Z_:][a-zA-Z0-9_:]*`` (vLLM's and SGLang's ``:``
  included); ``label_name`` matches ``[a-zA-Z_][a-zA-Z0-9_]*``; a label name
  given twice is an error;
* a label value is double-quoted; ``\\\\``, ``\\"`` and ``\\n`` are its escapes (any
  other backslash is kept as written, as Prometheus' own parsers do);
* ``value`` is a Go-style float: ASCII digits with an optional sign, point and
  exponent, or ``NaN`` / ``Inf`` / ``+Inf`` / ``-Inf`` (case-insensitive).
  Python's ``float()`` is stricter nowhere and looser in places
  (``1_0``, non-ASCII digits, surrounding blanks), so the value is checked
  against that grammar first;
* an optional integer timestamp (milliseconds) may follow; it is read and dropped.

Anything else raises ``PromTextError`` (a ``ValueError``). Limits keep memory
bounded: a line longer than ``MAX_LINE_CHARS`` raises ``LineTooLong``; readers of
whole pages cap them at ``MAX_PAGE_BYTES``. ``find_lines`` picks the lines a reader
wants out of a page with one compiled pattern, in slices (see its docstring).

Shared by the engine adapters and the KV-transfer connector parser, which read the
same pages and sit side by side in the package's layers.

``SampleParser`` adds a cache: engines write the same label sets on every
scrape and only values change, so the name and labels of a key already seen
are reused and only the value is read. The cache is bounded in bytes (the sum
of the cached keys' lengths, ``max_cache_chars``) as well as in entries; when
either bound would be passed it is emptied and refilled.
"""

from __future__ import annotations

import re
from typing import Mapping, NamedTuple

MAX_PAGE_BYTES = 16 * 1024 * 1024    # a real vLLM page is ~100 KB; a 10 MB page must still be read
MAX_LINE_CHARS = 16 * 1024           # a real vLLM/SGLang sample line is under 1 KiB
SCAN_CHUNK_CHARS = 256 * 1024        # find_lines: characters per regex call
DEFAULT_CACHE_CHARS = 1024 * 1024    # about 1 MiB of cached keys (plus their parsed copies)
DEFAULT_CACHE_ENTRIES = 16384

_VALUE = re.compile(r"[+-]?(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|(?i:inf(?:inity)?)|(?i:nan))")
_TIMESTAMP = re.compile(r"[+-]?[0-9]+")
_ESCAPE = re.compile(r'\\[\\"n]')
# One sample line, validated in one regex call (C speed; a 10 MB page has ~100,000 lines):
# name, optional label set, value, optional timestamp. Label pairs are then split out of
# group 2 by _PAIR. Every part is linear (no nested quantifier can backtrack).
_PAIR_SRC = r'[a-zA-Z_][a-zA-Z0-9_]*[ \t]*=[ \t]*"(?:[^"\\\n]|\\.)*"'
_LINE = re.compile(
    r"([a-zA-Z_:][a-zA-Z0-9_:]*)"
    r"(\{[ \t]*(?:" + _PAIR_SRC + r"[ \t]*(?:,[ \t]*" + _PAIR_SRC + r"[ \t]*)*,?[ \t]*)?\})?"
    r"[ \t]+([^ \t]+)(?:[ \t]+([^ \t]+))?[ \t]*")
_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*"((?:[^"\\\n]|\\.)*)"')
_UNESCAPED = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


class PromTextError(ValueError):
    """A sample line that is not valid text format 0.0.4."""


class LineTooLong(PromTextError):
    """A sample line over ``MAX_LINE_CHARS``."""


class Sample(NamedTuple):
    name: str
    labels: Mapping[str, str]
    value: float


def parse_value(text: str) -> float:
    """A sample value; ``PromTextError`` for anything the format does not allow."""
    if _VALUE.fullmatch(text) is None:
        raise PromTextError(f"invalid value {text[:40]!r}")
    return float(text)


def _unescape(text: str) -> str:
    return _ESCAPE.sub(lambda m: _UNESCAPED[m.group(0)], text) if "\\" in text else text


def _match(line: str) -> tuple[str, str, dict[str, str], float]:
    """(key, name, labels, value) of one sample line, validated in one regex call."""
    m = _LINE.fullmatch(line)
    if m is None:
        raise PromTextError(f"not a sample line: {line[:80]!r}")
    name, label_set, value_text, timestamp = m.groups()
    labels: dict[str, str] = {}
    if label_set:
        pairs = _PAIR.findall(label_set)
        labels = {k: _unescape(v) for k, v in pairs}
        if len(labels) != len(pairs):
            raise PromTextError(f"a label is given twice in {line[:80]!r}")
    if timestamp is not None and _TIMESTAMP.fullmatch(timestamp) is None:
        raise PromTextError(f"invalid timestamp {timestamp[:40]!r}")
    return line[:m.end(2) if label_set else m.end(1)], name, labels, parse_value(value_text)


def parse_line(line: str) -> Sample:
    """One sample line (no trailing newline). Raises ``PromTextError``."""
    if len(line) > MAX_LINE_CHARS:
        raise LineTooLong(f"sample line of {len(line)} characters (limit {MAX_LINE_CHARS})")
    _, name, labels, value = _match(line)
    return Sample(name, labels, value)


class SampleParser:
    """``parse_line`` with a byte-bounded cache of parsed keys (see the module docstring)."""

    def __init__(self, *, max_cache_chars: int = DEFAULT_CACHE_CHARS,
                 max_cache_entries: int = DEFAULT_CACHE_ENTRIES) -> None:
        self.max_cache_chars = max_cache_chars
        self.max_cache_entries = max_cache_entries
        self._cache: dict[str, tuple[str, Mapping[str, str]]] = {}
        self._cache_chars = 0

    @property
    def cached_chars(self) -> int:
        return self._cache_chars

    def __len__(self) -> int:
        return len(self._cache)

    def clear(self) -> None:
        self._cache = {}
        self._cache_chars = 0

    def parse(self, line: str) -> Sample:
        if len(line) > MAX_LINE_CHARS:
            raise LineTooLong(f"sample line of {len(line)} characters (limit {MAX_LINE_CHARS})")
        # Fast path: "KEY VALUE" where KEY is a key this parser already validated. A
        # cached key is always a whole, valid ``name{labels}``, so if the text before
        # the last space is one, the text after it can only be the value.
        key, _, value_text = line.rpartition(" ")
        hit = self._cache.get(key)
        if hit is not None:
            return Sample(hit[0], hit[1], parse_value(value_text))
        key, name, labels, value = _match(line)
        hit = self._cache.get(key)
        if hit is None:
            hit = (name, labels)
            if len(self._cache) >= self.max_cache_entries or self._cache_chars + len(key) > self.max_cache_chars:
                self.clear()
            if len(key) <= self.max_cache_chars:
                self._cache[key] = hit
                self._cache_chars += len(key)
        return Sample(hit[0], hit[1], value)


def find_lines(pattern: re.Pattern, text: str) -> list[str]:
    """``pattern.findall(text)`` for a pattern whose matches never span a newline, in slices.

    One regex call over a 10 MB page would hold the GIL for tens of milliseconds in C;
    slices of ``SCAN_CHUNK_CHARS`` (cut at newlines) keep each call short, so the
    sidecar's event loop thread gets the GIL back between them.
    """
    found: list[str] = []
    start, size = 0, len(text)
    while start < size:
        end = text.find("\n", start + SCAN_CHUNK_CHARS) if start + SCAN_CHUNK_CHARS < size else -1
        end = size if end < 0 else end
        found.extend(pattern.findall(text, start, end))
        start = end
    return found
