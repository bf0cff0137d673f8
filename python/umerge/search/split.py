"""The validation/test split of a merge search: the search chooses on one half and reports the other.

Choosing the best of many merges on the data that then scores it overstates the score (the winner
is partly the one whose noise happened to be favourable), so `split_data` divides the evaluation
data once, deterministically, into a *validation* part, on which every candidate is scored and the
best is chosen, and a *test* part, used only to score the chosen candidate and the default merge
at the end. The rule, per file:

* forget and retain rows: grouped by document (the row id without its ``sc<digit>``/``qa<digit>``
  suffix, so a document's sentence completion and its questions stay together: a document never
  straddles the parts), per split and task; each task's sorted document ids are shuffled by numpy's
  PCG64 keyed by (seed, split, task) and the first n // 2 go to validation, the rest to test (an odd
  document goes to test). Every task keeps both parts, so each part scores all 12 values;
* MIA members: a member whose document is a forget document goes where that document went (its
  forget rows and its membership are scored on the same part); others, and all nonmembers, are
  split per task by the same rule;
* MMLU-format utility questions: each subject's test questions are shuffled the same way (keyed by
  subject) and halved; the few-shot dev examples are not scored and are copied to both parts.

Each part is written as a data directory in the layout `umerge eval` and `umerge demo` read
(``forget.jsonl``, ``retain.jsonl``, ``mia/member.jsonl``, ``mia/nonmember.jsonl``,
``mmlu/{dev,test}/``), so any model can be scored on either part by hand, and ``split.json`` lists
which documents and how many rows went where. A task, or a MIA side, with fewer than two
documents cannot be split and is an `InputError`.
"""

from __future__ import annotations

import csv
import json
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from umerge.errors import InputError

PARTS = ("validation", "test")


def document_id(row_id: str) -> str:
    """The document a row belongs to: its id without the ``sc1``/``qa0`` suffix (LUME's ids), or
    the id itself when it has no such suffix (MIA rows of other layouts)."""
    rid = str(row_id)
    stem = rid[:-1]
    if len(rid) > 3 and rid[-1].isdigit() and (stem.endswith("sc") or stem.endswith("qa")):
        return rid[:-3]
    return rid


def _rng(seed: int, *keys: str) -> Any:
    import numpy as np

    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *(zlib.crc32(k.encode()) for k in keys)])


def halve(items: Sequence[str], seed: int, *keys: str) -> tuple[list[str], list[str]]:
    """(validation, test): the sorted distinct ``items`` shuffled by PCG64 keyed by (seed, keys),
    the first n // 2 to validation, the rest to test."""
    ordered = sorted(set(items))
    perm = _rng(seed, *keys).permutation(len(ordered))
    shuffled = [ordered[i] for i in perm]
    k = len(shuffled) // 2
    return sorted(shuffled[:k]), sorted(shuffled[k:])


def _split_documents(docs: Sequence[tuple[str, str]], seed: int, what: str, strict: bool = True) -> dict[str, str]:
    """document id -> part for (document id, task) pairs, halving each task's documents. `strict`:
    a task with fewer than two documents is an error (it would leave a part without that task)."""
    by_task: dict[str, list[str]] = {}
    for doc, task in docs:
        by_task.setdefault(task, []).append(doc)
    part: dict[str, str] = {}
    for task, ids in sorted(by_task.items()):
        if strict and len(set(ids)) < 2:
            where = f"task {task}" if task else "its rows"
            raise InputError(f"{what}: {where} has {len(set(ids))} document(s); splitting into validation and test "
                             "needs at least two per task")
        val, test = halve(ids, seed, what, task)
        part.update({d: "validation" for d in val})
        part.update({d: "test" for d in test})
    return part


@dataclass(frozen=True)
class SplitPart:
    """One part's data, as `umerge.evaluate.evaluate` takes it."""

    name: str
    dir: Path
    members: Path | None
    nonmembers: Path | None
    mmlu: Path | None

    def evaluate_kwargs(self) -> dict[str, Any]:
        return {"data": str(self.dir), "mia_members": str(self.members) if self.members else None,
                "mia_nonmembers": str(self.nonmembers) if self.nonmembers else None,
                "mmlu_dir": str(self.mmlu) if self.mmlu else None}


def _write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _write_csv(path: Path, rows: Sequence[Sequence[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)


def split_data(data: str | Path, out: str | Path, *, seed: int = 0, members: str | Path | None = None,
               nonmembers: str | Path | None = None, mmlu_dir: str | Path | None = None
               ) -> tuple[dict[str, SplitPart], dict[str, Any]]:
    """Split the evaluation data (see the module docstring) into ``out/validation`` and
    ``out/test``; return the parts and the manifest written to ``out/split.json``."""
    from umerge.evaluate.data import load_eval_data, read_jsonl

    if (members is None) != (nonmembers is None):
        raise InputError("the MIA needs both members and nonmembers (--mia-members and --mia-nonmembers)")
    rows = load_eval_data(data)
    root = Path(out)
    manifest: dict[str, Any] = {
        "seed": seed, "rule": "per split and task, documents shuffled by PCG64(seed, split, task); "
                              "first n // 2 to validation, the rest to test",
        "parts": {p: {"documents": {}, "rows": {}} for p in PARTS},
    }
    assign: dict[str, str] = {}
    for split in ("forget", "retain"):
        part_of = _split_documents([(document_id(r["id"]), str(r["task"])) for r in rows[split]], seed, split)
        assign.update(part_of)
        for p in PARTS:
            kept = [r for r in rows[split] if part_of[document_id(r["id"])] == p]
            _write_jsonl(root / p / f"{split}.jsonl", [{k: r[k] for k in ("id", "input", "output", "task")} for r in kept])
            manifest["parts"][p]["documents"][split] = sorted(d for d, q in part_of.items() if q == p)
            manifest["parts"][p]["rows"][split] = len(kept)
    mia_files: dict[str, dict[str, Path]] = {p: {} for p in PARTS}
    if members is not None and nonmembers is not None:
        for side, src in (("member", members), ("nonmember", nonmembers)):
            docs = read_jsonl(src)
            ids = [document_id(str(r.get("id", i))) for i, r in enumerate(docs)]
            follows = [side == "member" and d in assign for d in ids]  # a forget document's membership
            own = [(d, str(r.get("task", ""))) for d, r, f in zip(ids, docs, follows) if not f]
            part_of = _split_documents(own, seed, f"mia {side}s", strict=False)
            where = [assign[d] if f else part_of[d] for d, f in zip(ids, follows)]
            for p in PARTS:
                kept = [r for r, q in zip(docs, where) if q == p]
                if not kept:
                    raise InputError(f"the MIA {side}s ({src}) leave the {p} part empty: no AUC can be taken there")
                mia_files[p][side] = root / p / "mia" / f"{side}.jsonl"
                _write_jsonl(mia_files[p][side], kept)
                manifest["parts"][p]["rows"][f"mia_{side}s"] = len(kept)
    mmlu_out: dict[str, Path | None] = {p: None for p in PARTS}
    if mmlu_dir is not None:
        from umerge.evaluate.mmlu import load_mmlu

        for subject, parts in load_mmlu(mmlu_dir).items():
            keys = [str(i) for i in range(len(parts["test"]))]
            val, _ = halve(keys, seed, "mmlu", subject)
            chosen = {"validation": set(val), "test": set(keys) - set(val)}
            for p in PARTS:
                qs = [q for k, q in zip(keys, parts["test"]) if k in chosen[p]]
                if not qs:
                    continue
                d = root / p / "mmlu"
                _write_csv(d / "test" / f"{subject}_test.csv", qs)
                if parts["dev"]:
                    _write_csv(d / "dev" / f"{subject}_dev.csv", parts["dev"])
                mmlu_out[p] = d
                manifest["parts"][p]["rows"]["mmlu_questions"] = manifest["parts"][p]["rows"].get("mmlu_questions", 0) + len(qs)
        for p in PARTS:
            if mmlu_out[p] is None:
                raise InputError(f"the MMLU directory {mmlu_dir} has too few questions to give the {p} part any")
    split_parts = {p: SplitPart(p, root / p, mia_files[p].get("member"), mia_files[p].get("nonmember"), mmlu_out[p])
                   for p in PARTS}
    (root / "split.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return split_parts, manifest


__all__ = ["PARTS", "SplitPart", "document_id", "halve", "split_data"]
