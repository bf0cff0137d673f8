"""`umerge demo --seeds`: seed lists, the bootstrap, the summary over seeds (constructed reports, no training)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from umerge.demo.criteria import Outcome, judge
from umerge.demo.pipeline import DemoOptions
from umerge.demo.seeds import bootstrap_interval, parse_seeds, run_seeds, summarize
from umerge.errors import InputError


def test_parse_seeds() -> None:
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("3,5, 9") == [3, 5, 9]
    assert parse_seeds("0-2,7,1") == [0, 1, 2, 7]
    for bad in ("", "a", "4-2", "1-", "-3"):
        with pytest.raises(InputError):
            parse_seeds(bad)


def test_bootstrap_interval_by_hand() -> None:
    assert bootstrap_interval([0.3, 0.3, 0.3]) == pytest.approx((0.3, 0.3))
    # two values 0 and 1: the mean of a resample is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4
    assert bootstrap_interval([0.0, 1.0]) == (0.0, 1.0)
    lo, hi = bootstrap_interval([0.0, 0.0, 0.0, 1.0])  # P(mean = 0) = (3/4)^4 = 0.32 > 2.5%
    assert lo == 0.0 and 0.5 <= hi <= 0.75


def _report(seed: int, auc1: float, agg_merge: float) -> dict:
    def o(auc: float, agg: float, reg: float) -> Outcome:
        return Outcome(auc=auc, n_members=50, n_nonmembers=50, aggregate=agg, forget_regurgitation=reg)

    v, m1, m2, mg = o(0.99, 0.3, 1.0), o(auc1, 0.5, 0.0), o(0.85, 0.6, 0.4), o(0.5, agg_merge, 0.2)
    scores = {name: {"mia_auc": x.auc, "task_aggregate": x.aggregate / 2, "mmlu": 0.8, "aggregate": x.aggregate}
              for name, x in (("vanilla", v), ("model1", m1), ("model2", m2), ("merge-ties-factorwise", mg))}
    return {"table1": list(scores), "scores": scores,
            "findings": {"available": True, "judgement": judge(v, m1, m2, mg)}}


def test_summary_statistics_and_sentence() -> None:
    reports = {3: _report(3, 0.10, 0.7), 4: _report(4, 0.20, 0.5), 5: _report(5, 0.30, 0.8)}
    s = summarize(reports)
    auc = s["table"]["model1"]["mia_auc"]
    assert auc["mean"] == pytest.approx(0.2) and auc["sd"] == pytest.approx(0.1)  # sample sd of .1 .2 .3
    assert auc["per_seed"] == {3: 0.10, 4: 0.20, 5: 0.30} and auc["n"] == 3
    assert 0.1 <= auc["ci95"][0] <= 0.2 <= auc["ci95"][1] <= 0.3
    agg = s["table"]["merge-ties-factorwise"]["aggregate"]
    sd = math.sqrt(sum((x - 2 / 3) ** 2 for x in (0.7, 0.5, 0.8)) / 2)
    assert agg["mean"] == pytest.approx(2.0 / 3) and agg["sd"] == pytest.approx(sd)
    assert "(3 seeds)" in s["sentence"]
    # seed 4's merge (0.5) is below model2 (0.6)
    assert "the merge's final aggregate is above both parents': 2 of 3" in s["sentence"]
    assert s["models"] == ["vanilla", "model1", "model2", "merge-ties-factorwise"]


def test_run_seeds_runs_each_seed_and_writes_the_summary(tmp_path: Path) -> None:
    ran: list[int] = []

    def fake_run(opts: DemoOptions) -> Path:
        ran.append(opts.seed)
        out = Path(opts.out)
        out.mkdir(parents=True)
        (out / "report.json").write_text(json.dumps(_report(opts.seed, 0.1 + 0.05 * opts.seed, 0.7)))
        return out / "report.md"

    opts = DemoOptions(out=tmp_path / "multi", quick=True, progress=False)
    md = run_seeds(opts, [0, 2], run_one=fake_run)
    assert ran == [0, 2] and md == tmp_path / "multi" / "report.md"
    summary = json.loads((tmp_path / "multi" / "report.json").read_text())
    assert summary["seeds"] == [0, 2] and "--seeds 0,2" in summary["command"] and "--quick" in summary["command"]
    text = md.read_text()
    assert summary["sentence"] in text and "| 2 | model1 |" in text
    with pytest.raises(InputError, match="not empty"):  # an existing run is never overwritten silently
        run_seeds(replace(opts), [0], run_one=fake_run)
