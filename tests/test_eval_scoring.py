"""Score-only parity: umerge.evaluate against an independent implementation of the published formulas.

The reference below is written from the task's description (ROUGE-L recall with Porter stemming,
exact match after strip+lower, per-task means, forget inverted, harmonic mean, AUC, 1 - 2|AUC-0.5|,
mean of three) in plain Python/float64: its own tokenizer, its own LCS, the Mann-Whitney count for
the AUC. Only the Porter stemmer is shared (nltk's, the one rouge-score uses). No torch needed.

Behaviour fixed by umerge where the official scorer is silent (and checked here):
* a task missing from one split leaves that split's two values out of the Task Aggregate
  (fewer than 12 terms) and adds a warning;
* a task without rows of one kind leaves that value out, with a warning;
* an empty generation scores 0.
"""

from __future__ import annotations

import json
import random
import re
import zlib
from pathlib import Path

import pytest

from umerge.errors import InputError
from umerge.evaluate import EvalReport, build_report, compare, metrics, score_only

pytest.importorskip("rouge_score")
pytest.importorskip("sklearn")
from nltk.stem import porter  # noqa: E402  (rouge-score's own dependency)

TOL = 1e-9
_STEM = porter.PorterStemmer()


# ---------------------------------------------------------------- the independent reference
def ref_tokens(text: str) -> list[str]:
    """Lowercase, non-alphanumerics to spaces, split, stem words longer than 3 characters."""
    words = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    return [_STEM.stem(w) if len(w) > 3 else w for w in words]


def ref_lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = table[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(table[i - 1][j], table[i][j - 1])
    return table[-1][-1]


def ref_rouge_l_recall(reference: str, generation: str) -> float:
    r, g = ref_tokens(reference), ref_tokens(generation)
    return ref_lcs(r, g) / len(r) if r and g else 0.0


def ref_knowledge(reference: str, generation: str) -> float:
    return 1.0 if reference.strip().lower() == generation.strip().lower() else 0.0


def ref_task_values(rows: list[dict]) -> dict[tuple[str, str, str], float]:
    """{(split, task, 'reg'|'know'): mean} over the rows present."""
    groups: dict[tuple[str, str, str], list[float]] = {}
    for r in rows:
        if r["id"][-3:-1] == "sc":
            groups.setdefault((r["split"], r["task"], "reg"), []).append(ref_rouge_l_recall(r["output"], r["generation"]))
        else:
            groups.setdefault((r["split"], r["task"], "know"), []).append(ref_knowledge(r["output"], r["generation"]))
    return {k: sum(v) / len(v) for k, v in groups.items()}


def ref_terms(rows: list[dict]) -> list[float]:
    vals = ref_task_values(rows)
    out = []
    for split in ("forget", "retain"):
        for task in sorted({k[1] for k in vals}):
            for kind in ("reg", "know"):
                if (split, task, kind) in vals:
                    v = vals[(split, task, kind)]
                    out.append(1.0 - v if split == "forget" else v)
    return out


def ref_harmonic(values: list[float]) -> float:
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def ref_auc(member_scores: list[float], nonmember_scores: list[float]) -> float:
    """P(score_member > score_nonmember) + 0.5 P(tie): the Mann-Whitney form of the ROC AUC."""
    wins = 0.0
    for m in member_scores:
        for n in nonmember_scores:
            wins += 1.0 if m > n else 0.5 if m == n else 0.0
    return wins / (len(member_scores) * len(nonmember_scores))


# ---------------------------------------------------------------- fixtures
def row(split: str, task: str, rid: str, output: str, generation: str) -> dict:
    return {"id": rid, "task": task, "split": split, "input": f"prompt {rid}", "output": output, "generation": generation}


SC_CASES = [  # (reference, generation)
    ("The cats were running across the old bridge.", "The cats were running across the old bridge."),
    ("The cats were running across the old bridge.", "the cat runs across a bridge"),
    ("The cats were running across the old bridge.", "The cats were running across the old bridge. And then more words follow."),
    ("Madera was home to four friends who met by chance.", ""),
    ("Madera was home to four friends who met by chance.", "  MADERA   was HOME to four friends\n who met by CHANCE!!"),
    ("Her phone number is 555-0199 and her SSN is 900-12-3456.", "her number is 555 0199"),
    ("Nothing in common here.", "completely different tokens only"),
]
QA_CASES = [
    ("Madera", "Madera"),
    ("Madera", "  madera \n"),
    ("Madera", "Madera, a city"),  # extra words after the answer: not an exact match
    ("1984-05-12", "1984-05-12"),
    ("Sherry", ""),
    ("Sherry", "SHERRY"),
]


def synthetic_rows(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    n = 0
    for split in ("forget", "retain"):
        for task in ("Task1", "Task2", "Task3"):
            for _ in range(5):
                ref, gen = rng.choice(SC_CASES)
                rows.append(row(split, task, f'"{n}"sc1', ref, gen))
                n += 1
            for q in range(5):
                ref, gen = rng.choice(QA_CASES)
                rows.append(row(split, task, f'"{n}"qa{q}', ref, gen))
                n += 1
    return rows


# ---------------------------------------------------------------- row scores
@pytest.mark.parametrize(("reference", "generation"), SC_CASES)
def test_regurgitation_matches_reference(reference: str, generation: str) -> None:
    assert metrics.regurgitation_score(reference, generation) == pytest.approx(
        ref_rouge_l_recall(reference, generation), abs=TOL
    )


def test_regurgitation_edge_values() -> None:
    ref = "The cats were running across the old bridge."
    assert metrics.regurgitation_score(ref, "") == 0.0  # empty generation
    assert metrics.regurgitation_score(ref, ref + " and many more words after it") == 1.0  # recall ignores extras
    assert metrics.regurgitation_score(ref, "THE  CATS were RUNNING across the OLD bridge") == 1.0  # case, space
    assert metrics.regurgitation_score(ref, "the cat were run across the old bridg") == 1.0  # stems: cats->cat
    assert metrics.regurgitation_score(ref, "the cat run across the old bridg") == 7 / 8  # "were" missing
    assert metrics.regurgitation_score(ref, "bridge old the across running were cats the") == pytest.approx(
        3 / 8  # LCS "the across the"
    )


@pytest.mark.parametrize(("reference", "generation"), QA_CASES)
def test_knowledge_matches_reference(reference: str, generation: str) -> None:
    assert metrics.knowledge_score(reference, generation) == ref_knowledge(reference, generation)


def test_knowledge_case_whitespace_and_extra_words() -> None:
    assert metrics.knowledge_score("Madera", "  madera \n") == 1.0
    assert metrics.knowledge_score("Madera", "Madera, a city") == 0.0
    assert metrics.knowledge_score("Madera", "") == 0.0


# ---------------------------------------------------------------- aggregates
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_report_matches_reference(seed: int) -> None:
    rows = synthetic_rows(seed)
    rep = build_report(rows)
    vals = ref_task_values(rows)
    for split, d in (("forget", rep.forget_set), ("retain", rep.retain_set)):
        for task in ("Task1", "Task2", "Task3"):
            assert d[task]["regurgitation-score"] == pytest.approx(vals[(split, task, "reg")], abs=TOL)
            assert d[task]["knowledge-score"] == pytest.approx(vals[(split, task, "know")], abs=TOL)
        sc = [ref_rouge_l_recall(r["output"], r["generation"]) for r in rows if r["split"] == split and "sc" in r["id"][-3:]]
        qa = [ref_knowledge(r["output"], r["generation"]) for r in rows if r["split"] == split and "qa" in r["id"][-3:]]
        assert d["overall-regurgitation-score"] == pytest.approx(sum(sc) / len(sc), abs=TOL)
        assert d["overall-knowledge-score"] == pytest.approx(sum(qa) / len(qa), abs=TOL)
    terms = ref_terms(rows)
    assert len(rep.aggregated_terms) == 12
    assert rep.aggregated_terms == pytest.approx(terms, abs=TOL)
    assert rep.task_aggregate == pytest.approx(ref_harmonic(terms), abs=TOL)
    assert rep.warnings == []


def test_zero_value_collapses_the_harmonic_mean() -> None:
    rows = synthetic_rows(0)
    # every retain Task2 QA answer wrong -> that mean is 0 -> Task Aggregate 0
    for r in rows:
        if r["split"] == "retain" and r["task"] == "Task2" and "qa" in r["id"][-3:]:
            r["generation"] = "wrong"
    rep = build_report(rows)
    assert 0.0 in rep.aggregated_terms
    assert rep.task_aggregate == 0.0
    # forget regurgitation perfect on Task1 -> 1 - 1 = 0 collapses it too
    rows = synthetic_rows(1)
    for r in rows:
        if r["split"] == "forget" and r["task"] == "Task1" and "sc" in r["id"][-3:]:
            r["generation"] = r["output"]
    assert build_report(rows).task_aggregate == 0.0


def test_harmonic_mean_matches_statistics_semantics() -> None:
    rng = random.Random(7)
    for _ in range(200):
        vals = [rng.random() for _ in range(rng.randint(1, 12))]
        assert metrics.harmonic_mean(vals) == pytest.approx(ref_harmonic(vals), rel=1e-12, abs=TOL)
    assert metrics.harmonic_mean([0.5, 0.0, 1.0]) == 0.0
    with pytest.raises(InputError):
        metrics.harmonic_mean([])


def test_all_empty_generations() -> None:
    rows = synthetic_rows(2)
    for r in rows:
        r["generation"] = ""
    rep = build_report(rows)
    for task in ("Task1", "Task2", "Task3"):
        assert rep.forget_set[task] == {"regurgitation-score": 0.0, "knowledge-score": 0.0}
        assert rep.retain_set[task] == {"regurgitation-score": 0.0, "knowledge-score": 0.0}
    assert rep.aggregated_terms == [1.0] * 6 + [0.0] * 6
    assert rep.task_aggregate == 0.0


def test_task_missing_from_one_split() -> None:
    rows = [r for r in synthetic_rows(3) if not (r["split"] == "forget" and r["task"] == "Task3")]
    rep = build_report(rows)
    assert "Task3" not in rep.forget_set and "Task3" in rep.retain_set
    terms = ref_terms(rows)
    assert len(terms) == 10 and len(rep.aggregated_terms) == 10
    assert rep.aggregated_terms == pytest.approx(terms, abs=TOL)
    assert rep.task_aggregate == pytest.approx(ref_harmonic(terms), abs=TOL)
    assert any("Task3 has no rows in the forget split" in w for w in rep.warnings)
    assert "forget/Task3/regurgitation (1 - v)" not in rep.aggregated_term_labels


def test_task_without_qa_rows() -> None:
    rows = [r for r in synthetic_rows(0) if not (r["split"] == "retain" and r["task"] == "Task1" and "qa" in r["id"][-3:])]
    rep = build_report(rows)
    assert rep.retain_set["Task1"]["knowledge-score"] is None
    assert len(rep.aggregated_terms) == 11
    assert rep.task_aggregate == pytest.approx(ref_harmonic(ref_terms(rows)), abs=TOL)
    assert any("no QA rows in the retain split" in w for w in rep.warnings)


def test_no_rows_at_all_is_an_input_error() -> None:
    with pytest.raises(InputError, match="no scores"):
        build_report([])


def test_bad_ids_and_splits_are_input_errors() -> None:
    with pytest.raises(InputError, match="cannot tell its kind"):
        build_report([row("forget", "Task1", "abc", "x", "x")])
    bad = row("forget", "Task1", '"1"sc1', "x", "x")
    bad["split"] = "train"
    with pytest.raises(InputError, match="split must be forget or retain"):
        build_report([bad])


# ---------------------------------------------------------------- MIA and final aggregate
def loss_rows(seed: int, n_mem: int = 23, n_non: int = 19, with_tokens: bool = True) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for split, n, shift in (("member", n_mem, -0.3), ("nonmember", n_non, 0.0)):
        for i in range(n):
            lps = [rng.gauss(-2.0 - shift, 1.0) for _ in range(rng.randint(3, 30))]
            lps = [min(lp, -1e-3) for lp in lps]
            r = {"id": f"{split}{i}", "split": split, "loss": round(-sum(lps) / len(lps), 2)}  # rounding: ties
            if with_tokens:
                r["token_logprobs"] = lps
                r["token_zscores"] = [rng.gauss(0, 1) for _ in lps]
                r["zlib_bytes"] = rng.randint(20, 200)
            rows.append(r)
    return rows


def ref_min_k(values: list[float], k: float) -> float:
    m = max(1, int(k * len(values)))
    return sum(sorted(values)[:m]) / m


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mia_attacks_match_reference(seed: int) -> None:
    rows = loss_rows(seed)
    mem = [r for r in rows if r["split"] == "member"]
    non = [r for r in rows if r["split"] == "nonmember"]
    out = metrics.mia_attacks(rows, k=0.2)
    auc = ref_auc([-r["loss"] for r in mem], [-r["loss"] for r in non])
    assert out["loss"]["auc"] == pytest.approx(auc, abs=TOL)
    assert out["loss"]["score"] == pytest.approx(1 - 2 * abs(auc - 0.5), abs=TOL)
    mk = ref_auc([ref_min_k(r["token_logprobs"], 0.2) for r in mem], [ref_min_k(r["token_logprobs"], 0.2) for r in non])
    assert out["min_k"]["auc"] == pytest.approx(mk, abs=TOL)
    mkpp = ref_auc([ref_min_k(r["token_zscores"], 0.2) for r in mem], [ref_min_k(r["token_zscores"], 0.2) for r in non])
    assert out["min_k_pp"]["auc"] == pytest.approx(mkpp, abs=TOL)
    zl = ref_auc([-r["loss"] / r["zlib_bytes"] for r in mem], [-r["loss"] / r["zlib_bytes"] for r in non])
    assert out["zlib"]["auc"] == pytest.approx(zl, abs=TOL)
    assert (out["n_member"], out["n_nonmember"]) == (len(mem), len(non))


def test_mia_extremes_and_missing_token_data() -> None:
    rows = [{"id": "a", "split": "member", "loss": 1.0}, {"id": "b", "split": "nonmember", "loss": 2.0}]
    out = metrics.mia_attacks(rows)
    assert out["loss"] == {"auc": 1.0, "score": 0.0}  # members clearly lower loss: perfect attack
    assert set(out) == {"loss", "n_member", "n_nonmember"}  # no per-token data: no extra attacks
    rows[0]["loss"] = 3.0
    assert metrics.mia_attacks(rows)["loss"] == {"auc": 0.0, "score": 0.0}  # inverted: also leaks
    rows[0]["loss"] = 2.0
    assert metrics.mia_attacks(rows)["loss"] == {"auc": 0.5, "score": 1.0}
    with pytest.raises(InputError, match="members and nonmembers"):
        metrics.mia_attacks(rows[:1])


def test_min_k_keeps_at_least_one_token() -> None:
    assert metrics.min_k_score([-1.0, -5.0, -2.0], 0.2) == -5.0
    assert metrics.min_k_score([-1.0, -5.0, -2.0, -3.0, -4.0, -6.0, -7.0, -8.0, -9.0, -10.0], 0.2) == -9.5
    assert metrics.zlib_bytes("hello hello hello") == len(zlib.compress(b"hello hello hello"))


def test_final_aggregate_and_mmlu_warning() -> None:
    rows = synthetic_rows(1)
    losses = loss_rows(1, with_tokens=False)
    rep = build_report(rows, losses, mmlu=0.36)
    mem = [-r["loss"] for r in losses if r["split"] == "member"]
    non = [-r["loss"] for r in losses if r["split"] == "nonmember"]
    mia_final = 1 - 2 * abs(ref_auc(mem, non) - 0.5)
    expected = (ref_harmonic(ref_terms(rows)) + mia_final + 0.36) / 3
    d = rep.to_dict()
    assert d["aggregate-score"] == pytest.approx(expected, abs=TOL)
    assert d["mia_final_score"] == pytest.approx(mia_final, abs=TOL)
    assert d["mmlu_average"] == 0.36
    assert any("below 0.371" in w for w in rep.warnings)
    assert not any("below 0.371" in w for w in build_report(rows, losses, mmlu=0.371).warnings)
    # without MMLU (or MIA) the official aggregate is -1
    assert build_report(rows, losses).to_dict()["aggregate-score"] == -1
    assert build_report(rows, mmlu={"average_acc": 0.5}).to_dict()["aggregate-score"] == -1


# ---------------------------------------------------------------- files, round trip, CLI
def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_score_only_files_and_round_trip(tmp_path: Path) -> None:
    rows = synthetic_rows(0)
    losses = loss_rows(0)
    g = write_jsonl(tmp_path / "generations.jsonl", rows)
    lo = write_jsonl(tmp_path / "mia_losses.jsonl", losses)
    (tmp_path / "mmlu.json").write_text(json.dumps({"average_acc": 0.5}))
    rep = score_only(g, lo, tmp_path / "out", mmlu=tmp_path / "mmlu.json")
    d = json.loads((tmp_path / "out" / "report.json").read_text())
    for key in ("forget-set", "retain-set", "mia_loss_acc", "mmlu_average", "harmonic-mean-task-aggregate",
                "mia_final_score", "aggregate-score"):
        assert key in d
    assert set(d["forget-set"]) == {"overall-regurgitation-score", "overall-knowledge-score", "Task1", "Task2", "Task3"}
    assert d["harmonic-mean-task-aggregate"] == pytest.approx(ref_harmonic(ref_terms(rows)), abs=TOL)
    assert (tmp_path / "out" / "report.md").read_text().startswith("# Evaluation")
    again = EvalReport.load(tmp_path / "out" / "report.json")
    assert again.to_dict() == rep.to_dict()
    table = compare([tmp_path / "out" / "report.json", rep], names=["a", "b"])
    lines = table.strip().splitlines()
    assert lines[0] == "| Model | Task Aggregate | MIA score / AUC | MMLU | Aggregate |"
    assert lines[2] == lines[3].replace("| b |", "| a |")
    assert f"{rep.aggregate_score:.4f}" in lines[2]


def test_cli_score_only_and_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from umerge.cli import main

    g = write_jsonl(tmp_path / "g.jsonl", synthetic_rows(1))
    lo = write_jsonl(tmp_path / "l.jsonl", loss_rows(1))
    main(["eval", "--score-only", str(g), "--mia-losses", str(lo), "--mmlu", "0.6", "-o", str(tmp_path / "r.json")])
    d = json.loads((tmp_path / "r.json").read_text())
    assert d["mmlu_average"] == 0.6 and (tmp_path / "r.md").is_file()
    capsys.readouterr()
    main(["eval", "--compare", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert "| r |" in out and "Task Aggregate" in out


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from umerge.cli import main

    bad = tmp_path / "g.jsonl"
    bad.write_text('{"id": "x", "task": "Task1"}\n')
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--score-only", str(bad), "-o", str(tmp_path / "r.json")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("umerge: error:") and "lacks field" in err and "\n" not in err
    with pytest.raises(SystemExit) as exc:
        main(["eval", "-o", str(tmp_path / "r.json")])
    assert exc.value.code == 2
    assert "exactly one of" in capsys.readouterr().err


def test_nan_loss_is_rejected(tmp_path: Path) -> None:
    g = write_jsonl(tmp_path / "g.jsonl", synthetic_rows(0))
    lo = tmp_path / "l.jsonl"
    lo.write_text('{"id": "a", "split": "member", "loss": NaN}\n{"id": "b", "split": "nonmember", "loss": 1.0}\n')
    with pytest.raises(InputError, match="finite"):
        score_only(g, lo)


def test_model_evaluation_without_torch_says_what_to_install(tmp_path: Path) -> None:
    """With torch unimportable, `umerge eval --model` fails in one line naming the extra."""
    import subprocess
    import sys

    data = tmp_path / "data"
    data.mkdir()
    for split in ("forget", "retain"):
        write_jsonl(data / f"{split}.jsonl", [{"id": '"a"qa0', "task": "Task1", "input": "q", "output": "a"}])
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from umerge.cli import main\n"
        f"main(['eval', '--model', {str(tmp_path)!r}, '--data', {str(data)!r}, '-o', {str(tmp_path / 'r.json')!r}])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "python")})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("umerge: error:")
    assert 'pip install "umerge[train]"' in proc.stderr
