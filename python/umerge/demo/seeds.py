"""`umerge demo --seeds 0-4`: the whole pipeline once per seed, then what the seeds show together.

Each seed runs as `umerge demo --seed K` into ``OUT/seed-K/`` (its own report.md and report.json).
The summary (``OUT/report.json``, ``OUT/report.md``) gives, per model of Table 1 and per headline
score (MIA AUC, Task Aggregate, MMLU, final aggregate), the mean, the sample standard deviation and a
bootstrap 95% interval of the mean over seeds (10,000 resamples of the seeds with replacement,
percentile interval, generator seeded with 0), every seed's value, and the finding sentence of
`umerge.demo.criteria` counted over the seeds. With few seeds the bootstrap interval is rough
(five seeds have only 126 distinct resamples); it is reported as such, not as a test.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from umerge.errors import InputError

FORMAT = "umerge-demo-seeds/1"
METRICS = {"mia_auc": "MIA AUC", "task_aggregate": "Task Aggregate", "mmlu": "MMLU", "aggregate": "final aggregate"}
BOOTSTRAP_RESAMPLES = 10_000


def parse_seeds(text: str) -> list[int]:
    """``"0-4"`` (inclusive range), ``"3,5,9"``, or a mix (``"0-2,7"``) -> distinct seeds in order."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise InputError(f"--seeds {text!r}: expected a range (0-4), a list (0,2,5) or both (0-2,7)")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise InputError(f"--seeds {text!r}: the range {part} runs backwards")
        seeds += [s for s in range(lo, hi + 1) if s not in seeds]
    if not seeds:
        raise InputError("--seeds needs at least one seed")
    return seeds


def bootstrap_interval(values: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile 95% interval of the mean of `values` over resamples with replacement."""
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values to bootstrap")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def summarize(reports: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """The multi-seed summary of per-seed demo reports ``{seed: report.json object}``."""
    from umerge.demo.criteria import CRITERIA, finding_sentence

    if not reports:
        raise InputError("no seed reports to summarise")
    seeds = sorted(reports)
    models = [m for m in reports[seeds[0]]["table1"] if all(m in reports[s]["scores"] for s in seeds)]
    table: dict[str, dict[str, Any]] = {}
    for model in models:
        table[model] = {}
        for key in METRICS:
            values = [reports[s]["scores"][model].get(key) for s in seeds]
            known = [float(v) for v in values if v is not None]
            entry: dict[str, Any] = {"per_seed": dict(zip(seeds, values)), "n": len(known)}
            if known:
                entry["mean"] = statistics.fmean(known)
                entry["sd"] = statistics.stdev(known) if len(known) > 1 else None
                entry["ci95"] = list(bootstrap_interval(known))
            table[model][key] = entry
    judged = [reports[s]["findings"]["judgement"] for s in seeds if reports[s]["findings"].get("available")]
    return {
        "format": FORMAT,
        "seeds": seeds,
        "models": models,
        "metrics": METRICS,
        "table": table,
        "criteria": CRITERIA,
        "judgements": {s: reports[s]["findings"].get("judgement") for s in seeds},
        "sentence": finding_sentence(judged),
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": 0, "interval": "percentile, 95%"},
    }


def render(summary: Mapping[str, Any], command: str) -> str:
    """report.md of a multi-seed run, formatted from the summary alone."""
    from umerge.demo.render import DISPLAY, fmt

    seeds = summary["seeds"]
    L = ["# umerge demo over seeds", "", f"Reproduce with `{command}`; seeds {', '.join(map(str, seeds))}; each "
         "seed's own report is in `seed-<k>/report.md`.", "", "## Finding", "", summary["sentence"], ""]
    L += ["## Table 1 over seeds", "",
          "Mean ± sample sd [bootstrap 95% interval of the mean over seeds] of each model's score.", "",
          "| Model | " + " | ".join(summary["metrics"].values()) + " |", "|---" * (1 + len(summary["metrics"])) + "|"]
    for model in summary["models"]:
        cells = []
        for key in summary["metrics"]:
            e = summary["table"][model][key]
            if e["n"] == 0:
                cells.append("n/a")
                continue
            sd = "n/a" if e["sd"] is None else fmt(e["sd"])
            cells.append(f"{fmt(e['mean'])} ± {sd} [{fmt(e['ci95'][0])}, {fmt(e['ci95'][1])}]")
        L.append(f"| {DISPLAY.get(model, model).replace(', density {d}', '')} | " + " | ".join(cells) + " |")
    L += ["", "## Per seed", "", "| Seed | Model | " + " | ".join(summary["metrics"].values()) + " |",
          "|---|---" + "|---" * len(summary["metrics"]) + "|"]
    for s in seeds:
        for model in summary["models"]:
            vals = [fmt(summary["table"][model][k]["per_seed"][s]) for k in summary["metrics"]]
            L.append(f"| {s} | {model} | " + " | ".join(vals) + " |")
    L += ["", "## Criteria per seed", "", "| Seed | " + " | ".join(summary["criteria"]) + " |",
          "|---" * (1 + len(summary["criteria"])) + "|"]
    for s in seeds:
        j = summary["judgements"][s] or {}
        L.append(f"| {s} | " + " | ".join("n/a" if j.get(k) is None else ("yes" if j[k] else "no")
                                          for k in summary["criteria"]) + " |")
    L += ["", "Criteria: " + "; ".join(f"`{k}`: {v}" for k, v in summary["criteria"].items()) + ".", ""]
    return "\n".join(L)


def run_seeds(opts: Any, seeds: Sequence[int], run_one: Callable[[Any], Path] | None = None) -> Path:
    """Run the demo once per seed into OUT/seed-K/, then write the summary; return OUT/report.md."""
    from umerge.demo import pipeline

    run = run_one or pipeline.run_demo
    out = Path(opts.out)
    pipeline.prepare_out(out, opts.overwrite)
    reports = {}
    for seed in seeds:
        run(replace(opts, out=out / f"seed-{seed}", seed=seed, overwrite=False))
        reports[seed] = json.loads((out / f"seed-{seed}" / "report.json").read_text(encoding="utf-8"))
    summary = summarize(reports)
    command = opts.command().replace(f"--seed {opts.seed}", f"--seeds {','.join(map(str, seeds))}")
    summary["command"] = command
    (out / "report.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    md = out / "report.md"
    md.write_text(render(summary, command), encoding="utf-8")
    return md


__all__ = ["parse_seeds", "bootstrap_interval", "summarize", "render", "run_seeds"]
