"""The reproduction's criteria and its finding sentence, on constructed numbers (no model, no torch)."""

from __future__ import annotations

import math

import pytest

from umerge.demo.criteria import CRITERIA, UNLEARNED_MARGIN, Outcome, auc_interval, finding_sentence, judge


def test_hanley_mcneil_interval_by_hand() -> None:
    # A = 0.5, 10 and 10: Q1 = Q2 = 1/3; SE^2 = (0.25 + 9 (1/3 - 1/4) + 9 (1/3 - 1/4)) / 100 = 0.0175
    lo, hi = auc_interval(0.5, 10, 10)
    half = 1.959963984540054 * math.sqrt(0.0175)
    assert (lo, hi) == pytest.approx((0.5 - half, 0.5 + half), abs=1e-12)
    # A = 0.9, 20 members, 30 nonmembers: Q1 = 0.9 / 1.1, Q2 = 1.62 / 1.9
    q1, q2 = 0.9 / 1.1, 1.62 / 1.9
    se = math.sqrt((0.09 + 19 * (q1 - 0.81) + 29 * (q2 - 0.81)) / 600)
    assert auc_interval(0.9, 20, 30) == pytest.approx((0.9 - 1.959963984540054 * se, min(1.0, 0.9 + 1.959963984540054 * se)))
    assert auc_interval(1.0, 5, 5) == (1.0, 1.0) and auc_interval(0.0, 5, 5) == (0.0, 0.0)
    with pytest.raises(ValueError):
        auc_interval(0.5, 0, 3)


def out(auc: float, aggregate: float, regurgitation: float, n: int = 200) -> Outcome:
    return Outcome(auc=auc, n_members=n, n_nonmembers=n, aggregate=aggregate, forget_regurgitation=regurgitation)


VANILLA = out(0.99, 0.33, 1.0)
PAPER = dict(model1=out(0.02, 0.60, 0.0), model2=out(0.82, 0.70, 0.5), merge=out(0.50, 0.80, 0.2))
TABLE2 = [{"method": "ties", "path": "factor-wise (PEFT semantics)", "aggregate": 0.80},
          {"method": "linear", "path": "factor-wise (PEFT semantics)", "aggregate": 0.5}]


def test_the_paper_numbers_meet_every_criterion() -> None:
    j = judge(VANILLA, **PAPER, table2=TABLE2)
    assert all(j[k] is True for k in CRITERIA) and j["model2_did_not_unlearn"] is False
    sentence = finding_sentence([j])
    assert sentence.startswith("The paper's pattern holds on every criterion (1 seed).")
    assert all(f"{text}: 1 of 1" in sentence for text in CRITERIA.values())


@pytest.mark.parametrize("change, failed", [
    ({"model1": out(0.45, 0.6, 0.0, n=10)}, "model1_over_forgets"),  # below 0.5, but the interval reaches past it
    ({"model2": out(0.55, 0.7, 0.5, n=10)}, "model2_under_forgets"),  # above 0.5, interval reaches below
    ({"merge": out(0.90, 0.8, 0.2)}, "merge_balanced"),  # |0.9 - 0.5| = 0.4, farther than model2's 0.32
    ({"merge": out(0.50, 0.65, 0.2)}, "merge_beats_parents"),
])
def test_each_criterion_fails_alone(change: dict, failed: str) -> None:
    parts = {**PAPER, **change}
    j = judge(VANILLA, **parts, table2=TABLE2)
    assert j[failed] is False
    assert all(j[k] is True for k in CRITERIA if k != failed)
    sentence = finding_sentence([j])
    assert sentence.startswith("The paper's pattern does not hold on every criterion (1 seed).")
    assert f"{CRITERIA[failed]}: 0 of 1" in sentence


def test_ties_not_the_best_method_and_undecided_without_table2() -> None:
    worse = [dict(TABLE2[0]), {"method": "linear", "path": "full update", "aggregate": 0.9}]
    assert judge(VANILLA, **PAPER, table2=worse)["ties_best_method"] is False
    j = judge(VANILLA, **PAPER)
    assert j["ties_best_method"] is None
    assert f"{CRITERIA['ties_best_method']}: not decided" in finding_sentence([j])


def test_a_parent_equal_to_vanilla_did_not_unlearn_and_is_not_under_forgetting() -> None:
    # AUC above 0.5 with a tight interval, but the forget set is regurgitated as before
    stuck = out(0.99, 0.4, VANILLA.forget_regurgitation - UNLEARNED_MARGIN / 2)
    j = judge(VANILLA, PAPER["model1"], stuck, PAPER["merge"], table2=TABLE2)
    assert j["model2_did_not_unlearn"] is True and j["model2_under_forgets"] is False
    assert "model2 did not unlearn" in finding_sentence([j])
    at_margin = out(0.99, 0.4, VANILLA.forget_regurgitation - UNLEARNED_MARGIN)
    assert judge(VANILLA, PAPER["model1"], at_margin, PAPER["merge"])["model2_under_forgets"] is True


def test_counts_over_seeds() -> None:
    good = judge(VANILLA, **PAPER, table2=TABLE2)
    bad = judge(VANILLA, PAPER["model1"], PAPER["model2"], out(0.5, 0.1, 0.2), table2=TABLE2)
    sentence = finding_sentence([good, bad, good])
    assert "(3 seeds)" in sentence and f"{CRITERIA['merge_beats_parents']}: 2 of 3" in sentence
    assert f"{CRITERIA['model1_over_forgets']}: 3 of 3" in sentence
    assert finding_sentence([]).startswith("No run could be judged")
