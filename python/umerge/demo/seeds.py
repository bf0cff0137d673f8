"""`umerge demo --seeds 0-4`: the whole pipeline once per seed, then what the seeds show together.

Each seed runs as `umerge demo --seed K` into ``OUT/seed-K/`` (its own report.md and report.json).
The summary (``OUT/report.json``, ``OUT/report.md``) gives, per model of Table 1 and per headline
score (MIA AUC, Task Aggregate, MMLU, final aggregate), the mean, the sample standard deviation and a
bootstrap 95% interval of the mean over seeds (10,000 resamples of the seeds with replacement,
percentile interval, generator seeded with 0), every seed's value, and the finding sentence of
`umerge.demo.criteria` counted over the seeds. Table 1's forget knowledge and its value after int4
(the quantization probe) are summarised the same way. With ``--compare-methods`` the section
"Unlearning methods compared" is summarised too: per method and variant (the rows present on every
seed) the same statistics of each of its scores, and per criterion on how many seeds it holds of
the seeds where it was decided. With few seeds the bootstrap interval is rough
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
METRICS = {"mia_auc": "MIA AUC", "task_aggregate": "Task Aggregate", "mmlu": "MMLU", "aggregate": "final aggregate",
           "forget_knowledge": "forget knowledge", "forget_knowledge_int4": "forget knowledge after int4"}
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


def _statistics(per_seed: Mapping[int, Any]) -> dict[str, Any]:
    """Mean, sample sd and bootstrap interval of the known values of ``{seed: value or None}``."""
    known = [float(v) for v in per_seed.values() if v is not None]
    entry: dict[str, Any] = {"per_seed": dict(per_seed), "n": len(known)}
    if known:
        entry["mean"] = statistics.fmean(known)
        entry["sd"] = statistics.stdev(known) if len(known) > 1 else None
        entry["ci95"] = list(bootstrap_interval(known))
    return entry


def summarize_comparison(reports: Mapping[int, Mapping[str, Any]]) -> dict[str, Any] | None:
    """The method comparison over seeds, or None unless every seed's report has one.

    Rows are identified by (method, variant) and kept in the first seed's order when present on every
    seed; each gets `_statistics` of every score in `render.COMPARISON_COLUMNS` and, per criterion,
    ``{"held": seeds where it holds, "decided": seeds where it was decided}``."""
    from umerge.demo.render import COMPARISON_COLUMNS

    seeds = sorted(reports)
    if not seeds or not all(reports[s].get("method_comparison") for s in seeds):
        return None
    by_seed = {s: {(r["method"], r["variant"]): r for r in reports[s]["method_comparison"]["rows"]} for s in seeds}
    first = reports[seeds[0]]["method_comparison"]
    keys = [(r["method"], r["variant"]) for r in first["rows"] if all((r["method"], r["variant"]) in by_seed[s]
                                                                     for s in seeds)]
    rows = []
    for key in keys:
        entry: dict[str, Any] = {"method": key[0], "variant": key[1], "scores": {}, "criteria": {}}
        for metric in COMPARISON_COLUMNS:
            entry["scores"][metric] = _statistics({s: by_seed[s][key].get(metric) for s in seeds})
        for crit in by_seed[seeds[0]][key].get("criteria", {}):
            values = [by_seed[s][key].get("criteria", {}).get(crit) for s in seeds]
            decided = [v for v in values if v is not None]
            entry["criteria"][crit] = {"held": sum(bool(v) for v in decided), "decided": len(decided),
                                       "per_seed": dict(zip(seeds, values))}
        rows.append(entry)
    vanilla = {m: _statistics({s: reports[s]["method_comparison"]["vanilla"].get(m) for s in seeds})
               for m in COMPARISON_COLUMNS}
    return {"rows": rows, "vanilla": vanilla, "criteria": first["criteria"], "note": first["note"]}


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
            table[model][key] = _statistics({s: reports[s]["scores"][model].get(key) for s in seeds})
    judged = [reports[s]["findings"]["judgement"] for s in seeds if reports[s]["findings"].get("available")]
    out = {
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
    comparison = summarize_comparison(reports)
    if comparison is not None:
        out["method_comparison"] = comparison
    return out


def _cell(e: Mapping[str, Any]) -> str:
    """``mean ± sd [lo, hi]`` of a `_statistics` entry, as the summary prints it."""
    from umerge.demo.render import fmt

    if e["n"] == 0:
        return "n/a"
    sd = "n/a" if e["sd"] is None else fmt(e["sd"])
    return f"{fmt(e['mean'])} ± {sd} [{fmt(e['ci95'][0])}, {fmt(e['ci95'][1])}]"


def render_comparison(c: Mapping[str, Any], seeds: Sequence[int]) -> list[str]:
    """The summary's "Unlearning methods compared over seeds" section."""
    from umerge.demo.render import COMPARISON_COLUMNS, COMPARISON_CRITERIA, fmt

    L = ["## Unlearning methods compared over seeds", "",
         "Mean ± sample sd [bootstrap 95% interval of the mean over seeds] of each score; each seed's "
         "section in `seed-<k>/report.md`. " + c["note"], "",
         "| Method | Variant | " + " | ".join(COMPARISON_COLUMNS.values()) + " |",
         "|---|---" + "|---" * len(COMPARISON_COLUMNS) + "|"]
    L.append("| vanilla | — | " + " | ".join(_cell(c["vanilla"][k]) for k in COMPARISON_COLUMNS) + " |")
    for row in c["rows"]:
        L.append(f"| {row['method']} | {row['variant']} | "
                 + " | ".join(_cell(row["scores"][k]) for k in COMPARISON_COLUMNS) + " |")
    L += ["", f"Criteria, seeds where each holds of the seeds where it was decided (of {len(seeds)}; "
          "— : does not apply):", "",
          "| Method | Variant | " + " | ".join(COMPARISON_CRITERIA.values()) + " |",
          "|---|---" + "|---" * len(COMPARISON_CRITERIA) + "|"]
    for row in c["rows"]:
        cells = []
        for key in COMPARISON_CRITERIA:
            e = row["criteria"].get(key)
            cells.append("—" if e is None else f"{e['held']} of {e['decided']}")
        L.append(f"| {row['method']} | {row['variant']} | " + " | ".join(cells) + " |")
    L += ["", "Per seed:", "", "| Seed | Method | Variant | " + " | ".join(COMPARISON_COLUMNS.values()) + " |",
          "|---|---|---" + "|---" * len(COMPARISON_COLUMNS) + "|"]
    for s in seeds:
        for row in c["rows"]:
            L.append(f"| {s} | {row['method']} | {row['variant']} | "
                     + " | ".join(fmt(row["scores"][k]["per_seed"][s]) for k in COMPARISON_COLUMNS) + " |")
    L += ["", "Criteria: " + "; ".join(c["criteria"].values()) + ".", ""]
    return L


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
        cells = [_cell(summary["table"][model][key]) for key in summary["metrics"]]
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
    if summary.get("method_comparison"):
        L += render_comparison(summary["method_comparison"], seeds)
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


__all__ = ["parse_seeds", "bootstrap_interval", "summarize", "summarize_comparison", "render", "render_comparison",
           "run_seeds"]
