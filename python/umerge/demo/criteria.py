"""The reproduction's criteria, fixed before any run: what the demo may claim about the paper's pattern.

The paper's finding (ZJUKLAB, SemEval-2025 Task 4): an over-forgetting model (MIA AUC 0.022) and an
under-forgetting one (0.818), merged with TIES, give a balanced model (AUC 0.501) whose final
aggregate is above both. A run is judged on exactly these criteria, and the report's finding
sentence says which of them hold, on how many seeds, and nothing else:

1. **model1 over-forgets**: the upper end of its AUC's 95% interval is below 0.5;
2. **model2 under-forgets**: the lower end of its AUC's interval is above 0.5 *and* its forget
   regurgitation is clearly below the vanilla model's (by at least `UNLEARNED_MARGIN`); a model
   whose forget regurgitation is within the margin of vanilla's "did not unlearn", which is not
   under-forgetting;
3. **the merge is balanced**: |AUC - 0.5| of the factor-wise TIES merge is below both parents';
4. **the merge beats both parents**: its final aggregate is above both parents';
5. **TIES is the best method**: the factor-wise TIES merge has the highest final aggregate of
   Table 2's rows.

The AUC's interval is Hanley and McNeil's (Radiology 143, 1982): with A the AUC, n1 members and
n0 nonmembers, Q1 = A / (2 - A), Q2 = 2 A^2 / (1 + A),
SE^2 = (A (1 - A) + (n1 - 1)(Q1 - A^2) + (n0 - 1)(Q2 - A^2)) / (n1 n0), and the interval
A -+ 1.96 SE, clipped to [0, 1]. It treats members as independent; correlated members (several rows
of one document) make it too narrow.

The method comparison (`umerge demo --compare-methods`) is judged by criteria fixed here as well,
before any run, per trained model (`judge_method`) and per merged over/under pair (`judge_pair`):

- **unlearns**: forget regurgitation at least `UNLEARNED_MARGIN` below vanilla's (criterion 2's rule);
- **keeps utility**: MMLU-format accuracy at least `UTILITY_KEPT_FRACTION` (0.8) of vanilla's, so a
  method that forgets by destroying the model does not pass on forgetting alone;
- **survives int4**: forget knowledge after int4 fake quantization at most `INT4_MARGIN` (0.05) above
  the full-precision forget knowledge (Zhang et al. 2025 found unlearned knowledge coming back);
- a merge of a method's over and under variants is **balanced** when |AUC - 0.5| is below both
  parents' (criterion 3), and **above both** when its final aggregate is above both parents'
  (criterion 4).

A criterion whose numbers are missing (no MIA data, no probe) is None: not decided.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: How far below vanilla's forget regurgitation a model must be to count as having unlearned.
UNLEARNED_MARGIN = 0.10
Z95 = 1.959963984540054

CRITERIA = {
    "model1_over_forgets": "model1 over-forgets (AUC's upper 95% bound < 0.5)",
    "model2_under_forgets": "model2 under-forgets (AUC's lower 95% bound > 0.5 and forget regurgitation "
                            f"at least {UNLEARNED_MARGIN} below vanilla's)",
    "merge_balanced": "the factor-wise TIES merge is balanced (|AUC - 0.5| below both parents')",
    "merge_beats_parents": "the merge's final aggregate is above both parents'",
    "ties_best_method": "factor-wise TIES has the best final aggregate of Table 2",
}


def auc_interval(auc: float, n_members: int, n_nonmembers: int, z: float = Z95) -> tuple[float, float]:
    """Hanley-McNeil 95% interval of an AUC from n_members positives and n_nonmembers negatives."""
    if n_members < 1 or n_nonmembers < 1:
        raise ValueError(f"an AUC interval needs members and nonmembers, got {n_members} and {n_nonmembers}")
    a = min(max(auc, 0.0), 1.0)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_members - 1) * (q1 - a * a) + (n_nonmembers - 1) * (q2 - a * a)) / (n_members * n_nonmembers)
    se = math.sqrt(max(var, 0.0))
    return max(0.0, a - z * se), min(1.0, a + z * se)


@dataclass(frozen=True)
class Outcome:
    """What the criteria read of one model in one run."""

    auc: float
    n_members: int
    n_nonmembers: int
    aggregate: float
    forget_regurgitation: float

    @property
    def interval(self) -> tuple[float, float]:
        return auc_interval(self.auc, self.n_members, self.n_nonmembers)


def judge(vanilla: Outcome, model1: Outcome, model2: Outcome, merge: Outcome,
          table2: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Each criterion of the module doc, true or false, with the numbers it was decided on.

    `table2` rows need "method", "path" and "aggregate"; the TIES criterion is None without them.
    """
    lo1, hi1 = model1.interval
    lo2, hi2 = model2.interval
    unlearned2 = model2.forget_regurgitation <= vanilla.forget_regurgitation - UNLEARNED_MARGIN
    out: dict[str, Any] = {
        "model1_over_forgets": hi1 < 0.5,
        "model2_under_forgets": lo2 > 0.5 and unlearned2,
        "model2_did_not_unlearn": not unlearned2,
        "merge_balanced": abs(merge.auc - 0.5) < min(abs(model1.auc - 0.5), abs(model2.auc - 0.5)),
        "merge_beats_parents": merge.aggregate > max(model1.aggregate, model2.aggregate),
        "ties_best_method": None,
        "intervals": {"model1": [lo1, hi1], "model2": [lo2, hi2], "merge": list(merge.interval)},
    }
    if table2:
        rows = [r for r in table2 if r.get("aggregate") is not None]
        if rows:
            best = max(rows, key=lambda r: r["aggregate"])
            out["ties_best_method"] = best["method"] == "ties" and str(best.get("path", "")).startswith("factor")
            out["best_method"] = f"{best['method']}, {best.get('path', '')}"
    return out


#: Keeps utility: MMLU-format accuracy at least this fraction of vanilla's.
UTILITY_KEPT_FRACTION = 0.8
#: Survives int4: forget knowledge after int4 at most this much above full precision.
INT4_MARGIN = 0.05

METHOD_CRITERIA = {
    "unlearns": f"unlearns (forget regurgitation at least {UNLEARNED_MARGIN} below vanilla's)",
    "keeps_utility": f"keeps utility (MMLU-format accuracy at least {UTILITY_KEPT_FRACTION} x vanilla's)",
    "survives_int4": f"survives int4 (forget knowledge after int4 at most {INT4_MARGIN} above full precision)",
}
PAIR_CRITERIA = {
    "balanced": "the TIES merge of the over/under pair is balanced (|AUC - 0.5| below both parents')",
    "above_both": "the merge's final aggregate is above both parents'",
}


@dataclass(frozen=True)
class MethodOutcome:
    """What the method-comparison criteria read of one model (None: not measured)."""

    auc: float | None
    aggregate: float | None
    mmlu: float | None
    forget_regurgitation: float | None
    forget_knowledge: float | None
    forget_knowledge_int4: float | None


def judge_method(vanilla: MethodOutcome, model: MethodOutcome) -> dict[str, bool | None]:
    """`METHOD_CRITERIA` for one unlearned model against the vanilla model."""

    out: dict[str, bool | None] = {"unlearns": None, "keeps_utility": None, "survives_int4": None}
    reg, reg0 = model.forget_regurgitation, vanilla.forget_regurgitation
    if reg is not None and reg0 is not None:
        out["unlearns"] = reg <= reg0 - UNLEARNED_MARGIN
    mmlu, mmlu0 = model.mmlu, vanilla.mmlu
    if mmlu is not None and mmlu0 is not None:
        out["keeps_utility"] = mmlu >= UTILITY_KEPT_FRACTION * mmlu0
    full, int4 = model.forget_knowledge, model.forget_knowledge_int4
    if full is not None and int4 is not None:
        out["survives_int4"] = int4 - full <= INT4_MARGIN
    return out


def judge_pair(over: MethodOutcome, under: MethodOutcome, merge: MethodOutcome) -> dict[str, bool | None]:
    """`PAIR_CRITERIA` for the merge of one method's over and under variants."""
    out: dict[str, bool | None] = {"balanced": None, "above_both": None}
    if over.auc is not None and under.auc is not None and merge.auc is not None:
        out["balanced"] = abs(merge.auc - 0.5) < min(abs(over.auc - 0.5), abs(under.auc - 0.5))
    if over.aggregate is not None and under.aggregate is not None and merge.aggregate is not None:
        out["above_both"] = merge.aggregate > max(over.aggregate, under.aggregate)
    return out


def finding_sentence(judgements: Sequence[Mapping[str, Any]]) -> str:
    """What the runs show, criterion by criterion, counted over seeds; nothing beyond that."""
    n = len(judgements)
    if n == 0:
        return "No run could be judged (MIA AUCs missing)."
    seeds = "seed" if n == 1 else "seeds"
    parts = []
    for key, text in CRITERIA.items():
        decided = [j[key] for j in judgements if j.get(key) is not None]
        if not decided:
            parts.append(f"{text}: not decided")
            continue
        parts.append(f"{text}: {sum(bool(v) for v in decided)} of {len(decided)}")
    not_unlearned = sum(bool(j.get("model2_did_not_unlearn")) for j in judgements)
    tail = (f" model2 did not unlearn (forget regurgitation within {UNLEARNED_MARGIN} of vanilla's) on "
            f"{not_unlearned} of {n} {seeds}." if not_unlearned else "")
    held = all(all(j.get(k) for k in CRITERIA) for j in judgements)
    head = ("The paper's pattern holds on every criterion" if held
            else "The paper's pattern does not hold on every criterion")
    return f"{head} ({n} {seeds}). " + "; ".join(parts) + "." + tail


__all__ = ["CRITERIA", "UNLEARNED_MARGIN", "UTILITY_KEPT_FRACTION", "INT4_MARGIN", "METHOD_CRITERIA",
           "PAIR_CRITERIA", "Outcome", "MethodOutcome", "auc_interval", "judge", "judge_method", "judge_pair",
           "finding_sentence"]
