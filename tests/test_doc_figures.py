"""The simulator numbers in the docs match the committed runs (text and JSON only: no simulation).

``scripts/regenerate_docs.py`` reruns the reproductions and re-renders the marked numbers;
this test fails when a doc quotes a number that ``docs/reproductions/figures.json`` does not
hold, or figures.json no longer matches the committed ``summary.json`` files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from heteroscale.simulator import figures

REPO = Path(__file__).resolve().parents[1]


def test_docs_quote_the_committed_runs():
    assert figures.check(REPO) == []


def test_every_doc_with_simulator_figures_is_marked():
    marked = {str(d) for d in figures.DOCS if (REPO / d).is_file()
              and (figures.INLINE.search((REPO / d).read_text()) or figures.BLOCK.search((REPO / d).read_text()))}
    assert {"README.md", "docs/simulator.md", "docs/reproductions/README.md", "docs/benchmarks.md"} <= marked
    # Every reproduction folder's numbers are extracted.
    figs = json.loads((REPO / figures.FIGURES).read_text())
    assert set(figures.RUNS) <= set(figs)


def _mini_repo(tmp_path: Path) -> Path:
    for rel in [figures.FIGURES, figures.BENCH, *[Path("docs/reproductions") / r / "summary.json" for r in figures.RUNS],
                *figures.DOCS]:
        src = REPO / rel
        if src.is_file():
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, tmp_path / rel)
    if (REPO / figures.CONTROL).is_file():
        (tmp_path / figures.CONTROL).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / figures.CONTROL, tmp_path / figures.CONTROL)
    return tmp_path


def test_a_hand_edited_number_is_caught(tmp_path: Path):
    repo = _mini_repo(tmp_path)
    readme = repo / "docs" / "reproductions" / "README.md"
    text = readme.read_text()
    m = figures.INLINE.search(text)
    assert m is not None
    readme.write_text(text[:m.start(3)] + "12345" + text[m.end(3):])
    problems = figures.check(repo)
    assert len(problems) == 1 and m.group(1) in problems[0] and "12345" in problems[0]


def test_a_rerun_without_sync_is_caught_and_sync_fixes_it(tmp_path: Path):
    repo = _mini_repo(tmp_path)
    path = repo / "docs" / "reproductions" / "policy-day" / "summary.json"
    doc = json.loads(path.read_text())
    doc["policies"]["heteroscale"]["gpu_hours"] = 1.0          # a "new run"
    path.write_text(json.dumps(doc))
    problems = figures.check(repo)
    assert any("policy-day differs from its summary" in p for p in problems)
    figures.sync(repo, figures.extract(repo))
    assert figures.check(repo) == []
    assert "| heteroscale | 1.0 |" in (repo / "docs" / "reproductions" / "README.md").read_text()


def test_inline_marks_format_and_render():
    figs = {"run": {"policies": {"a": {"x": -0.4338, "n": 2008123, "none": None}}}}
    text = ("saved <!--fig:run.policies.a.x:+.1%-->?<!--/fig--> of "
            "<!--fig:run.policies.a.n:,d-->?<!--/fig--> <!--fig:run.policies.a.none:.1f-->?<!--/fig-->")
    out = figures.render(text, figs)
    assert "-->−43.4%<!--" in out and "-->2,008,123<!--" in out and "-->—<!--" in out
    assert figures.problems_in(out, figs, where="t") == []
    assert figures.problems_in(text, figs, where="t")[0].startswith("t: run.policies.a.x reads '?'")
    assert "not in" in figures.problems_in("<!--fig:nope.x-->1<!--/fig-->", figs, where="t")[0]


def test_a_decision_reason_a_run_never_gave_reads_zero_and_other_gaps_stay_errors():
    # A rerun in which the latency net never stepped severely has no such count; the doc
    # sentence quoting it reads 0 instead of breaking the sync.
    figs = {"run": {"policies": {"a": {"decision_reasons": {"latency_moderate": 9}}}}}
    assert figures.lookup(figs, "run.policies.a.decision_reasons.latency_moderate") == 9
    assert figures.lookup(figs, "run.policies.a.decision_reasons.latency_severe") == 0
    for missing in ("run.policies.b.decision_reasons.latency_severe", "run.policies.a.gpu_hours",
                    "run.policies.a.decision_reasons.latency_severe.x"):
        with pytest.raises(KeyError):
            figures.lookup(figs, missing)


def test_control_table_renders_every_day_and_policy():
    row = {"gpu_hours": 12.34, "vs_static_peak": 0.62, "slo_attainment": 0.991, "ttft_minutes_ok": 0.98,
           "tbt_minutes_ok": 1.0, "reversals": 3, "reversals_per_2h": 0.25, "first_scale_out_s": 45.0,
           "slo_restored_s": 0.0}
    doc = {"days": {"e-step": {"tag": "tune", "title": "3× step", "sources": "generated", "requests": 1000,
                               "duration_h": 1.0, "quick": False, "step_at_s": 1200.0,
                               "curated": {"on": "the mix", "pd_ratio": "2:1", "tau": 1500.0,
                                           "prefill_target_tps_per_instance": 8000.0,
                                           "yesterday_peak_decode_tps": 9000.0},
                               "policies": {"heteroscale": row, "static-peak": dict(row, vs_static_peak=1.0)}}}}
    lines = figures.control_lines(doc)
    assert lines[0] == "### e-step (tune): 3× step"
    assert any(line.startswith("| heteroscale | 12.3 | 0.62 | 99.1% | 98% | 100% | 3 | 0.25 | 45 | 0 |")
               for line in lines), lines


@pytest.mark.parametrize("run", figures.RUNS)
def test_extract_run_reads_each_committed_summary(run: str):
    doc = json.loads((REPO / "docs" / "reproductions" / run / "summary.json").read_text())
    got = figures.extract_run(doc)
    for name, p in got["policies"].items():
        assert p["gpu_hours"] == doc["policies"][name]["gpu_hours"]
        if "static-peak" in got["policies"] and p["vs_static_peak"] is not None:
            assert p["vs_static_peak"] == pytest.approx(
                doc["policies"][name]["gpu_hours"] / doc["policies"]["static-peak"]["gpu_hours"] - 1, abs=1e-4)


def test_the_committed_ratio_sweeps_peak_within_one_step_of_the_paper():
    # The paper's Fig. 4: Service A peaks at 9P7D, Service B at 10P6D (16 instances); the
    # simulator's reproduction must land within one split of each, and be bell-shaped
    # (both ends of the sweep clearly below the peak).
    figs = figures.extract(REPO)
    for run, paper in (("ratio-sweep-a", 9), ("ratio-sweep-b", 10)):
        pressure = figs[run]["pressure"]
        best = int(pressure["best"].split("P")[0])
        assert abs(best - paper) <= 1, (run, pressure["best"])
        assert min(pressure["edge_drop"].values()) >= 0.15, (run, pressure["edge_drop"])
