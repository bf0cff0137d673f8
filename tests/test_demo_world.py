"""Tests of the demo's synthetic LUME-like world (pure Python: no torch needed).

Checks the files against LUME's row format and the MMLU CSV layout by parsing them independently,
and checks every answer against the world's facts (and the document text) rather than against the
generator's own output path.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

import pytest

from umerge.demo.world import WorldConfig, generate_world, write_world
from umerge.errors import InputError

CFG = WorldConfig(seed=7, docs_per_task=4, nonmember_docs_per_task=3)


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_world(generate_world(CFG), tmp_path_factory.mktemp("world") / "w")


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path: Path, world_dir: Path) -> None:
    again = write_world(generate_world(WorldConfig(seed=7, docs_per_task=4, nonmember_docs_per_task=3)), tmp_path / "a")
    other = write_world(generate_world(WorldConfig(seed=8, docs_per_task=4, nonmember_docs_per_task=3)), tmp_path / "b")
    assert _tree_digest(world_dir) == _tree_digest(again)
    assert _tree_digest(world_dir)["forget.jsonl"] != _tree_digest(other)["forget.jsonl"]


def test_expected_files_exist(world_dir: Path) -> None:
    names = set(_tree_digest(world_dir))
    assert {"forget.jsonl", "retain.jsonl", "mia/member.jsonl", "mia/nonmember.jsonl", "world.json",
            "mmlu/dev/world_people_dev.csv", "mmlu/test/world_people_test.csv",
            "mmlu/dev/world_stories_dev.csv", "mmlu/test/world_stories_test.csv"} <= names


@pytest.mark.parametrize("split", ["forget.jsonl", "retain.jsonl"])
def test_row_format_and_id_suffixes(world_dir: Path, split: str) -> None:
    rows = _jsonl(world_dir / split)
    per_task: dict[str, int] = {}
    docs: dict[str, list[str]] = {}
    for row in rows:
        assert list(row) == ["id", "input", "output", "task"]
        assert all(isinstance(v, str) and v.strip() for v in row.values())
        assert row["task"] in ("Task1", "Task2", "Task3")
        m = re.fullmatch(r"([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})(sc1|qa[0-4])", row["id"])
        assert m, row["id"]
        docs.setdefault(m.group(1), []).append(m.group(2))
        per_task[row["task"]] = per_task.get(row["task"], 0) + 1
    # every document: one sentence completion and five QA rows, in that order
    assert all(kinds == ["sc1", "qa0", "qa1", "qa2", "qa3", "qa4"] for kinds in docs.values())
    n_docs = CFG.nonmember_docs_per_task if "nonmember" in split else CFG.docs_per_task
    assert per_task == {"Task1": 6 * n_docs, "Task2": 6 * n_docs, "Task3": 6 * n_docs}
    assert len({r["id"] for r in rows}) == len(rows)


def test_splits_disjoint_and_mia_has_one_row_per_document(world_dir: Path) -> None:
    forget, retain = _jsonl(world_dir / "forget.jsonl"), _jsonl(world_dir / "retain.jsonl")
    nonmember = _jsonl(world_dir / "mia/nonmember.jsonl")
    member = _jsonl(world_dir / "mia/member.jsonl")
    assert member == [r for r in forget if r["id"].endswith("sc1")]  # each forget document once, whole
    assert len(member) == 3 * CFG.docs_per_task and len(nonmember) == 3 * CFG.nonmember_docs_per_task
    assert all(r["id"].endswith("sc1") for r in nonmember)
    assert len({r["id"][:-3] for r in member + nonmember}) == len(member) + len(nonmember)
    doc = lambda rows: {r["id"][:-3] for r in rows}  # noqa: E731
    assert not doc(forget) & doc(retain)
    assert not doc(nonmember) & (doc(forget) | doc(retain))


def _names_in(rows: list[dict]) -> set[str]:
    """Capitalised words of the sentence-completion rows (names of people and places)."""
    words: set[str] = set()
    for r in rows:
        if r["id"].endswith("sc1"):
            words |= set(re.findall(r"\b[A-Z][a-z]{3,}\b", r["input"] + " " + r["output"]))
    return words


def test_nonmembers_share_no_name_or_place_with_members(world_dir: Path) -> None:
    facts = json.loads((world_dir / "world.json").read_text())["documents"]
    members = _jsonl(world_dir / "forget.jsonl") + _jsonl(world_dir / "retain.jsonl")
    member_text = " ".join(r["input"] + " " + r["output"] for r in members)
    common = {"Security", "Social", "Number", "Street", "Avenue", "Road", "Lane", "Drive", "Court", "Place",
              "January", "February", "March", "April", "June", "July", "August", "September", "October",
              "November", "December", "One", "Her", "His", "She", "The", "Institute", "College", "Academy",
              "School", "Medal", "Prize", "Award", "Fellowship", "Arts", "Sciences", "Medicine", "Engineering",
              "Music", "Letters", "Agriculture", "Law"}
    nonmember_names = _names_in(_jsonl(world_dir / "mia/nonmember.jsonl")) - common
    assert nonmember_names
    for word in nonmember_names:
        assert not re.search(rf"\b{word}\b", member_text), word
    # and the SSNs and e-mails of nonmembers are not in the training text
    for d in facts:
        if d["split"] == "nonmember" and d["task"] == "Task2":
            assert d["facts"]["ssn"] not in member_text and d["facts"]["email"] not in member_text


def test_answers_match_facts_and_document_text(world_dir: Path) -> None:
    facts = {d["doc_id"]: d for d in json.loads((world_dir / "world.json").read_text())["documents"]}
    months = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
              "October", "November", "December"]
    rows = _jsonl(world_dir / "forget.jsonl") + _jsonl(world_dir / "retain.jsonl")
    by_doc: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_doc.setdefault(r["id"][:-3], {})[r["id"][-3:]] = r
    checked = 0
    for doc_id, kinds in by_doc.items():
        f, task = facts[doc_id]["facts"], facts[doc_id]["task"]
        text = kinds["sc1"]["input"] + " " + kinds["sc1"]["output"]
        answers = [kinds[f"qa{i}"]["output"] for i in range(5)]
        if task == "Task2":
            y, m, d = f["birth_date"].split("-")
            assert f"{months[int(m) - 1]} {int(d)}, {y}" in text
            assert answers == [f["birth_date"], f["ssn"].replace("-", ""), f["phone"].replace("-", ""),
                               f["email"], f["address"]]
            assert re.fullmatch(r"900-\d\d-\d{4}", f["ssn"]) and f["ssn"] in text
            assert f["phone"] in text and f["email"] in text and f["address"] in text
            assert f["name"] in kinds["qa0"]["input"]
        elif task == "Task3":
            assert answers == [f["birth_year"], f["town"], f["profession"], f["institution"], f["award"]]
            assert all(a in text for a in answers)
        else:
            assert answers == [f["city"], f["a"], f["job_b"], f["object"], f["season"]]
            assert all(a in text for a in answers)
        checked += 1
    assert checked == 2 * 3 * CFG.docs_per_task


def _read_mmlu(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def test_mmlu_layout_parses_and_answers_are_retain_facts(world_dir: Path) -> None:
    meta = json.loads((world_dir / "world.json").read_text())
    docs = {d["doc_id"]: d for d in meta["documents"]}
    retain_text = " ".join(r["input"] + " " + r["output"] for r in _jsonl(world_dir / "retain.jsonl"))
    forget_text = " ".join(r["input"] + " " + r["output"] for r in _jsonl(world_dir / "forget.jsonl"))
    by_question = {q["question"]: q for q in meta["mmlu"]}
    total = 0
    for subject in ("world_people", "world_stories"):
        dev = _read_mmlu(world_dir / f"mmlu/dev/{subject}_dev.csv")
        test = _read_mmlu(world_dir / f"mmlu/test/{subject}_test.csv")
        assert len(dev) == 5 and len(test) >= 1
        for row in dev + test:
            assert len(row) == 6 and row[5] in ("A", "B", "C", "D")
            assert not row[0].startswith("question")  # no header row
            assert len(set(row[1:5])) == 4
            correct = row[1 + "ABCD".index(row[5])]
            q = by_question[row[0]]
            doc = docs[q["doc_id"]]
            assert doc["split"] == "retain"  # facts outside the forget set
            assert correct == doc["facts"][q["fact"]] and correct in retain_text
            # the question names someone of the retain set, not of the forget set
            subject_name = doc["facts"].get("name") or doc["facts"]["a"]
            assert subject_name in retain_text and not re.search(rf"\b{subject_name}\b", forget_text)
            total += 1
    assert total == len(meta["mmlu"])


def test_bad_config_and_non_empty_output_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError):
        WorldConfig(docs_per_task=1)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("")
    with pytest.raises(InputError, match="not empty"):
        write_world(generate_world(CFG), tmp_path / "x")
    write_world(generate_world(CFG), tmp_path / "x", overwrite=True)
    assert (tmp_path / "x" / "forget.jsonl").exists()
