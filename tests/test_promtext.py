"""The project's own text-format sample parser, against the real prometheus_client parser.

Every captured or constructed engine page in tests/data is read line by line with
``promtext`` and compared with what prometheus_client's public
``text_string_to_metric_families`` reads from the same page; then the format's edge
cases one by one, and the byte bound of the key cache.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from heteroscale import promtext

DATA = Path(__file__).resolve().parent / "data"
PAGES = sorted(p for p in DATA.glob("*.txt"))


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_reads_every_page_in_tests_data_as_prometheus_client_does(path):
    text = path.read_text()
    reference = [(s.name, s.labels, float(s.value)) for f in text_string_to_metric_families(text) for s in f.samples]
    ours = [promtext.parse_line(line) for line in text.splitlines() if line and not line.startswith("#")]
    assert len(ours) == len(reference) > 0
    # prometheus_client groups samples by family; compare as multisets keyed by name and labels.
    by_key = {(n, tuple(sorted(lb.items()))): v for n, lb, v in reference}
    for s in ours:
        assert _same(s.value, by_key[(s.name, tuple(sorted(s.labels.items())))])


@pytest.mark.parametrize("line,name,labels,value", [
    ('vllm:num_requests_running{engine="0",model_name="m"} 12.0', "vllm:num_requests_running",
     {"engine": "0", "model_name": "m"}, 12.0),
    ("up 1", "up", {}, 1.0),
    ("up{} 1", "up", {}, 1.0),
    ('x{a="1",} 2', "x", {"a": "1"}, 2.0),                       # trailing comma
    ('x{ a = "1" , b="2" } 3', "x", {"a": "1", "b": "2"}, 3.0),  # blanks around terms
    ('x{a="q\\"uote",b="back\\\\slash",c="new\\nline",d="\\x"} 4', "x",
     {"a": 'q"uote', "b": "back\\slash", "c": "new\nline", "d": "\\x"}, 4.0),
    ('x{a="{},= "} 5', "x", {"a": "{},= "}, 5.0),                # structure characters inside quotes
    ("x 1e3", "x", {}, 1000.0),
    ("x -0.5", "x", {}, -0.5),
    ("x .5", "x", {}, 0.5),
    ("x +Inf", "x", {}, math.inf),
    ("x -Inf", "x", {}, -math.inf),
    ("x 1 1700000000000", "x", {}, 1.0),                          # timestamp read and dropped
    ("x\t7", "x", {}, 7.0),
])
def test_valid_lines(line, name, labels, value):
    sample = promtext.parse_line(line)
    assert (sample.name, dict(sample.labels), sample.value) == (name, labels, value)


def test_nan_value():
    assert math.isnan(promtext.parse_line("x NaN").value)


@pytest.mark.parametrize("line", [
    "", " x 1", "1x 1", "x", "x ", "x{ 1", 'x{a="1" 1', 'x{a=1} 1', 'x{a="1"b="2"} 1', 'x{a="1",a="2"} 1',
    'x{1a="1"} 1', 'x{a="1"}1', "x one", "x 1_0", "x ٣", "x 0x10", "x 1 2 3", "x 1 ts", "x 1.5.2",
    'x{a="unterminated} 1', "x{,} 1", "x{a=\"1\",,} 1",
])
def test_invalid_lines_raise_value_errors(line):
    with pytest.raises(promtext.PromTextError):
        promtext.parse_line(line)


def test_line_over_the_limit_is_too_long():
    huge = 'x{a="' + "v" * promtext.MAX_LINE_CHARS + '"} 1'
    with pytest.raises(promtext.LineTooLong):
        promtext.parse_line(huge)
    with pytest.raises(promtext.LineTooLong):
        promtext.SampleParser().parse(huge)


def test_cache_reuses_keys_and_stays_within_its_byte_bound():
    parser = promtext.SampleParser(max_cache_chars=10_000, max_cache_entries=1000)
    first = parser.parse('x{a="1"} 1')
    again = parser.parse('x{a="1"} 2')
    assert again.labels is first.labels and again.value == 2.0
    # a stream of distinct 1 KiB label values: the cache never holds more than its bound
    for i in range(200):
        parser.parse('x{a="' + str(i) + "v" * 1000 + '"} 1')
        assert parser.cached_chars <= 10_000
    assert len(parser) <= 10


def test_cache_fast_path_never_accepts_what_the_slow_path_rejects():
    parser = promtext.SampleParser()
    parser.parse('x{a="1"} 1')
    for bad in ('x{a="1"} 1_0', 'x{a="1"} ', 'x{a="1"} 1 2 3', 'x{a="1"}  nope'):
        with pytest.raises(promtext.PromTextError):
            parser.parse(bad)


NAME = st.from_regex(r"[a-zA-Z_:][a-zA-Z0-9_:]{0,20}", fullmatch=True)
# Label names starting with "__" are reserved for Prometheus' internal use: prometheus_client's
# parser (the reference here) refuses them, and no exporter writes them.
LABEL = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,10}", fullmatch=True).filter(lambda s: not s.startswith("__"))
VALUE = st.one_of(st.floats(allow_nan=False), st.integers(-10**6, 10**6))


@settings(max_examples=300, deadline=None)
@given(NAME, st.dictionaries(LABEL, st.text(max_size=20), max_size=4), VALUE)
def test_round_trip_with_prometheus_client_exposition(name, labels, value):
    # Lines written the way prometheus_client escapes them are read back exactly.
    from prometheus_client.utils import floatToGoString

    def esc(v: str) -> str:
        return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

    body = ",".join(f'{k}="{esc(v)}"' for k, v in labels.items())
    line = f"{name}{{{body}}} {floatToGoString(value)}"
    sample = promtext.parse_line(line)
    assert sample.name == name and dict(sample.labels) == labels
    assert sample.value == float(value)
    ref = [s for f in text_string_to_metric_families(line + "\n") for s in f.samples]
    assert [(s.name, s.labels, float(s.value)) for s in ref] == [(sample.name, dict(sample.labels), sample.value)]
