"""Figures of one evaluation report: the Task Aggregate's terms, and the MIA loss distributions.

* ``scores.png``: one bar per term of the Task Aggregate (forget values already inverted, so
  higher is better everywhere), with the Task Aggregate as a line;
* ``mia_losses.png``: histograms of the per-document losses of members and nonmembers, with the
  loss attack's AUC in the title (overlapping histograms mean an AUC near 0.5).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from umerge.analysis._io import out_dir, pyplot, save_figure


def report_figures(
    report: Any, losses: Sequence[Mapping[str, Any]] | None, out: str | Path
) -> dict[str, Path]:
    """Write ``scores.png`` (and ``mia_losses.png`` when losses are given) into ``out``."""
    d = out_dir(out)
    plt = pyplot()
    paths: dict[str, Path] = {}
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    labels = report.aggregated_term_labels or [str(i) for i in range(len(report.aggregated_terms))]
    colors = ["C3" if lab.startswith("forget") else "C0" for lab in labels]
    ax.bar(range(len(report.aggregated_terms)), report.aggregated_terms, color=colors)
    ax.axhline(report.task_aggregate, color="k", linestyle="--", linewidth=1,
               label=f"Task Aggregate {report.task_aggregate:.3f}")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels([lab.replace(" (1 - v)", "*") for lab in labels], rotation=45, ha="right", fontsize=7)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("score (* = 1 - forget value)")
    ax.legend(fontsize=8)
    ax.set_title(f"Task Aggregate terms: {report.name}")
    paths["scores_figure"] = save_figure(fig, d / "scores.png")
    if losses:
        fig, ax = plt.subplots(figsize=(6.0, 3.6))
        for split, color in (("member", "C3"), ("nonmember", "C0")):
            vals = [float(r["loss"]) for r in losses if r.get("split") == split]
            if vals:
                ax.hist(vals, bins=min(30, max(5, len(vals) // 2)), alpha=0.55, color=color, label=f"{split} ({len(vals)})")
        auc = report.mia_auc
        ax.set_title("MIA: per-document loss" + (f" (AUC {auc:.3f})" if auc is not None else ""))
        ax.set_xlabel("mean token NLL")
        ax.set_ylabel("documents")
        ax.legend(fontsize=8)
        paths["mia_figure"] = save_figure(fig, d / "mia_losses.png")
    return paths
