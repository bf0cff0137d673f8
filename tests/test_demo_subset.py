"""`umerge demo --data DIR --subset N` (umerge.demo.subset) and `--set KEY=VALUE` (umerge.demo.config).

The subset is checked against the source files read independently here: whole documents, the
requested counts per task, nonmembers never in a training split, a utility probe whose choices are
retain answers only, byte-identical output for the same seed.
"""

from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from pathlib import Path

import pytest

from umerge.cli import main
from umerge.demo.config import DemoConfig, apply_overrides, parse_settings
from umerge.demo.subset import write_subset
from umerge.errors import InputError

STEM = re.compile(r"^(.*)(sc|qa)\d$")


def _read(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _stems(rows: list[dict[str, str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        m = STEM.match(r["id"])
        assert m, r["id"]
        out[r["task"]].add(m.group(1))
    return out


def test_lume_subset_is_whole_documents_disjoint_and_deterministic(lume_dir: Path, tmp_path: Path) -> None:
    meta = write_subset(lume_dir, tmp_path / "a", 3, seed=7)
    write_subset(lume_dir, tmp_path / "b", 3, seed=7)
    write_subset(lume_dir, tmp_path / "c", 3, seed=8)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert [str(f) for f in files if f.parts[0] != "mmlu"] == [
        "forget.jsonl", "mia/member.jsonl", "mia/nonmember.jsonl", "retain.jsonl", "subset.json"]
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "a" / "forget.jsonl").read_bytes() != (tmp_path / "c" / "forget.jsonl").read_bytes()

    source = {s: _read(lume_dir / f"{s}.jsonl") for s in ("forget", "retain")}
    got = {s: _read(tmp_path / "a" / f"{s}.jsonl") for s in ("forget", "retain")}
    for split in ("forget", "retain"):
        stems = _stems(got[split])
        assert sorted(stems) == ["Task1", "Task2", "Task3"]
        assert all(len(v) == 3 for v in stems.values()), {t: len(v) for t, v in stems.items()}
        chosen = {s for v in stems.values() for s in v}
        whole = [r for r in source[split] if STEM.match(r["id"]).group(1) in chosen]  # type: ignore[union-attr]
        assert got[split] == whole  # every row of each drawn document, in the source's order, unchanged

    members = _read(tmp_path / "a" / "mia" / "member.jsonl")
    nonmembers = _read(tmp_path / "a" / "mia" / "nonmember.jsonl")
    assert members == [r for r in got["forget"] if r["id"].endswith("sc1")]
    assert len(members) == len(nonmembers) == 9 == meta["mia"]["members"] == meta["mia"]["nonmembers"]
    trained = {r["id"] for s in got.values() for r in s}
    forget_ids = {r["id"] for r in source["forget"]}
    for r in nonmembers:
        assert r["id"] not in trained and r["id"] in forget_ids and r["id"].endswith("sc1")
    assert {t: len(v) for t, v in _stems(nonmembers).items()} == {"Task1": 3, "Task2": 3, "Task3": 3}


def test_utility_probe_asks_drawn_retain_facts_with_retain_answers_only(lume_dir: Path, tmp_path: Path) -> None:
    write_subset(lume_dir, tmp_path, 4, seed=0)
    retain = _read(tmp_path / "retain.jsonl")
    drawn_qa = {r["input"]: r["output"].strip() for r in retain if not r["id"].endswith("sc1")}
    retain_answers = {r["output"].strip() for r in _read(lume_dir / "retain.jsonl") if not r["id"].endswith("sc1")}
    n = 0
    for f in sorted((tmp_path / "mmlu").rglob("*.csv")):
        for q in csv.reader(f.open(encoding="utf-8")):
            question, choices, letter = q[0], q[1:5], q[5]
            assert question in drawn_qa
            assert choices["ABCD".index(letter)] == drawn_qa[question]
            assert len(set(choices)) == 4 and set(choices) <= retain_answers
            n += 1
    assert n == len(drawn_qa)  # every drawn retain QA row became a question (LUME's answers are varied enough)


def _toy_source(d: Path, docs: int) -> Path:
    d.mkdir()
    for split in ("forget", "retain"):
        rows = []
        for t in ("Task1", "Task2"):
            for i in range(docs):
                rows.append({"id": f"{split}{t}{i}sc1", "input": f"{t} doc {i} starts", "output": " and ends.", "task": t})
                rows.append({"id": f"{split}{t}{i}qa0", "input": f"Q {t} {i}?", "output": f"a{split}{t}{i}", "task": t})
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return d


def test_too_few_documents_fails_before_writing(tmp_path: Path) -> None:
    src = _toy_source(tmp_path / "src", 3)
    with pytest.raises(InputError, match=r"Task1 has 3 forget documents; --subset 2 needs 4"):
        write_subset(src, tmp_path / "out", 2)
    assert not (tmp_path / "out").exists()
    write_subset(src, tmp_path / "ok", 1, nonmember_docs_per_task=2)  # 1 member + 2 nonmembers fit in 3


def test_settings_are_parsed_to_the_field_types() -> None:
    cfg = apply_overrides(DemoConfig(), parse_settings([
        "hidden_size=128", "vanilla_lr=5e-4", "analyses=false", "sweep_densities=0.2,0.8",
        "unlearn_overrides.lr=5e-3", "unlearn_overrides.kl_reduction=real_mean"]))
    assert cfg.hidden_size == 128 and cfg.vanilla_lr == 5e-4 and cfg.analyses is False
    assert cfg.sweep_densities == (0.2, 0.8)
    assert cfg.unlearn_overrides["lr"] == 5e-3 and cfg.unlearn_overrides["kl_reduction"] == "real_mean"
    assert cfg.unlearn_overrides["lora_r"] == DemoConfig().unlearn_overrides["lora_r"]  # the others kept
    assert DemoConfig().unlearn_overrides["lr"] == 1e-2  # the default is not mutated
    with pytest.raises(InputError, match="no such demo setting.*hidden_size"):
        apply_overrides(DemoConfig(), {"hiden_size": "3"})
    with pytest.raises(InputError, match="not a valid int"):
        apply_overrides(DemoConfig(), {"hidden_size": "big"})
    with pytest.raises(InputError, match="not a valid bool"):
        apply_overrides(DemoConfig(), {"analyses": "maybe"})
    with pytest.raises(InputError, match="no such demo setting"):
        apply_overrides(DemoConfig(), {"seed": "3"})  # --seed is the one place for the seed
    with pytest.raises(InputError, match="expected KEY=VALUE"):
        parse_settings(["hidden_size"])


@pytest.mark.parametrize("args, message", [
    (["--subset", "2"], "--subset draws documents from --data DIR"),
    (["--set", "hiden_size=3"], "no such demo setting"),
])
def test_demo_cli_rejects_bad_options_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   args: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "-o", str(tmp_path / "out"), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("umerge: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_the_recorded_command_repeats_subset_and_settings(tmp_path: Path) -> None:
    from umerge.demo.pipeline import DemoOptions

    opts = DemoOptions(out=tmp_path, data_dir="lume", subset=5, seed=2, settings={"hidden_size": "96"})
    assert opts.command() == f"umerge demo -o {tmp_path} --data lume --subset 5 --set hidden_size=96 --seed 2"
    cfg = opts.resolved_config()
    assert cfg.hidden_size == 96 and cfg.seed == 2
    assert cfg.vanilla_max_length == 512 and cfg.unlearn_overrides["max_length"] == 512  # real data: whole documents
