"""The demo's data directory, written the same way whatever fills it (`world` or `subset`).

Layout: ``forget.jsonl``, ``retain.jsonl``, ``mia/member.jsonl`` and ``mia/nonmember.jsonl`` (one
sentence-completion row per document), ``mmlu/dev/<subject>_dev.csv`` and
``mmlu/test/<subject>_test.csv`` (columns question, A, B, C, D, answer; no header), and a JSON file
describing where the rows came from.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any


def jsonl_text(rows: Iterable[Mapping[str, Any]]) -> str:
    """JSON lines, UTF-8 kept as is."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def mmlu_csv_text(rows: Iterable[Sequence[str]]) -> str:
    """Multiple-choice questions ``[question, A, B, C, D, answer]`` in the MMLU CSV layout."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def one_per_document(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The sentence-completion row of each document (prompt + answer = the whole document): the MIA's unit."""
    return [r for r in rows if str(r["id"]).endswith("sc1")]


def json_text(value: Any) -> str:
    return json.dumps(value, indent=1, ensure_ascii=False) + "\n"


def write_files(out: Path, files: Mapping[str, str]) -> None:
    """Write ``{relative path: text}`` under ``out``, creating folders."""
    for rel, text in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
