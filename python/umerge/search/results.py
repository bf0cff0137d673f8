"""What a merge search writes: the candidate table (CSV, Markdown), the Pareto figure, the choice.

Rows are flat dicts: the recipe (``method``, ``density``, ``majority_sign``, ``weights``), the
validation scores under `umerge.analysis.sweep.SCORE_KEYS`, and bookkeeping (``index``, ``label``,
``default``, ``seconds``). `choose` picks the row with the highest objective (`OBJECTIVES`; a row
without that score never wins; equal scores: the earlier candidate, so the order of the space
decides, not chance). `pareto_front` is the set of rows that no other row matches or beats on
every one of the given scores while beating it on one (maximising all).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from umerge.analysis._io import pyplot, save_figure, write_csv
from umerge.analysis.sweep import SCORE_KEYS
from umerge.errors import InputError

#: --objective name -> score key (`umerge.analysis.sweep.score_row`), and what it needs.
OBJECTIVES = {
    "final": ("aggregate", "final aggregate = mean(Task Aggregate, MIA score, MMLU)", ("mia", "mmlu")),
    "task": ("task_aggregate", "Task Aggregate (harmonic mean of the 12 regurgitation/knowledge values)", ()),
    "mia": ("mia_score", "MIA score = 1 - 2|AUC - 0.5|", ("mia",)),
    "mmlu": ("mmlu", "MMLU-format accuracy", ("mmlu",)),
}
RECIPE_COLUMNS = ("index", "label", "method", "density", "majority_sign", "weights", "default")
CSV_COLUMNS = (*RECIPE_COLUMNS, *SCORE_KEYS, "seconds")


def _value(row: Mapping[str, Any], key: str) -> float | None:
    v = row.get(key)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def choose(rows: Sequence[Mapping[str, Any]], objective: str) -> int:
    """The position of the best row by `objective` (see the module docstring)."""
    key = OBJECTIVES[objective][0]
    best, best_v = -1, -math.inf
    for i, r in enumerate(rows):
        v = _value(r, key)
        if v is not None and v > best_v:
            best, best_v = i, v
    if best < 0:
        raise InputError(f"no candidate has a {key} score: the objective {objective} cannot choose")
    return best


def pareto_front(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[int]:
    """Positions of the rows on the Pareto front of `keys` (all maximised; rows missing one are left out)."""
    pts = [(i, [_value(r, k) for k in keys]) for i, r in enumerate(rows)]
    full = [(i, [float(v) for v in p if v is not None]) for i, p in pts if all(v is not None for v in p)]
    front = []
    for i, p in full:
        dominated = any(all(q[j] >= p[j] for j in range(len(keys))) and any(q[j] > p[j] for j in range(len(keys)))
                        for k, q in full if k != i)
        if not dominated:
            front.append(i)
    return front


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def csv_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows with the weights written as ``1,0.5`` (one CSV cell)."""
    return [{**r, "weights": ",".join(f"{w:g}" for w in r["weights"])} for r in rows]


def write_table_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    return write_csv(path, csv_rows(rows), list(CSV_COLUMNS))


def markdown(rows: Sequence[Mapping[str, Any]], objective: str, chosen: int, comparison: Mapping[str, Any],
             protocol: Sequence[str]) -> str:
    """search.md: the protocol, the test-split comparison (the numbers to quote), then every
    candidate's validation scores, best first."""
    key, desc, _ = OBJECTIVES[objective]
    lines = ["# Merge search", "", *protocol, ""]
    lines += ["## Test split: the chosen candidate against the default", "",
              "Scored once each, after the search, on documents no candidate was chosen on: these are the "
              "numbers to quote. The validation column is what the choice saw.", "",
              "| | recipe | validation " + key + " | test Task Aggregate | test MIA score / AUC | test MMLU | "
              "test final aggregate |", "|---|---|---|---|---|---|---|"]
    for name in ("chosen", "default"):
        c = comparison[name]
        t = c["test"]
        mia = "n/a" if t.get("mia_score") is None else f"{t['mia_score']:.4f} / {_fmt(t.get('mia_auc'))}"
        lines.append(f"| {name} | {c['label']} | {_fmt(c['validation'].get(key))} | {_fmt(t.get('task_aggregate'))} | "
                     f"{mia} | {_fmt(t.get('mmlu'))} | {_fmt(t.get('aggregate'))} |")
    lines += ["", f"## Every candidate on the validation split, by {desc}", "",
              "| rank | candidate | method | density | sign | weights | Task Aggregate | MIA score / AUC | MMLU | "
              "final aggregate |", "|---|---|---|---|---|---|---|---|---|---|"]
    def rank_key(i: int) -> tuple[float, int]:
        v = _value(rows[i], key)
        return (-v if v is not None else math.inf, i)

    order = sorted(range(len(rows)), key=rank_key)
    for rank, i in enumerate(order, start=1):
        r = rows[i]
        mark = (" (chosen)" if i == chosen else "") + (" (default)" if r.get("default") else "")
        mia = "n/a" if r.get("mia_score") is None else f"{r['mia_score']:.4f} / {_fmt(r.get('mia_auc'))}"
        density = "-" if r.get("density") is None else f"{r['density']:g}"
        lines.append(f"| {rank} | {r['index']}{mark} | {r['method']} | {density} | "
                     f"{r['majority_sign'] if r['method'] in ('ties', 'dare_ties') else '-'} | "
                     f"{','.join(f'{w:g}' for w in r['weights'])} | {_fmt(r.get('task_aggregate'))} | {mia} | "
                     f"{_fmt(r.get('mmlu'))} | {_fmt(r.get('aggregate'))} |")
    return "\n".join(lines) + "\n"


def pareto_figure(rows: Sequence[Mapping[str, Any]], chosen: int, default: int | None, path: Path) -> Path:
    """pareto.png: Task Aggregate against MIA score (colour: MMLU) and against MMLU (colour: MIA
    score), validation split; each panel's Pareto front of its two axes drawn as a step line, the
    chosen candidate a red star, the default a black square."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.6))
    panels = (("mia_score", "MIA score (1 - 2|AUC - 0.5|)", "mmlu", "MMLU"),
              ("mmlu", "MMLU", "mia_score", "MIA score"))
    for ax, (ykey, ylabel, ckey, clabel) in zip(axes, panels):
        pts = [(i, _value(r, "task_aggregate"), _value(r, ykey), _value(r, ckey)) for i, r in enumerate(rows)]
        pts = [p for p in pts if p[1] is not None and p[2] is not None]
        if not pts:
            ax.text(0.5, 0.5, f"no {ylabel} scores", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        colours = [p[3] if p[3] is not None else 0.0 for p in pts]
        sc = ax.scatter([p[1] for p in pts], [p[2] for p in pts], c=colours, cmap="viridis", vmin=0, vmax=1,
                        s=28, zorder=2)
        fig.colorbar(sc, ax=ax, label=f"{clabel} (validation)")
        front = pareto_front(rows, ("task_aggregate", ykey))
        fx = sorted((_value(rows[i], "task_aggregate"), _value(rows[i], ykey)) for i in front)
        if fx:
            ax.step([p[0] for p in fx], [p[1] for p in fx], where="post", color="grey", linewidth=1, zorder=1,
                    label="Pareto front")
            ax.scatter([p[0] for p in fx], [p[1] for p in fx], facecolors="none", edgecolors="grey", s=70, zorder=3)
        for idx, style in ((default, dict(marker="s", facecolors="none", edgecolors="black", s=110, label="default")),
                           (chosen, dict(marker="*", color="red", s=160, label="chosen"))):
            if idx is not None and _value(rows[idx], "task_aggregate") is not None and _value(rows[idx], ykey) is not None:
                ax.scatter([_value(rows[idx], "task_aggregate")], [_value(rows[idx], ykey)], zorder=4, **style)
        ax.set_xlabel("Task Aggregate (validation)")
        ax.set_ylabel(f"{ylabel} (validation)")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    fig.suptitle(f"Merge search: {len(rows)} candidates on the validation split")
    return save_figure(fig, path)


__all__ = ["CSV_COLUMNS", "OBJECTIVES", "choose", "csv_rows", "markdown", "pareto_figure", "pareto_front",
           "write_table_csv"]
