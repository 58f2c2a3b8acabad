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
bounded: a line longer than ``MAX_LINE_CHARS`` raises ``LineTooLong``.

``SampleParser`` adds a cache: engines write the same label sets on every
scrape and only values change, so the name and labels of a key already seen
are reused and only the value is read. The cache is bounded in bytes (the sum
of the cached keys' lengths, ``max_cache_chars``) as well as in entries; when
either bound would be passed it is emptied and refilled.
"""

from __future__ import annotations

import re
from typing import Mapping, NamedTuple

MAX_LINE_CHARS = 16 * 1024           # a real vLLM/SGLang sample line is under 1 KiB
DEFAULT_CACHE_CHARS = 1024 * 1024    # about 1 MiB of cached keys (plus their parsed copies)
DEFAULT_CACHE_ENTRIES = 16384

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r'[ \t]*([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*"((?:[^"\\\n]|\\.)*)"[ \t]*')
_VALUE = re.compile(r"[+-]?(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|(?i:inf(?:inity)?)|(?i:nan))")
_TIMESTAMP = re.compile(r"[+-]?[0-9]+")
_ESCAPE = re.compile(r'\\[\\"n]')
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


def split_key(line: str) -> tuple[str, str]:
    """``(key, rest)``: the ``name{labels}`` part and what follows it (value, timestamp)."""
    m = _NAME.match(line)
    if m is None:
        raise PromTextError(f"invalid metric name in {line[:80]!r}")
    end = m.end()
    if end < len(line) and line[end] == "{":
        end = _labels_end(line, end + 1)
    return line[:end], line[end:]


def _labels_end(line: str, pos: int) -> int:
    """Index just past the closing brace of a label set that starts at ``pos``."""
    n = len(line)
    while True:
        while pos < n and line[pos] in " \t":
            pos += 1
        if pos < n and line[pos] == "}":
            return pos + 1
        m = _LABEL.match(line, pos)
        if m is None:
            raise PromTextError(f"invalid label set in {line[:80]!r}")
        pos = m.end()
        if pos < n and line[pos] == ",":
            pos += 1
        elif not (pos < n and line[pos] == "}"):
            raise PromTextError(f"labels not separated by ',' in {line[:80]!r}")


def parse_key(key: str) -> tuple[str, dict[str, str]]:
    """``name{labels}`` -> name and label dict."""
    m = _NAME.match(key)
    if m is None:
        raise PromTextError(f"invalid metric name in {key[:80]!r}")
    name = m.group()
    labels: dict[str, str] = {}
    pos = m.end()
    if pos == len(key):
        return name, labels
    if key[pos] != "{" or not key.endswith("}"):
        raise PromTextError(f"invalid sample key {key[:80]!r}")
    pos += 1
    end = len(key) - 1
    while pos < end:
        while pos < end and key[pos] in " \t":
            pos += 1
        if pos >= end:
            break
        lm = _LABEL.match(key, pos, end)
        if lm is None:
            raise PromTextError(f"invalid label set in {key[:80]!r}")
        label = lm.group(1)
        if label in labels:
            raise PromTextError(f"label {label!r} given twice in {key[:80]!r}")
        labels[label] = _unescape(lm.group(2))
        pos = lm.end()
        if pos < end:
            if key[pos] != ",":
                raise PromTextError(f"labels not separated by ',' in {key[:80]!r}")
            pos += 1
    return name, labels


def parse_rest(rest: str) -> float:
    """The value (and optional timestamp) after a sample's key."""
    if not rest or rest[0] not in " \t":
        raise PromTextError(f"no value after the sample name ({rest[:40]!r})")
    parts = rest.split()
    if not parts or len(parts) > 2:
        raise PromTextError(f"expected 'value [timestamp]', got {rest[:60]!r}")
    if len(parts) == 2 and _TIMESTAMP.fullmatch(parts[1]) is None:
        raise PromTextError(f"invalid timestamp {parts[1][:40]!r}")
    return parse_value(parts[0])


def parse_line(line: str) -> Sample:
    """One sample line (no trailing newline). Raises ``PromTextError``."""
    if len(line) > MAX_LINE_CHARS:
        raise LineTooLong(f"sample line of {len(line)} characters (limit {MAX_LINE_CHARS})")
    key, rest = split_key(line)
    name, labels = parse_key(key)
    return Sample(name, labels, parse_rest(rest))


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
        key, rest = split_key(line)
        hit = self._cache.get(key)
        if hit is None:
            hit = parse_key(key)
            if len(self._cache) >= self.max_cache_entries or self._cache_chars + len(key) > self.max_cache_chars:
                self.clear()
            if len(key) <= self.max_cache_chars:
                self._cache[key] = hit
                self._cache_chars += len(key)
        return Sample(hit[0], hit[1], parse_rest(rest))
