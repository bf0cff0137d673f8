"""The evaluation report: a typed result, its JSON form (official keys), a Markdown table, comparisons.

``report.json`` carries the official scorer's keys with the official layout, so a tool written for
``evaluation_results.json`` reads it unchanged:

``forget-set`` / ``retain-set``
    ``overall-regurgitation-score``, ``overall-knowledge-score`` and, per task,
    ``{"regurgitation-score", "knowledge-score"}`` (raw values, not inverted).
``aggregated-terms``
    the terms of the Task Aggregate (forget inverted), in order.
``harmonic-mean-task-aggregate``, ``mia_loss_acc`` (the loss attack's AUC, despite the name),
``mia_final_score``, ``mmlu_average``, ``aggregate-score``
    as the official scorer; ``aggregate-score`` is -1 when MIA or MMLU is missing, as there.

Our extra keys: ``format``, ``aggregated-term-labels``, ``mia`` (every attack's AUC and score,
counts), ``mmlu`` (accuracy, question count, per subject, shots), ``warnings`` and ``meta``
(model, adapter, data, row counts, timings, throughput, and ``quantized`` when the model was
scored after ``--quantize``: scheme, bits, group size, tensors).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from umerge.errors import InputError
from umerge.evaluate import metrics

FORMAT = "umerge-eval-report/1"


@dataclass
class EvalReport:
    """Every score of one evaluated model; ``to_dict``/``from_dict`` round-trip through report.json."""

    forget_set: dict[str, Any]
    retain_set: dict[str, Any]
    aggregated_terms: list[float]
    aggregated_term_labels: list[str]
    task_aggregate: float
    mia: dict[str, Any] | None = None
    mmlu: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    # -- derived -----------------------------------------------------------------------------
    @property
    def mia_auc(self) -> float | None:
        """AUC of the official loss attack (``mia_loss_acc``)."""
        return None if self.mia is None else float(self.mia["loss"]["auc"])

    @property
    def mia_final_score(self) -> float | None:
        """``1 - 2|AUC - 0.5|`` of the loss attack."""
        return None if self.mia is None else float(self.mia["loss"]["score"])

    @property
    def mmlu_accuracy(self) -> float | None:
        """MMLU accuracy pooled over questions."""
        return None if self.mmlu is None else float(self.mmlu["accuracy"])

    @property
    def aggregate_score(self) -> float | None:
        """mean(Task Aggregate, MIA score, MMLU accuracy), or None when MIA or MMLU is missing."""
        if self.mia_final_score is None or self.mmlu_accuracy is None:
            return None
        return metrics.final_aggregate(self.task_aggregate, self.mia_final_score, self.mmlu_accuracy)

    @property
    def name(self) -> str:
        """A display name: ``meta["name"]``, else the adapter's or model's directory name, else the
        directory of the re-scored generations, else "model"."""
        if self.meta.get("name"):
            return str(self.meta["name"])
        for key in ("adapter", "model"):
            if self.meta.get(key):
                return Path(str(self.meta[key])).name or str(self.meta[key])
        if self.meta.get("generations"):
            return Path(str(self.meta["generations"])).resolve().parent.name or "model"
        return "model"

    # -- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The report.json object: official keys first, then ours."""
        d: dict[str, Any] = {
            "forget-set": self.forget_set,
            "retain-set": self.retain_set,
            "aggregated-terms": self.aggregated_terms,
            "harmonic-mean-task-aggregate": self.task_aggregate,
        }
        if self.mia is not None:
            d["mia_loss_acc"] = self.mia_auc
            d["mia_final_score"] = self.mia_final_score
        if self.mmlu is not None:
            d["mmlu_average"] = self.mmlu_accuracy
        agg = self.aggregate_score
        d["aggregate-score"] = -1 if agg is None else agg
        d["format"] = FORMAT
        d["aggregated-term-labels"] = self.aggregated_term_labels
        d["mia"] = self.mia
        d["mmlu"] = self.mmlu
        d["warnings"] = self.warnings
        d["meta"] = self.meta
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "report") -> EvalReport:
        """Rebuild from ``to_dict``'s output (an official-only file is accepted: MIA/MMLU from its keys)."""
        try:
            mia = d.get("mia")
            if mia is None and d.get("mia_loss_acc") is not None:
                auc = float(d["mia_loss_acc"])
                mia = {"loss": {"auc": auc, "score": metrics.mia_score(auc)}}
            mmlu = d.get("mmlu")
            if mmlu is None and d.get("mmlu_average") is not None:
                mmlu = {"accuracy": float(d["mmlu_average"])}
            return cls(
                forget_set=dict(d["forget-set"]),
                retain_set=dict(d["retain-set"]),
                aggregated_terms=[float(x) for x in d.get("aggregated-terms", [])],
                aggregated_term_labels=list(d.get("aggregated-term-labels", [])),
                task_aggregate=float(d["harmonic-mean-task-aggregate"]),
                mia=mia,
                mmlu=mmlu,
                warnings=list(d.get("warnings", [])),
                meta=dict(d.get("meta", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{where}: not an evaluation report ({type(exc).__name__}: {exc})") from None

    def save(self, path: str | Path) -> Path:
        """Write the JSON form (atomically)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(p)
        return p

    @classmethod
    def load(cls, path: str | Path) -> EvalReport:
        """Read a report.json written by `save` (or the official scorer's evaluation_results.json)."""
        p = Path(path)
        if not p.is_file():
            raise InputError(f"{p}: no such report")
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InputError(f"{p}: not valid JSON ({exc.msg})") from None
        return cls.from_dict(d, where=str(p))

    def to_markdown(self) -> str:
        """A Markdown summary: headline numbers, then the 12 task values, then the MIA attacks."""
        lines = [f"# Evaluation: {self.name}", ""]
        q = self.meta.get("quantized")
        if q:
            group = "one scale per row" if q.get("group_size") == -1 else f"groups of {q.get('group_size')} input columns"
            lines += [f"Scored after {q.get('scheme')} quantization of {q.get('tensors')} linear weights (round to "
                      f"nearest, symmetric, {group}; `umerge quantize`).", ""]
        lines += ["| Task Aggregate | MIA score / AUC | MMLU | Aggregate |", "|---|---|---|---|"]
        lines.append("| " + " | ".join(_headline(self)) + " |")
        lines += ["", "| split | task | regurgitation | knowledge |", "|---|---|---|---|"]
        for split_name, split in (("forget", self.forget_set), ("retain", self.retain_set)):
            for task in metrics.split_tasks(split):
                v = split[task]
                lines.append(
                    f"| {split_name} | {task} | {_fmt(v.get(metrics.REGURGITATION))} | {_fmt(v.get(metrics.KNOWLEDGE))} |"
                )
            lines.append(
                f"| {split_name} | overall | {_fmt(split.get('overall-regurgitation-score'))} | "
                f"{_fmt(split.get('overall-knowledge-score'))} |"
            )
        lines += ["", "Forget values enter the Task Aggregate as 1 - v (lower forget scores are better)."]
        if self.mia is not None:
            lines += ["", "| MIA attack | AUC | score 1-2\\|AUC-0.5\\| |", "|---|---|---|"]
            for name in ("loss", "min_k", "min_k_pp", "zlib"):
                if name in self.mia:
                    a = self.mia[name]
                    label = {"loss": "loss (official)", "min_k": f"Min-K% (k={a.get('k')})",
                             "min_k_pp": f"Min-K%++ (k={a.get('k')})", "zlib": "zlib"}[name]
                    lines.append(f"| {label} | {_fmt(a['auc'])} | {_fmt(a['score'])} |")
        if self.mmlu is not None and self.mmlu.get("subjects"):
            lines += ["", f"MMLU ({self.mmlu.get('k_shot', '?')}-shot), pooled accuracy {_fmt(self.mmlu_accuracy)} "
                      f"over {self.mmlu.get('n_questions', '?')} questions:", "",
                      "| subject | accuracy | questions |", "|---|---|---|"]
            for subject, v in sorted(self.mmlu["subjects"].items()):
                lines.append(f"| {subject} | {_fmt(v.get('accuracy'))} | {v.get('n')} |")
        if self.warnings:
            lines += ["", "Warnings:", ""] + [f"- {w}" for w in self.warnings]
        return "\n".join(lines) + "\n"


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{float(v):.{digits}f}"


def _headline(r: EvalReport) -> list[str]:
    mia = "n/a" if r.mia is None else f"{r.mia_final_score:.4f} / {r.mia_auc:.4f}"
    return [_fmt(r.task_aggregate), mia, _fmt(r.mmlu_accuracy), _fmt(r.aggregate_score)]


def build_report(
    generations: Sequence[Mapping[str, Any]],
    losses: Sequence[Mapping[str, Any]] | None = None,
    mmlu: Mapping[str, Any] | float | None = None,
    meta: Mapping[str, Any] | None = None,
    min_k: float = metrics.DEFAULT_MIN_K,
) -> EvalReport:
    """Score generation rows (and MIA loss rows, and an MMLU result) into an `EvalReport`.

    ``generations`` rows need ``id``, ``task``, ``split``, ``output`` and ``generation``.
    ``mmlu`` is a float accuracy or a mapping with ``accuracy`` (ours) or ``average_acc`` (official).
    """
    by_split: dict[str, list[Mapping[str, Any]]] = {"forget": [], "retain": []}
    for i, row in enumerate(generations):
        if row.get("split") not in by_split:
            raise InputError(f"generation row {i} (id {row.get('id')!r}): split must be forget or retain")
        by_split[row["split"]].append(row)
    forget = metrics.split_scores(by_split["forget"])
    retain = metrics.split_scores(by_split["retain"])
    terms, labels, warnings = metrics.aggregated_terms(forget, retain)
    task_agg = metrics.harmonic_mean(terms)
    mia = metrics.mia_attacks(losses, k=min_k) if losses else None
    mmlu_d: dict[str, Any] | None = None
    if mmlu is not None:
        if isinstance(mmlu, (int, float)):
            mmlu_d = {"accuracy": float(mmlu)}
        elif "accuracy" in mmlu:
            mmlu_d = dict(mmlu)
        elif "average_acc" in mmlu:
            mmlu_d = {"accuracy": float(mmlu["average_acc"])}
        else:
            raise InputError("the MMLU result needs an 'accuracy' (or official 'average_acc') value")
        w = metrics.mmlu_warning(mmlu_d["accuracy"])
        if w:
            warnings.append(w)
    return EvalReport(
        forget_set=forget,
        retain_set=retain,
        aggregated_terms=terms,
        aggregated_term_labels=labels,
        task_aggregate=task_agg,
        mia=mia,
        mmlu=mmlu_d,
        warnings=warnings,
        meta=dict(meta or {}),
    )


def compare(reports: Iterable[EvalReport | str | Path], names: Sequence[str] | None = None) -> str:
    """The paper's Table 1 layout as Markdown: one row per model.

    Columns: Model | Task Aggregate | MIA score / AUC | MMLU | Aggregate. ``reports`` are
    `EvalReport` objects or paths to report.json files; names default to each report's `name`
    (for a path named report.json, its directory's name).
    """
    items = list(reports)
    if names is not None and len(names) != len(items):
        raise InputError(f"compare: {len(names)} names for {len(items)} reports")
    lines = ["| Model | Task Aggregate | MIA score / AUC | MMLU | Aggregate |", "|---|---|---|---|---|"]
    for i, item in enumerate(items):
        if isinstance(item, EvalReport):
            rep, default = item, item.name
        else:
            p = Path(item)
            rep = EvalReport.load(p)
            default = rep.meta.get("name") or (p.parent.name if p.stem == "report" and p.parent.name else p.stem)
        name = names[i] if names is not None else default
        lines.append(f"| {name} | " + " | ".join(_headline(rep)) + " |")
    return "\n".join(lines) + "\n"
