"""Small shared helpers of the analyses: a headless matplotlib, CSV/JSON writers."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from umerge.errors import InputError


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed), or a clear InputError."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise InputError('figures need matplotlib: pip install "umerge[train]"') from exc
    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Save a figure as PNG (dpi 120) and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Path:
    """Write dict rows as CSV; columns default to the union of keys in first-seen order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if columns is None:
        seen: dict[str, None] = {}
        for r in rows:
            for k in r:
                seen.setdefault(k, None)
        columns = list(seen)
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return path


def write_json(path: Path, obj: Any) -> Path:
    """Write JSON (indent 2); NaN becomes null."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, Mapping):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    path.write_text(json.dumps(clean(obj), indent=2) + "\n", encoding="utf-8")
    return path


def out_dir(path: str | Path) -> Path:
    """Create and return an output directory (an existing file there is an error)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError(f"{p}: exists and is not a directory")
    p.mkdir(parents=True, exist_ok=True)
    return p
