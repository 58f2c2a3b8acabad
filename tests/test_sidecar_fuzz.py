"""A short run of the sidecar fuzzer (tests/sidecar_fuzz.py) in the default suite.

The long run (>= 10,000 pages and 10,000 report bodies) is a benchmark:
``.venv/bin/python benchmarks/fuzz_bench.py`` (results in benchmarks/results/fuzz.json).
"""

from __future__ import annotations

from tests import sidecar_fuzz


def test_fuzzed_pages_and_reports_never_crash_or_leak_non_finite_values():
    result = sidecar_fuzz.run(pages_n=100, reports_n=500, seed=20261202)
    assert result.ok, result.summary()
    # the stream exercised what it is meant to: valid parses, every refusal kind, accepted reports
    assert result.pages_parsed > 0 and result.reports_accepted > 0 and result.reports_refused > 0
    assert {"parse", "too_large", "wrong_engine"} <= set(result.page_errors)


def test_the_checks_catch_what_they_look_for():
    # A page check that cannot fail would prove nothing: an infinite rate must be reported.
    from heteroscale.report import parse_report_json
    result = sidecar_fuzz.FuzzResult()
    sidecar_fuzz.check_report(b'{"service": "s", "role": "decode", "pod": "p", "engine_up": true, "stale": false, '
                              b'"observed_at": 1, "window_s": 1, "decode_tps": 5}', result, "ok")
    assert result.reports_accepted == 1 and result.ok
    assert parse_report_json is not None
    result.non_finite.append("synthetic")
    assert not result.ok
