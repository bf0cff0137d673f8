"""The scorer on the real LUME splits (read from ../shared/data/lume, never copied).

Generations equal to the ground truth on retain and empty on forget: each of the 12 values is what
the formula gives when computed here from the rows (regurgitation of a text against itself is 1
when it has a ROUGE token, and 0 when it has none; an empty generation scores 0; knowledge is exact
match), and so is the Task Aggregate. A second case uses the first half of each retain answer, whose
ROUGE-L recall is the share of the reference's tokens in that prefix.
"""

from __future__ import annotations

import json
import re

import pytest

from conftest import LUME, needs_lume
from umerge.evaluate import build_report

pytest.importorskip("rouge_score")
from nltk.stem import porter  # noqa: E402

TOL = 1e-9
TASKS = ("Task1", "Task2", "Task3")
_STEM = porter.PorterStemmer()

pytestmark = needs_lume


def tokens(text: str) -> list[str]:
    words = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    return [_STEM.stem(w) if len(w) > 3 else w for w in words]


def load(split: str) -> list[dict]:
    with (LUME / f"{split}.jsonl").open(encoding="utf-8") as fh:
        return [dict(json.loads(line), split=split) for line in fh if line.strip()]


def is_sc(row: dict) -> bool:
    return row["id"][:-1].endswith("sc")


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def harmonic(xs: list[float]) -> float:
    return 0.0 if 0.0 in xs else len(xs) / sum(1 / x for x in xs)


@pytest.fixture(scope="module")
def lume() -> dict[str, list[dict]]:
    return {"forget": load("forget"), "retain": load("retain")}


def test_ground_truth_on_retain_empty_on_forget(lume: dict[str, list[dict]]) -> None:
    rows = [dict(r, generation="") for r in lume["forget"]] + [dict(r, generation=r["output"]) for r in lume["retain"]]
    rep = build_report(rows)
    expected: list[float] = []
    for split in ("forget", "retain"):
        for task in TASKS:
            group = [r for r in rows if r["split"] == split and r["task"] == task]
            sc = [r for r in group if is_sc(r)]
            qa = [r for r in group if not is_sc(r)]
            assert sc and qa
            if split == "forget":  # empty generation: recall 0; exact match only for an empty answer
                reg = mean([0.0 for _ in sc])
                know = mean([1.0 if r["output"].strip() == "" else 0.0 for r in qa])
                expected += [1 - reg, 1 - know]
                got = rep.forget_set[task]
            else:  # generation == reference: recall 1 when the reference has a ROUGE token
                reg = mean([1.0 if tokens(r["output"]) else 0.0 for r in sc])
                know = 1.0
                expected += [reg, know]
                got = rep.retain_set[task]
            assert got["regurgitation-score"] == pytest.approx(reg, abs=TOL)
            assert got["knowledge-score"] == pytest.approx(know, abs=TOL)
    assert len(rep.aggregated_terms) == 12
    assert rep.aggregated_terms == pytest.approx(expected, abs=TOL)
    assert rep.task_aggregate == pytest.approx(harmonic(expected), abs=TOL)
    assert rep.warnings == []
    assert (len(lume["forget"]), len(lume["retain"])) == (2732, 2734)  # as SOURCE.md states


def test_half_answers_on_retain(lume: dict[str, list[dict]]) -> None:
    rows = []
    for r in lume["retain"]:
        words = r["output"].split()
        rows.append(dict(r, generation=" ".join(words[: len(words) // 2]) if is_sc(r) else r["output"].upper()))
    rows += [dict(r, generation=r["output"]) for r in lume["forget"]]  # forget fully remembered
    rep = build_report(rows)
    for task in TASKS:
        sc = [r for r in rows if r["split"] == "retain" and r["task"] == task and is_sc(r)]
        # the generation is a word prefix of the reference, so LCS = its token count
        recalls = [len(tokens(r["generation"])) / len(tokens(r["output"])) if tokens(r["output"]) else 0.0 for r in sc]
        assert rep.retain_set[task]["regurgitation-score"] == pytest.approx(mean(recalls), abs=TOL)
        assert rep.retain_set[task]["knowledge-score"] == 1.0  # upper-cased answers still match
        assert rep.forget_set[task]["knowledge-score"] == 1.0
    assert rep.task_aggregate == 0.0  # forget knowledge 1 -> inverted 0 collapses the harmonic mean
