"""Reading and writing the evaluation's row files (JSON-lines), with one-line errors.

Files read here:

* the evaluation data, through the trainer's loader (`umerge.unlearn.data`: a directory holding
  ``forget.*`` and ``retain.*`` in the LUME layout ``id``, ``input``, ``output``, ``task``), or an
  in-memory ``{"forget": rows, "retain": rows}``;
* MIA documents: JSON-lines whose rows carry ``document`` (the official MIA files), ``text``, or
  ``input`` and ``output`` (joined with one space unless either side already has whitespace at the
  joint); ``id`` is optional (the row number is used);
* GENERATIONS rows ``{"id", "task", "split", "input", "output", "generation"}`` and LOSSES rows
  ``{"id", "split", "loss", ...}`` written by `umerge eval` for re-scoring.

Reading the task data itself is the trainer's loader's job; this module only adapts its rows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from umerge.errors import InputError
from umerge.evaluate.metrics import MIA_SPLITS, SPLITS, row_kind

GENERATION_FIELDS = ("id", "task", "split", "input", "output", "generation")
DATA_FIELDS = ("id", "input", "output", "task")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file (blank lines skipped); InputError names the file and line."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    rows: list[dict[str, Any]] = []
    with p.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{p}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise InputError(f"{p}:{n}: expected a JSON object per line, got {type(row).__name__}")
            rows.append(row)
    return rows


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write rows as JSON-lines (UTF-8, one object per line)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(p)


def _check_fields(rows: list[dict[str, Any]], fields: Iterable[str], where: str) -> None:
    for i, row in enumerate(rows):
        missing = [f for f in fields if f not in row or row[f] is None]
        if missing:
            raise InputError(f"{where}: row {i} (id {row.get('id')!r}) lacks field(s) {', '.join(missing)}")


def _as_dict(row: Any) -> dict[str, Any]:
    return row.to_dict() if hasattr(row, "to_dict") else dict(row)


def load_eval_data(data: Any) -> dict[str, list[dict[str, Any]]]:
    """``{"forget": rows, "retain": rows}`` (plain dicts), checked.

    ``data`` is anything the trainer's loader takes (`umerge.unlearn.data.load_task_data`: a
    directory with ``forget.*`` and ``retain.*`` in JSON-lines, parquet or column JSON, one file
    with a ``split`` column, a ``TaskData``), or an in-memory ``{"forget": rows, "retain": rows}``
    of dicts or ``Row`` objects. Every row needs ``id`` (ending in sc<digit> or qa<digit>),
    ``input``, ``output`` and ``task``.
    """
    if isinstance(data, Mapping):
        out = {s: [_as_dict(r) for r in data.get(s, [])] for s in SPLITS}
        where = {s: f"data[{s!r}]" for s in SPLITS}
    else:
        from umerge.unlearn.data import load_task_data

        td = load_task_data(data)
        out = {"forget": [r.to_dict() for r in td.forget], "retain": [r.to_dict() for r in td.retain]}
        where = {s: ", ".join(td.sources.get(s, [])) or s for s in SPLITS}
    if not out["forget"] and not out["retain"]:
        raise InputError("the evaluation data has no rows in either split")
    for s in SPLITS:
        _check_fields(out[s], DATA_FIELDS, where[s])
        for row in out[s]:
            row_kind(row["id"])
    return out


def head_per_task(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The first ``n`` rows of each (task, kind) group, in file order."""
    if n < 1:
        raise InputError(f"max_rows must be >= 1, got {n}")
    seen: dict[tuple[str, str], int] = {}
    out = []
    for r in rows:
        key = (str(r["task"]), row_kind(r["id"]))
        if seen.get(key, 0) < n:
            seen[key] = seen.get(key, 0) + 1
            out.append(r)
    return out


def join_prompt_answer(prompt: str, answer: str) -> str:
    """``prompt + " " + answer``, without the space when either side already has whitespace there."""
    if not prompt or not answer or prompt[-1].isspace() or answer[0].isspace():
        return prompt + answer
    return prompt + " " + answer


def document_text(row: Mapping[str, Any], where: str) -> str:
    """The text of a MIA document row: ``document``, ``text``, or ``input`` joined to ``output``."""
    for key in ("document", "text"):
        if isinstance(row.get(key), str):
            return row[key]
    if isinstance(row.get("input"), str) and isinstance(row.get("output"), str):
        return join_prompt_answer(row["input"], row["output"])
    raise InputError(f"{where}: a MIA row needs a 'document' or 'text' field, or 'input' and 'output'")


def load_mia_documents(source: str | Path | Iterable[Any], split: str) -> list[dict[str, Any]]:
    """``[{"id", "split", "text"}]`` from a JSON-lines file, a list of rows, or a list of strings."""
    if isinstance(source, (str, Path)):
        rows: list[Any] = read_jsonl(source)
        where = str(source)
    else:
        rows = list(source)
        where = f"MIA {split}s"
    docs = []
    for i, row in enumerate(rows):
        if isinstance(row, str):
            docs.append({"id": str(i), "split": split, "text": row})
            continue
        text = document_text(row, f"{where}: row {i}")
        docs.append({"id": str(row.get("id", i)), "split": split, "text": text})
    if not docs:
        raise InputError(f"{where}: no MIA {split} documents")
    return docs


def load_generations(path: str | Path) -> list[dict[str, Any]]:
    """GENERATIONS rows, checked: every field present, split forget|retain, a kind in each id."""
    rows = read_jsonl(path)
    _check_fields(rows, GENERATION_FIELDS, str(path))
    for i, row in enumerate(rows):
        if row["split"] not in SPLITS:
            raise InputError(f"{path}: row {i} (id {row['id']!r}): split must be forget or retain, got {row['split']!r}")
        row_kind(row["id"])
    return rows


def load_losses(path: str | Path) -> list[dict[str, Any]]:
    """LOSSES rows, checked: split member|nonmember and a finite loss."""
    rows = read_jsonl(path)
    _check_fields(rows, ("split", "loss"), str(path))
    for i, row in enumerate(rows):
        if row["split"] not in MIA_SPLITS:
            raise InputError(f"{path}: row {i}: split must be member or nonmember, got {row['split']!r}")
        if not isinstance(row["loss"], (int, float)) or not math.isfinite(row["loss"]):
            raise InputError(f"{path}: row {i} (id {row.get('id')!r}): loss must be a finite number, got {row['loss']!r}")
    return rows
