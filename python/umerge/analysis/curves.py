"""Loss curves (the paper's Figure 3) and score curves over epochs (Figure 2, overall and per task)
from training logs.

What is read from a log (``OUT/train_log.jsonl`` of `umerge train`, one JSON object per line):

* **step rows**: rows with ``"type": "step"``, or with no ``type`` and a loss. Keys are read
  tolerantly, first match wins (canonical name <- accepted names):

  ========== ===========================================================
  step       step, global_step, iteration, iter (else the row number)
  epoch      epoch_progress, epoch (fractional when available)
  loss       loss, total, total_loss
  npo        npo, npo_loss, forget_loss
  kl         kl, klr, kl_loss, kl_retain
  gdr        gdr, retain_nll, retain_loss, gd_loss
  forget_nll forget_nll
  lr         lr, learning_rate
  grad_norm  grad_norm, gradient_norm
  ========== ===========================================================

* **eval rows**: rows with ``"type": "eval"`` (the trainer's per-epoch hook, e.g.
  `umerge.evaluate.run.epoch_eval_hook`): every numeric field other than epoch/step is a score.

Score curves can also come from a list of evaluation reports, one per epoch. Unknown keys are
ignored; a log without any step row is an error naming the file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from umerge.analysis._io import out_dir, pyplot, save_figure, write_csv, write_json
from umerge.errors import InputError
from umerge.evaluate.data import read_jsonl

ALIASES: dict[str, tuple[str, ...]] = {
    "step": ("step", "global_step", "iteration", "iter"),
    "epoch": ("epoch_progress", "epoch"),
    "loss": ("loss", "total", "total_loss"),
    "npo": ("npo", "npo_loss", "forget_loss"),
    "kl": ("kl", "klr", "kl_loss", "kl_retain"),
    "gdr": ("gdr", "retain_nll", "retain_loss", "gd_loss"),
    "forget_nll": ("forget_nll",),
    "lr": ("lr", "learning_rate"),
    "grad_norm": ("grad_norm", "gradient_norm"),
}
TERMS = ("loss", "npo", "kl", "gdr", "forget_nll", "lr", "grad_norm")
TITLES = {
    "loss": "total loss",
    "npo": "NPO (forget)",
    "kl": "KL(p_ref || p) (retain)",
    "gdr": "retain NLL (GDR)",
    "forget_nll": "forget NLL",
    "lr": "learning rate",
    "grad_norm": "gradient norm",
}
UNITS = {
    "loss": "loss (weighted sum)",
    "npo": "NPO loss",
    "kl": "KL (nats, kl_reduction)",
    "gdr": "NLL (nats per token)",
    "forget_nll": "NLL (nats per token)",
    "lr": "learning rate",
    "grad_norm": "L2 norm",
}
_NOT_SCORES = {"type", "epoch", "step", "epoch_progress", "elapsed_s"}


def integer_epochs(ax: Any) -> None:
    """Epoch ticks at whole numbers only."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _pick(row: Mapping[str, Any], names: Sequence[str]) -> float | None:
    for n in names:
        if n in row:
            v = _num(row[n])
            if v is not None:
                return v
    return None


def read_log(path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(step rows in canonical names, eval rows as given) of one training log."""
    rows = read_jsonl(path)
    steps: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    for row in rows:
        kind = row.get("type")
        if kind == "eval":
            evals.append(row)
            continue
        if kind not in (None, "step") or (kind is None and _pick(row, ALIASES["loss"]) is None):
            continue  # other record types (or unrelated lines) are skipped
        canon = {name: _pick(row, names) for name, names in ALIASES.items()}
        if canon["step"] is None:
            canon["step"] = float(len(steps) + 1)
        steps.append(canon)
    if not steps and not evals:
        raise InputError(f"{path}: no step or eval rows (expected JSON lines with 'loss' or 'type')")
    return steps, evals


def _eval_rows(evals: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``{"epoch", score...}`` from a log's eval rows (numeric scores only)."""
    return [
        {"epoch": _num(e.get("epoch")), **{k: _num(v) for k, v in e.items() if k not in _NOT_SCORES and _num(v) is not None}}
        for e in evals
    ]


def default_labels(paths: Sequence[str | Path], labels: Sequence[str] | None) -> list[str]:
    """``labels`` when given (one per log), else each run directory's name (or the file stem)."""
    if labels is not None:
        if len(labels) != len(paths):
            raise InputError(f"{len(labels)} labels for {len(paths)} logs")
        return list(labels)
    out = []
    for p in paths:
        pp = Path(p)
        out.append(pp.parent.name if pp.name == "train_log.jsonl" and pp.parent.name else pp.stem)
    return out


def loss_curves(
    logs: Sequence[str | Path], out: str | Path, labels: Sequence[str] | None = None
) -> dict[str, Path]:
    """Plot each loss term against the optimizer step, one line per log.

    Writes ``loss_curves.png`` (one panel per term present in any log) and ``loss_curves.csv``
    (label, step, epoch and every term). Returns the paths.
    """
    if not logs:
        raise InputError("loss curves need at least one training log")
    d = out_dir(out)
    names = default_labels(logs, labels)
    table: list[dict[str, Any]] = []
    series: dict[str, list[dict[str, Any]]] = {}
    for name, path in zip(names, logs):
        steps, _ = read_log(path)
        if not steps:
            raise InputError(f"{path}: no step rows to plot")
        series[name] = steps
        table += [{"label": name, **s} for s in steps]
    present = [t for t in TERMS if any(s[t] is not None for ss in series.values() for s in ss)]
    plt = pyplot()
    cols = min(3, max(1, len(present)))
    nrows = max(1, math.ceil(len(present) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, term in zip(axes.flat, present):
        for name, steps in series.items():
            xs = [s["step"] for s in steps if s[term] is not None]
            ys = [s[term] for s in steps if s[term] is not None]
            if xs:
                ax.plot(xs, ys, label=name, linewidth=1.2)
        ax.set_title(TITLES[term])
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(UNITS[term])
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.set_visible(False)
    if len(series) > 1 and present:
        axes.flat[0].legend(fontsize=8)
    fig.suptitle("Unlearning loss dynamics")
    return {
        "figure": save_figure(fig, d / "loss_curves.png"),
        "csv": write_csv(d / "loss_curves.csv", table, ["label", "step", "epoch", *TERMS]),
    }


def scores_from_reports(reports: Mapping[float, Any]) -> list[dict[str, Any]]:
    """Score rows ``{"epoch", score...}`` from ``{epoch: EvalReport | report.json path}``."""
    from umerge.evaluate.report import EvalReport

    rows = []
    for epoch, rep in sorted(reports.items()):
        r = rep if isinstance(rep, EvalReport) else EvalReport.load(rep)
        rows.append(
            {
                "epoch": float(epoch),
                "task_aggregate": r.task_aggregate,
                "mia_score": r.mia_final_score,
                "mia_auc": r.mia_auc,
                "mmlu": r.mmlu_accuracy,
                "aggregate": r.aggregate_score,
                "forget_regurgitation": r.forget_set.get("overall-regurgitation-score"),
                "forget_knowledge": r.forget_set.get("overall-knowledge-score"),
                "retain_regurgitation": r.retain_set.get("overall-regurgitation-score"),
                "retain_knowledge": r.retain_set.get("overall-knowledge-score"),
            }
        )
    return rows


def score_curves(
    sources: Mapping[str, str | Path | Mapping[float, Any]], out: str | Path
) -> dict[str, Path]:
    """Plot scores against the epoch, one line per run, one panel per score.

    ``sources`` maps a run label to its training log (eval rows are read) or to
    ``{epoch: report}``. Writes ``score_curves.png`` and ``score_curves.csv`` (label, epoch, scores).
    """
    if not sources:
        raise InputError("score curves need at least one log or report series")
    d = out_dir(out)
    table: list[dict[str, Any]] = []
    series: dict[str, list[dict[str, Any]]] = {}
    for label, src in sources.items():
        if isinstance(src, Mapping):
            rows = scores_from_reports(src)
        else:
            _, evals = read_log(src)
            if not evals:
                raise InputError(
                    f"{src}: no eval rows (train with eval_hook=umerge.evaluate.epoch_eval_hook(...))"
                )
            rows = _eval_rows(evals)
        series[label] = rows
        table += [{"label": label, **r} for r in rows]
    keys: dict[str, None] = {}
    for rows in series.values():
        for r in rows:
            for k, v in r.items():
                if k != "epoch" and "/" not in k and v is not None:  # per-task keys: `task_curves`
                    keys.setdefault(k, None)
    present = list(keys)
    if not present:
        raise InputError("no numeric scores found to plot")
    plt = pyplot()
    cols = min(3, len(present))
    nrows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, present):
        for label, rows in series.items():
            pts = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None and r.get("epoch") is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label, linewidth=1.2)
        ax.set_title(key.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.set_ylabel("score")
        integer_epochs(ax)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.set_visible(False)
    if len(series) > 1:
        axes.flat[0].legend(fontsize=8)
    fig.suptitle("Scores over epochs")
    return {
        "figure": save_figure(fig, d / "score_curves.png"),
        "csv": write_csv(d / "score_curves.csv", table, ["label", "epoch", *present]),
        "json": write_json(d / "score_curves.json", {k: v for k, v in series.items()}),
    }


def task_curves(logs: Mapping[str, str | Path], out: str | Path) -> dict[str, Path]:
    """Regurgitation and knowledge per task and split over epochs, from epoch 0 (the paper's Figure 2).

    Reads the eval rows' ``{split}/{task}/{metric}`` scores (`umerge.evaluate.epoch_eval_hook`
    writes them). One panel per split and metric (forget/retain x regurgitation/knowledge), one
    colour per task, one line style per run. Writes ``task_curves.png``, ``task_curves.csv`` (label,
    epoch, split, task, metric, value) and ``task_curves.json``.
    """
    if not logs:
        raise InputError("task curves need at least one training log")
    d = out_dir(out)
    table: list[dict[str, Any]] = []
    for label, path in logs.items():
        _, evals = read_log(path)
        for row in _eval_rows(evals):
            for key, value in row.items():
                if key.count("/") == 2 and value is not None:
                    split, task, metric = key.split("/")
                    table.append({"label": label, "epoch": row["epoch"], "split": split, "task": task,
                                  "metric": metric, "value": value})
    if not table:
        raise InputError("no per-task scores in the logs' eval rows (train with umerge.evaluate.epoch_eval_hook)")
    tasks = sorted({r["task"] for r in table})
    plt = pyplot()
    panels = [(sp, m) for sp in ("forget", "retain") for m in ("regurgitation", "knowledge")]
    fig, axes = plt.subplots(2, 2, figsize=(9.6, 6.4), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, (split, metric) in zip(axes.flat, panels):
        for i, label in enumerate(logs):
            for j, task in enumerate(tasks):
                pts = sorted((r["epoch"], r["value"]) for r in table
                             if (r["label"], r["split"], r["task"], r["metric"]) == (label, split, task, metric))
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[i % len(styles)], marker="o", markersize=3,
                            color=f"C{j}", label=f"{label}, {task}" if len(logs) > 1 else task)
        ax.set_title(f"{split} set: {metric}")
        ax.set_xlabel("epoch (0 = before unlearning)")
        ax.set_ylabel(f"{metric} score")
        ax.set_ylim(-0.02, 1.02)
        integer_epochs(ax)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Scores per task over epochs")
    return {
        "figure": save_figure(fig, d / "task_curves.png"),
        "csv": write_csv(d / "task_curves.csv", table, ["label", "epoch", "split", "task", "metric", "value"]),
        "json": write_json(d / "task_curves.json", table),
    }
