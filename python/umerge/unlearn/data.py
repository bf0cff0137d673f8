"""Loading LUME / SemEval-2025 Task 4 unlearning data into typed rows.

Accepted inputs (each row has the fields `id`, `input`, `output`, `task`, and optionally `split`):

- JSON-lines: one JSON object per line (the public LUME files `forget.jsonl`, `retain.jsonl`).
- Parquet: the files the task organisers distributed (read with pyarrow, or pandas, whichever is
  installed; neither is a dependency of umerge, and reading parquet without them is a clear error).
- Column-oriented JSON: one object mapping each field to its values, either as a list or as an
  object keyed by row index (what `pandas.DataFrame.to_json()` writes, and what the reference system
  read back with `pandas.read_json`). A JSON array of row objects is accepted too.

`load_task_data` takes a directory holding `forget.*` and `retain.*` (one supported file each), a
single file whose rows carry a `split` column ("forget"/"retain"), or explicit `forget=`/`retain=`
files. The kind of a row comes from the end of its id: `sc1` is sentence completion (scored by
regurgitation), `qa0` .. `qa4` are question answering (scored by knowledge, exact match).

Bad data (unreadable file, missing or non-string field, an id without a kind suffix, a row in the
wrong split, an empty split) raises `umerge.errors.InputError` with one line naming the file and the
1-based row. This module does no tokenisation (see `tokenize.py`) and needs no torch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from umerge.errors import InputError

#: Fields every row must have, as non-empty strings (`output` may be empty only if allowed below).
REQUIRED_FIELDS: tuple[str, ...] = ("id", "input", "output", "task")
#: File extensions recognised in a data directory, in order of preference.
SUPPORTED_SUFFIXES: tuple[str, ...] = (".jsonl", ".parquet", ".json")
SPLITS: tuple[str, str] = ("forget", "retain")

# The kind suffix: `sc` (sentence completion) or `qa` (question answering) followed by its index.
_KIND_RE = re.compile(r"(sc|qa)(\d+)$")


@dataclass(frozen=True)
class Row:
    """One example: a prompt (`input`), its ground truth (`output`), and where it came from.

    `kind` is "sc" (sentence completion) or "qa" (question answering) and `kind_index` the digit
    after it (`sc1` -> 1, `qa3` -> 3), both parsed from the end of `id`. `split` is the split the row
    belongs to ("forget" or "retain"); `source` is "file:row" for error messages.
    """

    id: str
    input: str
    output: str
    task: str
    kind: str
    kind_index: int
    split: str
    source: str = ""

    @property
    def is_qa(self) -> bool:
        """True for question-answering rows (`qa0` .. `qa4`)."""
        return self.kind == "qa"

    @property
    def is_sentence_completion(self) -> bool:
        """True for sentence-completion rows (`sc1`)."""
        return self.kind == "sc"

    def to_dict(self) -> dict[str, str]:
        """The row in the JSON-lines layout (`id`, `input`, `output`, `task`, `split`)."""
        return {"id": self.id, "input": self.input, "output": self.output, "task": self.task, "split": self.split}


@dataclass
class TaskData:
    """The forget and retain splits of an unlearning task, and the files they came from."""

    forget: list[Row]
    retain: list[Row]
    sources: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in SPLITS:
            if not getattr(self, name):
                where = ", ".join(self.sources.get(name, [])) or "the data given"
                raise InputError(f"the {name} split is empty ({where})")

    def head(self, n_forget: int | None = None, n_retain: int | None = None) -> "TaskData":
        """A copy keeping the first `n_forget` forget rows and `n_retain` retain rows (None: all)."""
        return TaskData(
            forget=self.forget[:n_forget] if n_forget is not None else list(self.forget),
            retain=self.retain[:n_retain] if n_retain is not None else list(self.retain),
            sources=dict(self.sources),
        )


def parse_kind(row_id: str) -> tuple[str, int] | None:
    """Return ("sc"|"qa", index) from the id's suffix (`...sc1` -> ("sc", 1)), or None if it has none."""
    m = _KIND_RE.search(row_id)
    if m is None:
        return None
    return m.group(1), int(m.group(2))


# ----------------------------------------------------------------------------------------------
# Reading raw records from each file format


def _read_jsonl(path: Path) -> list[tuple[int, Any]]:
    records: list[tuple[int, Any]] = []
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                records.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}: row {lineno}: not valid JSON ({exc.msg})") from None
    return records


def _columns_to_records(path: Path, columns: dict[str, Any]) -> list[tuple[int, Any]]:
    """Turn {"field": [v0, v1, ...]} or {"field": {"0": v0, "1": v1}} into numbered row dicts."""
    keyed: dict[str, dict[str, Any]] = {}
    for name, values in columns.items():
        if isinstance(values, list):
            keyed[name] = {str(i): v for i, v in enumerate(values)}
        elif isinstance(values, dict):
            keyed[name] = {str(k): v for k, v in values.items()}
        else:
            raise InputError(f"{path}: column {name!r} is neither a list nor an object of row values")
    # Row order: the index keys as they appear in the first column (numeric keys sorted numerically).
    index: list[str] = []
    seen: set[str] = set()
    for col in keyed.values():
        for k in col:
            if k not in seen:
                seen.add(k)
                index.append(k)
    if all(k.lstrip("-").isdigit() for k in index):
        index.sort(key=int)
    return [(i + 1, {name: col[k] for name, col in keyed.items() if k in col}) for i, k in enumerate(index)]


def _read_json(path: Path) -> list[tuple[int, Any]]:
    try:
        with path.open("r", encoding="utf-8") as fh:
            doc = json.load(fh)
    except json.JSONDecodeError as exc:
        # A .json file may really be JSON-lines; try that before giving up.
        try:
            return _read_jsonl(path)
        except InputError:
            raise InputError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if isinstance(doc, list):
        return [(i + 1, r) for i, r in enumerate(doc)]
    if isinstance(doc, dict):
        if all(isinstance(v, (list, dict)) for v in doc.values()) and doc:
            return _columns_to_records(path, doc)
        raise InputError(f"{path}: a JSON object here must map each field to a list or object of values")
    raise InputError(f"{path}: expected a JSON array of rows or an object of columns, got {type(doc).__name__}")


def _read_parquet(path: Path) -> list[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq  # type: ignore[import-not-found]

        table = pq.read_table(path)
        columns = table.to_pydict()
    except ImportError:
        try:
            import pandas as pd  # type: ignore[import-not-found]
        except ImportError:
            raise InputError(
                f"{path}: reading parquet needs pyarrow or pandas, and neither is installed (pip install pyarrow)"
            ) from None
        columns = pd.read_parquet(path).to_dict(orient="list")
    except Exception as exc:  # noqa: BLE001 - any pyarrow failure means an unreadable file
        raise InputError(f"{path}: cannot read parquet ({exc})") from None
    return _columns_to_records(path, columns)


def read_records(path: str | Path) -> list[tuple[int, Any]]:
    """Read (row number, raw record) pairs from a JSON-lines, JSON or parquet file."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such data file")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(p)
    if suffix == ".json":
        return _read_json(p)
    if suffix == ".parquet":
        return _read_parquet(p)
    raise InputError(f"{p}: unsupported data file type {suffix!r} (use .jsonl, .json or .parquet)")


# ----------------------------------------------------------------------------------------------
# Validation


def _to_row(path: Path, rowno: int, rec: Any, split: str | None) -> Row:
    where = f"{path}: row {rowno}"
    if not isinstance(rec, dict):
        raise InputError(f"{where}: expected an object with fields {', '.join(REQUIRED_FIELDS)}")
    missing = [f for f in REQUIRED_FIELDS if rec.get(f) is None]
    if missing:
        raise InputError(f"{where}: missing field{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}")
    for f in REQUIRED_FIELDS:
        if not isinstance(rec[f], str):
            raise InputError(f"{where}: field {f!r} must be a string, got {type(rec[f]).__name__}")
    if not rec["id"]:
        raise InputError(f"{where}: empty id")
    kind = parse_kind(rec["id"])
    if kind is None:
        raise InputError(
            f"{where}: id {rec['id']!r} has no kind suffix (it must end with sc1 for sentence completion "
            "or qa0..qa4 for question answering)"
        )
    row_split = rec.get("split")
    if row_split is not None and not isinstance(row_split, str):
        raise InputError(f"{where}: field 'split' must be a string, got {type(row_split).__name__}")
    if row_split is not None:
        row_split = row_split.strip().lower()
        if row_split not in SPLITS:
            raise InputError(f"{where}: split {rec['split']!r} is neither 'forget' nor 'retain'")
        if split is not None and row_split != split:
            raise InputError(f"{where}: row has split {row_split!r} but the file was given as the {split} split")
    final_split = split or row_split
    if final_split is None:
        raise InputError(f"{where}: no 'split' field, and the file was not given as a forget or retain file")
    return Row(
        id=rec["id"],
        input=rec["input"],
        output=rec["output"],
        task=rec["task"],
        kind=kind[0],
        kind_index=kind[1],
        split=final_split,
        source=f"{path}:{rowno}",
    )


def load_rows(path: str | Path, split: str | None = None) -> list[Row]:
    """Load and validate every row of one file.

    With `split` ("forget"/"retain") every row belongs to that split (a row whose `split` column says
    otherwise is an error); without it, each row must carry a `split` column.
    """
    if split is not None and split not in SPLITS:
        raise InputError(f"unknown split {split!r} (use 'forget' or 'retain')")
    p = Path(path)
    return [_to_row(p, rowno, rec, split) for rowno, rec in read_records(p)]


def _find_split_file(directory: Path, split: str) -> Path:
    candidates = [p for p in sorted(directory.iterdir()) if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES]
    exact = [p for p in candidates if p.stem.lower() == split]
    if len(exact) == 1:
        return exact[0]
    if len(exact) > 1:
        names = ", ".join(p.name for p in exact)
        raise InputError(f"{directory}: several {split} files ({names}); pass the one to use with --{split}")
    prefixed = [p for p in candidates if p.stem.lower().startswith(split)]
    if len(prefixed) == 1:
        return prefixed[0]
    if not prefixed:
        raise InputError(
            f"{directory}: no {split} file (expected {split}.jsonl, {split}.parquet or {split}.json)"
        )
    names = ", ".join(p.name for p in prefixed)
    raise InputError(f"{directory}: several {split} files ({names}); pass the one to use explicitly")


def load_task_data(
    data: str | Path | TaskData | None = None,
    *,
    forget: str | Path | Sequence[Row] | None = None,
    retain: str | Path | Sequence[Row] | None = None,
) -> TaskData:
    """Load the forget and retain splits.

    `data` is a directory holding `forget.*` and `retain.*`, or one file whose rows carry a `split`
    column, or an already loaded `TaskData` (returned as is). `forget=` / `retain=` give the files
    explicitly (or lists of rows) and override what `data` would provide.
    """
    if isinstance(data, TaskData) and forget is None and retain is None:
        return data
    splits: dict[str, list[Row]] = {}
    sources: dict[str, list[str]] = {"forget": [], "retain": []}
    if isinstance(data, TaskData):
        splits = {"forget": list(data.forget), "retain": list(data.retain)}
        sources = {k: list(v) for k, v in data.sources.items()}
    elif data is not None:
        d = Path(data)
        if d.is_dir():
            for name in SPLITS:
                if (name == "forget" and forget is not None) or (name == "retain" and retain is not None):
                    continue
                f = _find_split_file(d, name)
                splits[name] = load_rows(f, name)
                sources[name] = [str(f)]
        elif d.is_file():
            rows = load_rows(d)
            for name in SPLITS:
                splits[name] = [r for r in rows if r.split == name]
                sources[name] = [str(d)]
        else:
            raise InputError(f"{d}: no such data file or directory")
    for name, given in (("forget", forget), ("retain", retain)):
        if given is None:
            continue
        if isinstance(given, (str, Path)):
            splits[name] = load_rows(given, name)
            sources[name] = [str(given)]
        else:
            splits[name] = list(given)
            sources[name] = ["<rows>"]
    for name in SPLITS:
        if name not in splits:
            raise InputError(f"no {name} data given (pass a directory with {name}.jsonl or --{name} FILE)")
    return TaskData(forget=splits["forget"], retain=splits["retain"], sources=sources)


def write_jsonl(rows: Iterable[Row], path: str | Path) -> Path:
    """Write rows in the JSON-lines layout (with their `split`), e.g. to hand a subset to `umerge train`."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
    return p


__all__ = [
    "Row",
    "TaskData",
    "REQUIRED_FIELDS",
    "parse_kind",
    "read_records",
    "load_rows",
    "load_task_data",
    "write_jsonl",
]
