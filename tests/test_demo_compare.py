"""`umerge demo --compare-methods` without training: its criteria, the under variant, the config field,
the judging of rows and the summary over seeds, all on constructed numbers (no model, no torch)."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

from umerge.demo.compare import judge_rows
from umerge.demo.config import (
    COMPARE_METHODS_DEFAULT,
    apply_overrides,
    check_compare_methods,
    config_for,
    under_variant_overrides,
)
from umerge.demo.criteria import (
    INT4_MARGIN,
    METHOD_CRITERIA,
    PAIR_CRITERIA,
    UNLEARNED_MARGIN,
    UTILITY_KEPT_FRACTION,
    MethodOutcome,
    judge_method,
    judge_pair,
)
from umerge.demo.pipeline import DemoOptions
from umerge.demo.render import COMPARISON_COLUMNS
from umerge.demo.seeds import render, summarize, summarize_comparison
from umerge.errors import InputError


def m(auc: float | None = 0.5, agg: float | None = 0.5, mmlu: float | None = 0.9, reg: float | None = 0.2,
      know: float | None = 0.1, int4: float | None = 0.1) -> MethodOutcome:
    return MethodOutcome(auc=auc, aggregate=agg, mmlu=mmlu, forget_regurgitation=reg, forget_knowledge=know,
                         forget_knowledge_int4=int4)


VANILLA = m(auc=1.0, agg=0.33, mmlu=1.0, reg=0.9, know=0.95, int4=0.95)


def test_the_fixed_thresholds() -> None:
    assert (UNLEARNED_MARGIN, UTILITY_KEPT_FRACTION, INT4_MARGIN) == (0.10, 0.8, 0.05)
    assert set(METHOD_CRITERIA) == {"unlearns", "keeps_utility", "survives_int4"}
    assert set(PAIR_CRITERIA) == {"balanced", "above_both"}


def test_judge_method_on_constructed_numbers() -> None:
    # forget regurgitation 0.2 against vanilla's 0.9, MMLU 0.9 of 1.0, int4 equal to full precision
    assert judge_method(VANILLA, m()) == {"unlearns": True, "keeps_utility": True, "survives_int4": True}
    # 0.85 is only 0.05 below vanilla's 0.9: did not unlearn; MMLU 0.7 < 0.8 x 1.0; int4 0.1 -> 0.2 (+0.1)
    j = judge_method(VANILLA, m(reg=0.85, mmlu=0.7, know=0.1, int4=0.2))
    assert j == {"unlearns": False, "keeps_utility": False, "survives_int4": False}
    # the boundaries, by hand: 0.75 = 0.9 - 0.15 unlearns; 0.85 x 0.8 = 0.68 kept at 0.7; int4 +0.04 survives
    v = m(reg=0.9, mmlu=0.85)
    assert judge_method(v, m(reg=0.75, mmlu=0.7, know=0.0, int4=0.04)) == {
        "unlearns": True, "keeps_utility": True, "survives_int4": True}
    assert judge_method(v, m(reg=0.81, mmlu=0.67, know=0.0, int4=0.06)) == {
        "unlearns": False, "keeps_utility": False, "survives_int4": False}
    # knowledge falling after int4 survives
    assert judge_method(VANILLA, m(know=0.3, int4=0.0))["survives_int4"] is True
    # missing numbers: not decided
    j = judge_method(VANILLA, m(reg=None, mmlu=None, int4=None))
    assert j == {"unlearns": None, "keeps_utility": None, "survives_int4": None}


def test_judge_pair_on_constructed_numbers() -> None:
    # the paper's AUCs 0.022 / 0.818 / 0.501, merge above both
    assert judge_pair(m(auc=0.022, agg=0.6), m(auc=0.818, agg=0.7), m(auc=0.501, agg=0.8)) == {
        "balanced": True, "above_both": True}
    # two over-forgetting parents (0.2, 0.4) and a merge at 0.35: |0.35 - 0.5| = 0.15 > 0.1; below model2's 0.7
    assert judge_pair(m(auc=0.2, agg=0.5), m(auc=0.4, agg=0.7), m(auc=0.35, agg=0.6)) == {
        "balanced": False, "above_both": False}
    # equal distance is not below; equal aggregate is not above
    assert judge_pair(m(auc=0.25, agg=0.5), m(auc=0.875, agg=0.625), m(auc=0.75, agg=0.625)) == {
        "balanced": False, "above_both": False}
    # a missing AUC leaves balance undecided, the aggregates still decide the other
    assert judge_pair(m(auc=None, agg=0.4), m(agg=0.5), m(agg=0.6)) == {"balanced": None, "above_both": True}
    assert judge_pair(m(agg=None), m(), m()) == {"balanced": False, "above_both": None}


def test_under_variant_is_model2_from_model1() -> None:
    # zjuklab-model1 (0.4 / 0.4 / 0.2, batch 1) -> zjuklab-model2's 0.3 / 0.3 / 0.4, batch 2
    u = under_variant_overrides("npo_gdr_klr")
    assert u["npo_weight"] == pytest.approx(0.3) and u["kl_weight"] == pytest.approx(0.3)
    assert u["retain_weight"] == pytest.approx(0.4) and u["batch_size"] == 2
    # the 1 / 1 methods: forget x 0.75, retain x 2
    for method in ("grad_diff", "simnpo", "dpo"):
        assert under_variant_overrides(method) == {"forget_weight": 0.75, "retain_weight": 2.0, "batch_size": 2}
    for method in ("grad_ascent", "npo", "rmu", "undial"):
        with pytest.raises(InputError, match="no under variant"):
            under_variant_overrides(method)


def test_compare_methods_setting() -> None:
    assert check_compare_methods(["idkdpo", "grad_diff", "dpo"]) == ("dpo", "grad_diff")
    with pytest.raises(InputError, match="unknown method 'gd'"):
        check_compare_methods(["gd"])
    cfg = apply_overrides(config_for(quick=True), {"compare_methods": "grad_diff,undial"})
    assert cfg.compare_methods == ("grad_diff", "undial")
    assert config_for(quick=True).compare_methods == ()  # off by default
    with pytest.raises(InputError):
        apply_overrides(config_for(quick=True), {"compare_methods": "grad_diff,nope"})
    # the flag alone: every method; with --set: the listed ones; the command line says so
    opts = DemoOptions(out="x", quick=True, compare_methods=True)
    assert opts.resolved_config().compare_methods == COMPARE_METHODS_DEFAULT and "--compare-methods" in opts.command()
    opts = DemoOptions(out="x", quick=True, compare_methods=True, settings={"compare_methods": "undial"})
    assert opts.resolved_config().compare_methods == ("undial",)
    assert "--compare-methods" not in DemoOptions(out="x").command()


def _row(method: str, variant: str, **scores: float | None) -> dict:
    base = {"mia_auc": 0.5, "aggregate": 0.5, "mmlu": 0.9, "forget_regurgitation": 0.2, "forget_knowledge": 0.1,
            "forget_knowledge_int4": 0.1}
    return {"method": method, "variant": variant, "name": f"{method}-{variant}", **{**base, **scores}}


def test_judge_rows_applies_the_pair_criteria_to_merges_only() -> None:
    vanilla = {"mia_auc": 1.0, "aggregate": 0.33, "mmlu": 1.0, "forget_regurgitation": 0.9,
               "forget_knowledge": 0.95, "forget_knowledge_int4": 0.95}
    rows = [_row("grad_diff", "preset", mia_auc=0.2, aggregate=0.5),
            _row("grad_diff", "under", mia_auc=0.9, aggregate=0.6, forget_regurgitation=0.85),
            _row("grad_diff", "TIES merge", mia_auc=0.55, aggregate=0.7, mmlu=0.5),
            _row("undial", "preset", forget_knowledge=0.0, forget_knowledge_int4=0.3)]
    judge_rows(rows, vanilla)
    assert rows[0]["criteria"] == {"unlearns": True, "keeps_utility": True, "survives_int4": True}
    assert rows[1]["criteria"]["unlearns"] is False  # 0.85 is within 0.1 of 0.9
    assert rows[2]["criteria"] == {"unlearns": True, "keeps_utility": False, "survives_int4": True,
                                   "balanced": True, "above_both": True}
    assert rows[3]["criteria"] == {"unlearns": True, "keeps_utility": True, "survives_int4": False}


def _seed_report(auc_preset: float, agg_merge: float, int4: float) -> dict:
    vanilla = {"mia_auc": 1.0, "task_aggregate": 0.0, "mmlu": 1.0, "aggregate": 0.33, "forget_regurgitation": 0.9,
               "retain_regurgitation": 0.95, "forget_knowledge": 0.95, "forget_knowledge_int4": 0.95}
    rows = [_row("grad_diff", "preset", mia_auc=auc_preset, aggregate=0.5),
            _row("grad_diff", "under", mia_auc=0.9, aggregate=0.6),
            _row("grad_diff", "TIES merge", mia_auc=0.5, aggregate=agg_merge),
            _row("undial", "preset", forget_knowledge=0.0, forget_knowledge_int4=int4)]
    for r in rows:
        r["task_aggregate"], r["retain_regurgitation"] = 0.4, 0.5
    judge_rows(rows, vanilla)
    scores = {"vanilla": {**vanilla, "forget_knowledge_int4": int4}, "model1": {**vanilla, "mia_auc": auc_preset}}
    return {"table1": ["vanilla", "model1"], "scores": scores, "findings": {"available": False},
            "method_comparison": {"rows": rows, "vanilla": vanilla, "criteria": {**METHOD_CRITERIA, **PAIR_CRITERIA},
                                  "note": "NOTE"}}


def test_summary_over_seeds_of_the_comparison() -> None:
    reports = {3: _seed_report(0.1, 0.7, 0.0), 4: _seed_report(0.2, 0.55, 0.2), 5: _seed_report(0.6, 0.8, 0.04)}
    s = summarize(reports)
    c = s["method_comparison"]
    assert [(r["method"], r["variant"]) for r in c["rows"]] == [
        ("grad_diff", "preset"), ("grad_diff", "under"), ("grad_diff", "TIES merge"), ("undial", "preset")]
    auc = c["rows"][0]["scores"]["mia_auc"]
    assert auc["mean"] == pytest.approx(0.3) and auc["sd"] == pytest.approx(statistics.stdev([0.1, 0.2, 0.6]))
    assert auc["per_seed"] == {3: 0.1, 4: 0.2, 5: 0.6} and 0.1 <= auc["ci95"][0] <= auc["ci95"][1] <= 0.6
    assert set(c["rows"][0]["scores"]) == set(COMPARISON_COLUMNS)
    merge = c["rows"][2]["criteria"]
    # above both parents (0.5, 0.6) on seeds 3 and 5; balanced: |0.5 - 0.5| below both on every seed
    assert merge["above_both"]["held"] == 2 and merge["above_both"]["decided"] == 3
    assert merge["balanced"]["held"] == 3
    # undial's int4 rise: 0.0 -> 0.0 (survives), 0.2 (does not), 0.04 (survives)
    assert c["rows"][3]["criteria"]["survives_int4"] == {"held": 2, "decided": 3,
                                                         "per_seed": {3: True, 4: False, 5: True}}
    assert "balanced" not in c["rows"][3]["criteria"]
    # Table 1's int4 column is summarised too
    t = s["table"]["vanilla"]["forget_knowledge_int4"]
    assert t["mean"] == pytest.approx((0.0 + 0.2 + 0.04) / 3) and t["n"] == 3
    md = render(s, "umerge demo --seeds 3,4,5 --compare-methods")
    assert "## Unlearning methods compared over seeds" in md
    assert "| grad_diff | TIES merge |" in md and "| 2 of 3 | " in md
    assert f"{auc['mean']:.4f} ± {auc['sd']:.4f} [{auc['ci95'][0]:.4f}, {auc['ci95'][1]:.4f}]" in md
    assert "forget knowledge after int4" in md


def test_no_comparison_summary_unless_every_seed_has_one() -> None:
    reports = {3: _seed_report(0.1, 0.7, 0.0), 4: _seed_report(0.2, 0.55, 0.2)}
    del reports[4]["method_comparison"]
    assert summarize_comparison(reports) is None and "method_comparison" not in summarize(reports)


def test_pooling_per_seed_runs_equals_one_summary(tmp_path: Path) -> None:
    """benches/demo_pool_seeds.py: seed reports from two `--seeds` directories give the summary of all."""
    reports = {3: _seed_report(0.1, 0.7, 0.0), 4: _seed_report(0.2, 0.55, 0.2), 6: _seed_report(0.6, 0.8, 0.04)}
    for seed, rep in reports.items():
        d = tmp_path / ("a" if seed < 5 else "b") / f"seed-{seed}"
        d.mkdir(parents=True)
        (d / "report.json").write_text(json.dumps(rep))
    path = Path(__file__).resolve().parents[1] / "benches" / "demo_pool_seeds.py"
    spec = importlib.util.spec_from_file_location("demo_pool_seeds", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["-o", str(tmp_path / "pooled"), str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    pooled = json.loads((tmp_path / "pooled" / "report.json").read_text())
    direct = json.loads(json.dumps(summarize(reports), default=str))
    assert pooled["seeds"] == [3, 4, 6]
    assert pooled["method_comparison"] == direct["method_comparison"] and pooled["table"] == direct["table"]
    # a seed twice is refused
    (tmp_path / "b" / "seed-3").mkdir()
    (tmp_path / "b" / "seed-3" / "report.json").write_text(json.dumps(reports[3]))
    assert mod.main(["-o", str(tmp_path / "p2"), str(tmp_path / "a"), str(tmp_path / "b")]) == 2
