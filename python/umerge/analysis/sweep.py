"""Density sweeps (the paper's Figure 5) and merge-method tables (Table 2).

Both take evaluation results and lay them out; neither merges anything itself. A density sweep
calls a *merge* callable ``merge(density, out_dir) -> model`` for each density (``umerge ties``
through `command_merger`, the Python merge API, or a fake in tests) and a *score* callable
``score(model) -> EvalReport | mapping`` (``evaluate`` through `model_scorer`), then plots every
score against the density.

The method table has one row per merge method with the headline scores (Task Aggregate, MIA score
and AUC, MMLU, final Aggregate) and the four overall forget/retain values, as Markdown, CSV, JSON
and a grouped bar chart.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from umerge.analysis._io import out_dir, pyplot, save_figure, write_csv, write_json
from umerge.errors import InputError

DEFAULT_DENSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
SCORE_KEYS = (
    "task_aggregate", "mia_score", "mia_auc", "mmlu", "aggregate",
    "forget_regurgitation", "forget_knowledge", "retain_regurgitation", "retain_knowledge",
)
HEADLINE = ("task_aggregate", "mia_score", "mmlu", "aggregate")
#: The density sweep's lines (the paper's Figure 5 plus the AUC behind the MIA score).
SWEEP_LINES = {
    "task_aggregate": ("Task Aggregate", "-"),
    "mia_auc": ("MIA AUC", "--"),
    "mia_score": ("MIA score", "-"),
    "mmlu": ("MMLU", "-"),
    "aggregate": ("final aggregate", "-"),
}


def score_row(result: Any) -> dict[str, float | None]:
    """Flat scores from an `EvalReport`, a report.json path, or a mapping with `SCORE_KEYS`."""
    from umerge.evaluate.report import EvalReport

    if isinstance(result, (str, Path)):
        result = EvalReport.load(result)
    if isinstance(result, EvalReport):
        return {
            "task_aggregate": result.task_aggregate,
            "mia_score": result.mia_final_score,
            "mia_auc": result.mia_auc,
            "mmlu": result.mmlu_accuracy,
            "aggregate": result.aggregate_score,
            "forget_regurgitation": result.forget_set.get("overall-regurgitation-score"),
            "forget_knowledge": result.forget_set.get("overall-knowledge-score"),
            "retain_regurgitation": result.retain_set.get("overall-regurgitation-score"),
            "retain_knowledge": result.retain_set.get("overall-knowledge-score"),
        }
    if isinstance(result, Mapping):
        return {k: (None if result.get(k) is None else float(result[k])) for k in SCORE_KEYS}
    raise InputError(f"cannot read scores from a {type(result).__name__} (expected an EvalReport or a mapping)")


def parse_numbers(text: str, what: str = "values") -> list[float]:
    """``"0.1,0.5,1"`` or ``"0.1:1.0:0.1"`` (start:stop:step, inclusive) -> numbers; `what` names them in errors."""
    text = text.strip()
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if step <= 0:
                raise ValueError(text)
            n = int(round((stop - start) / step)) + 1
            values = [round(start + i * step, 10) for i in range(n)]
        else:
            values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{what} {text!r}: expected a comma list (0.1,0.5,1) or start:stop:step") from None
    if not values:
        raise InputError(f"{what} {text!r}: no values")
    return values


def parse_densities(text: str) -> list[float]:
    """``"0.1,0.5,1"`` or ``"0.1:1.0:0.1"`` (start:stop:step, inclusive) -> densities in (0, 1]."""
    values = parse_numbers(text, "densities")
    bad = [v for v in values if not 0.0 < v <= 1.0]
    if bad:
        raise InputError(f"densities must lie in (0, 1]: got {values}")
    return values


def command_merger(template: str) -> Callable[[float, Path], Path]:
    """A merge callable that runs a shell-free command built from ``template``.

    ``{density}`` and ``{out}`` in the template are replaced (e.g.
    ``"umerge ties m1/ m2/ --base base/ --density {density} -o {out}"``); the merged model is ``out``.
    A failing command is an InputError carrying the end of its stderr.
    """
    if "{density}" not in template or "{out}" not in template:
        raise InputError("the merge command must contain {density} and {out}")

    def merge(density: float, out: Path) -> Path:
        argv = shlex.split(template.format(density=f"{density:g}", out=shlex.quote(str(out))))
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise InputError(f"merge at density {density:g} failed (exit {proc.returncode}): {tail[0]}")
        return out

    return merge


def model_scorer(adapter_on: str | Path | None = None, **evaluate_kwargs: Any) -> Callable[[Any], Any]:
    """A score callable: `umerge.evaluate.evaluate` on the merged output.

    With ``adapter_on`` the merged output is a PEFT adapter evaluated on that base model; otherwise
    it is a full model directory. ``evaluate_kwargs`` (data, mia_members, mmlu_dir, max_rows, ...)
    are passed through.
    """
    from umerge.evaluate import evaluate

    def score(merged: Any) -> Any:
        if adapter_on is not None:
            return evaluate(adapter_on, adapter=merged, **evaluate_kwargs)
        return evaluate(merged, **evaluate_kwargs)

    return score


def density_sweep(
    merge: Callable[[float, Path], Any],
    score: Callable[[Any], Any],
    out: str | Path,
    densities: Sequence[float] = DEFAULT_DENSITIES,
    keep_models: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Merge at each density, score each, write ``density_sweep.{png,csv,json}``; return rows and paths.

    Merged outputs go to ``out/merged/density-<d>/`` and are deleted after scoring unless
    ``keep_models``. Each report is kept as ``out/reports/density-<d>.json`` when it is an EvalReport.
    """
    from umerge.evaluate.report import EvalReport

    if not densities:
        raise InputError("the density sweep needs at least one density")
    d = out_dir(out)
    rows: list[dict[str, Any]] = []
    for density in densities:
        if not 0.0 < float(density) <= 1.0:
            raise InputError(f"density {density} is outside (0, 1]")
        target = d / "merged" / f"density-{float(density):g}"
        if progress:
            print(f"density {float(density):g}: merging", flush=True)
        merged = merge(float(density), target)
        result = score(merged)
        if isinstance(result, EvalReport):
            result.meta.setdefault("name", f"density {float(density):g}")
            result.save(d / "reports" / f"density-{float(density):g}.json")
        row = {"density": float(density), **score_row(result)}
        rows.append(row)
        if progress:
            print(f"density {float(density):g}: " + ", ".join(f"{k}={row[k]:.4f}" for k in HEADLINE if row[k] is not None), flush=True)
        if not keep_models and target.exists():
            shutil.rmtree(target)
    if not keep_models and (d / "merged").is_dir() and not any((d / "merged").iterdir()):
        (d / "merged").rmdir()
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    xs = [r["density"] for r in rows]
    for key, (label, style) in SWEEP_LINES.items():
        pts = [(x, r[key]) for x, r in zip(xs, rows) if r[key] is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=label)
    ax.axhline(0.5, color="grey", linewidth=0.6, linestyle=":")  # the AUC a balanced model aims at
    ax.set_xlabel("density (fraction of each update kept)")
    ax.set_ylabel("score (MIA AUC: 0.5 is balanced)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Scores of the merge against TIES density")
    paths = {
        "figure": save_figure(fig, d / "density_sweep.png"),
        "csv": write_csv(d / "density_sweep.csv", rows, ["density", *SCORE_KEYS]),
        "json": write_json(d / "density_sweep.json", rows),
    }
    return {"rows": rows, **paths}


def methods_table(entries: Mapping[str, Any], out: str | Path | None = None) -> str:
    """The merge-method comparison (Table 2 layout) as Markdown; files written when ``out`` is given.

    ``entries`` maps a method name (``ties (density 0.8)``, ``linear``, ...) to an EvalReport, a
    report.json path, or a mapping of scores. Writes ``methods.md``, ``methods.csv``,
    ``methods.json`` and ``methods.png`` (grouped bars of the four headline scores).
    """
    if not entries:
        raise InputError("the method table needs at least one entry")
    rows: list[dict[str, Any]] = [{"method": name, **score_row(r)} for name, r in entries.items()]

    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    lines = [
        "| Method | Task Aggregate | MIA score / AUC | MMLU | Aggregate | forget reg. | forget know. | retain reg. | retain know. |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mia = "n/a" if r["mia_score"] is None else f"{r['mia_score']:.4f} / {f(r['mia_auc'])}"
        lines.append(
            f"| {r['method']} | {f(r['task_aggregate'])} | {mia} | {f(r['mmlu'])} | {f(r['aggregate'])} | "
            f"{f(r['forget_regurgitation'])} | {f(r['forget_knowledge'])} | {f(r['retain_regurgitation'])} | "
            f"{f(r['retain_knowledge'])} |"
        )
    table = "\n".join(lines) + "\n"
    if out is not None:
        d = out_dir(out)
        (d / "methods.md").write_text(table, encoding="utf-8")
        write_csv(d / "methods.csv", rows, ["method", *SCORE_KEYS])
        write_json(d / "methods.json", rows)
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(max(6.4, 1.2 * len(rows) + 2), 4.0))
        width = 0.8 / len(HEADLINE)
        for j, key in enumerate(HEADLINE):
            xs = [i + j * width for i in range(len(rows))]
            bars = ax.bar(xs, [r[key] or 0.0 for r in rows], width, color=f"C{j}", label=key.replace("_", " "))
            for x, r, bar in zip(xs, rows, bars):
                if r[key] is None:  # missing: an outlined, hatched placeholder, never a zero-height bar
                    bar.set_height(1.0)
                    bar.set_facecolor("none")
                    bar.set_edgecolor("grey")
                    bar.set_hatch("//")
                    ax.text(x, 0.5, "n/a", rotation=90, ha="center", va="center", fontsize=7, color="grey")
                elif r[key] == 0.0:  # a real zero: a mark on the axis with its value
                    ax.plot([x], [0.0], marker="_", markersize=10, color=f"C{j}")
                    ax.text(x, 0.02, "0", ha="center", va="bottom", fontsize=7)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
        ax.set_xticklabels([r["method"] for r in rows], rotation=20, ha="right", fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("score (hatched: not available)")
        ax.legend(fontsize=8)
        ax.set_title("Merge methods")
        save_figure(fig, d / "methods.png")
    return table
