"""`umerge demo --data DIR --subset N`: a seeded, CPU-sized subset of a LUME-format data set.

The public LUME splits (2,732 forget and 2,734 retain rows, about 860 documents each) are far more
than a model trained from scratch on a CPU can memorise in an hour. This module draws, per task and
split, ``N`` whole documents (a document is every row sharing an id stem: its ``sc1`` sentence
completion and its ``qa*`` questions), and writes a data directory the demo reads like its own
synthetic world:

- ``forget.jsonl`` / ``retain.jsonl``: every row of the drawn documents, in the source's order;
- ``mia/member.jsonl``: the ``sc1`` row of each drawn forget document (input + output is the whole
  document; one row per document keeps the attack's units independent, as in the synthetic world);
- ``mia/nonmember.jsonl``: the ``sc1`` rows of further forget documents of the same tasks, drawn after
  the members and never written to either training split, so the model never sees them (the task's
  MIA compares the forget set with held-out data of the same distribution);
- ``mmlu/``: a utility probe in the MMLU CSV layout, one four-choice question per drawn retain QA row
  (its question; its answer against three other answers of the same task's retain QA rows), so the
  probe asks only about facts unlearning should keep. The first question of each task is the 1-shot
  example (``dev``), the rest are scored (``test``);
- ``subset.json``: the source, the seed, the counts and every drawn document id.

Drawing is deterministic: documents are taken in the source's order per (split, task) and shuffled
with ``random.Random(seed)``, so the same source, N and seed give byte-identical files.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path
from typing import Any

from umerge.demo.datadir import json_text, jsonl_text, mmlu_csv_text, one_per_document, write_files
from umerge.errors import InputError
from umerge.evaluate.data import read_jsonl
from umerge.unlearn.data import parse_kind

FORMAT = "umerge-demo-subset/1"
SPLITS = ("forget", "retain")


def _stem(row_id: str) -> str:
    """The document a row belongs to: its id without the kind suffix (``...sc1`` / ``...qa3``)."""
    kind = parse_kind(row_id)
    assert kind is not None  # checked by _documents
    return row_id[: -len(f"{kind[0]}{kind[1]}")]


def _documents(rows: list[dict[str, Any]], where: str) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``{task: {doc_key: rows}}`` in the source's order; only documents with a sentence-completion row."""
    by_task: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(dict)
    for i, row in enumerate(rows):
        for key in ("id", "input", "output", "task"):
            if not isinstance(row.get(key), str):
                raise InputError(f"{where}: row {i} has no string field {key!r}")
        if parse_kind(row["id"]) is None:
            raise InputError(f"{where}: row {i} (id {row['id']!r}) does not end in sc<digit> or qa<digit>")
        by_task[row["task"]].setdefault(_stem(row["id"]), []).append(row)
    return {task: {k: v for k, v in docs.items() if any(r["id"].endswith("sc1") for r in v)}
            for task, docs in by_task.items()}


def _draw(docs: dict[str, list[dict[str, Any]]], n: int, rng: random.Random) -> list[str]:
    keys = list(docs)
    rng.shuffle(keys)
    return keys[:n]


def _sc1(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return next(r for r in rows if r["id"].endswith("sc1"))


def _utility_questions(retain_qa: dict[str, list[dict[str, Any]]], pools: dict[str, list[str]],
                       rng: random.Random) -> dict[str, list[list[str]]]:
    """Four-choice questions per task from drawn retain QA rows; distractors from the task's retain answers."""
    subjects: dict[str, list[list[str]]] = {}
    for task in sorted(retain_qa):
        rows = []
        for qa in retain_qa[task]:
            correct = qa["output"].strip()
            pool = sorted({a for a in pools[task] if a != correct})
            if len(pool) < 3:
                continue  # too few distinct answers in this task to make a four-choice question
            choices = rng.sample(pool, 3)
            position = rng.randrange(4)
            choices.insert(position, correct)
            rows.append([qa["input"], *choices, "ABCD"[position]])
        if len(rows) >= 2:  # one 1-shot example and at least one scored question
            subjects[f"lume_{task.lower()}"] = rows
    return subjects


def write_subset(source: str | Path, out_dir: str | Path, docs_per_task: int, seed: int = 0,
                 nonmember_docs_per_task: int | None = None) -> dict[str, Any]:
    """Write the subset of ``source`` (forget.jsonl + retain.jsonl) under ``out_dir``; return subset.json's content.

    ``nonmember_docs_per_task`` defaults to ``docs_per_task``. Fails, before writing anything, when a
    task has fewer forget documents than members + nonmembers need, or fewer retain documents than N.
    """
    src, out = Path(source), Path(out_dir)
    n_non = docs_per_task if nonmember_docs_per_task is None else nonmember_docs_per_task
    if docs_per_task < 1 or n_non < 1:
        raise InputError(f"--subset needs at least one document per task (got {docs_per_task}, nonmembers {n_non})")
    raw = {split: read_jsonl(src / f"{split}.jsonl") for split in SPLITS}
    docs = {split: _documents(raw[split], str(src / f"{split}.jsonl")) for split in SPLITS}
    tasks = sorted(set(docs["forget"]) & set(docs["retain"]))
    if not tasks:
        raise InputError(f"{src}: forget.jsonl and retain.jsonl share no task")
    rng = random.Random(seed)
    drawn: dict[str, dict[str, list[str]]] = {"forget": {}, "retain": {}, "nonmember": {}}
    for task in tasks:
        need = {"forget": docs_per_task + n_non, "retain": docs_per_task}
        for split in SPLITS:
            have = len(docs[split][task])
            if have < need[split]:
                raise InputError(f"{src}: {task} has {have} {split} documents; --subset {docs_per_task} needs {need[split]}")
        forget_keys = _draw(docs["forget"][task], docs_per_task + n_non, rng)
        drawn["forget"][task], drawn["nonmember"][task] = forget_keys[:docs_per_task], forget_keys[docs_per_task:]
        drawn["retain"][task] = _draw(docs["retain"][task], docs_per_task, rng)

    def rows_of(split: str, source_split: str) -> list[dict[str, Any]]:  # in the source file's order
        chosen = {(t, k) for t, keys in drawn[split].items() for k in keys}
        return [r for r in raw[source_split] if (r["task"], _stem(r["id"])) in chosen]

    forget, retain, nonmember = rows_of("forget", "forget"), rows_of("retain", "retain"), rows_of("nonmember", "forget")
    retain_qa: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in retain:
        if not r["id"].endswith("sc1"):
            retain_qa[r["task"]].append(r)
    pools = {t: [r["output"].strip() for rs in docs["retain"][t].values() for r in rs if not r["id"].endswith("sc1")]
             for t in tasks}
    mmlu = _utility_questions(retain_qa, pools, rng)

    files = {
        "forget.jsonl": jsonl_text(forget),
        "retain.jsonl": jsonl_text(retain),
        "mia/member.jsonl": jsonl_text(one_per_document(forget)),
        "mia/nonmember.jsonl": jsonl_text(one_per_document(nonmember)),
    }
    for subject, questions in mmlu.items():
        files[f"mmlu/dev/{subject}_dev.csv"] = mmlu_csv_text(questions[:1])
        files[f"mmlu/test/{subject}_test.csv"] = mmlu_csv_text(questions[1:])
    meta = {
        "format": FORMAT, "source": str(src), "seed": seed, "docs_per_task": docs_per_task,
        "nonmember_docs_per_task": n_non, "tasks": tasks,
        "rows": {"forget": len(forget), "retain": len(retain)},
        "mia": {"members": sum(map(len, drawn["forget"].values())), "nonmembers": sum(map(len, drawn["nonmember"].values()))},
        "utility_questions": {s: len(q) - 1 for s, q in mmlu.items()},
        "documents": drawn,
    }
    files["subset.json"] = json_text(meta)
    write_files(out, files)
    return meta
