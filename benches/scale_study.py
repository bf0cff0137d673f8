"""Does merge-based balancing need scale? The demo's pipeline at several model sizes, several seeds each.

    .venv/bin/python benches/scale_study.py -o scale-out                     # sizes xs, s, m; seeds 3, 4, 5
    .venv/bin/python benches/scale_study.py -o scale-out --sizes s m --seeds 3-7 --jobs 2
    .venv/bin/python benches/scale_study.py -o scale-out --report-only       # re-plot finished runs

Each (size, seed) is one `umerge demo --seed K --set ...` in its own process (one torch thread, so
`--jobs 2` fills a 2-core machine), with the analyses off (`--set analyses=false`: Table 1 and the
criteria only, no sweep or method table). A size changes the tiny OLMo's width and depth and grows
the synthetic world with it (more documents per task); everything else is the demo's frozen full
configuration: the unlearning learning rate calibrated at size s on seeds 0-2 is *not* re-tuned per
size, so a size where the presets stop over- or under-forgetting shows the cost of that choice, not a
property of merging. The default seeds are held-out ones (3-5), never used for any calibration.

Writes ``OUT/scale.json`` (every run's scores and criteria, and per size and model the mean, sd and
bootstrap 95% interval over seeds), ``OUT/scale.md`` (the tables) and ``OUT/scale.png`` (MIA AUC
and final aggregate against parameter count, one line per model, bars = the bootstrap interval).
A finished run (its report.json exists) is reused, so an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from umerge.demo.criteria import CRITERIA
from umerge.demo.seeds import bootstrap_interval, parse_seeds

#: Model and world per size. "s" is the demo's own full configuration.
SIZES: dict[str, dict[str, Any]] = {
    "xs": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 96, "docs_per_task": 4},
    "s": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 192, "docs_per_task": 6},
    "m": {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 384, "docs_per_task": 9},
    "l": {"hidden_size": 256, "num_layers": 4, "num_heads": 8, "intermediate_size": 768, "docs_per_task": 12},
}
MODELS = ("vanilla", "model1", "model2", "merge-ties-factorwise", "merge-ties-full")
METRICS = ("mia_auc", "aggregate", "task_aggregate", "mmlu", "forget_regurgitation", "retain_regurgitation")


def demo_command(out: Path, size: str, seed: int) -> list[str]:
    umerge = str(Path(sys.executable).with_name("umerge"))
    cmd = [umerge, "demo", "-o", str(out), "--seed", str(seed), "--quiet", "--overwrite", "--set", "analyses=false"]
    for key, value in SIZES[size].items():
        cmd += ["--set", f"{key}={value}"]
        if key == "docs_per_task":
            cmd += ["--set", f"nonmember_docs_per_task={value}"]
    return cmd


def run_one(out: Path, size: str, seed: int) -> dict[str, Any]:
    run_dir = out / size / f"seed-{seed}"
    if not (run_dir / "report.json").is_file():
        t = time.perf_counter()
        proc = subprocess.run(demo_command(run_dir, size, seed), capture_output=True, text=True)
        if proc.returncode != 0:
            return {"size": size, "seed": seed, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
        print(f"{size} seed {seed}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    rep = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    shutil.rmtree(run_dir / "models", ignore_errors=True)  # keep the reports, not the checkpoints
    shutil.rmtree(run_dir / "runs", ignore_errors=True)
    f = rep["findings"]
    return {
        "size": size, "seed": seed, "parameters": rep["calibration"].get("parameters"),
        "vanilla_calibrated": rep["calibration"].get("passed"), "seconds": rep["timings_s"]["total"],
        "scores": {m: {k: rep["scores"].get(m, {}).get(k) for k in METRICS} for m in MODELS},
        "judgement": f.get("judgement"), "judgement_full_update": f.get("judgement_full_update"),
    }


def summarize(rows: list[dict[str, Any]], sizes: list[str]) -> dict[str, Any]:
    import statistics

    out: dict[str, Any] = {}
    for size in sizes:
        done = [r for r in rows if r["size"] == size and "error" not in r]
        if not done:
            continue
        entry: dict[str, Any] = {"parameters": done[0]["parameters"], "seeds": [r["seed"] for r in done], "models": {}}
        for m in MODELS:
            entry["models"][m] = {}
            for k in ("mia_auc", "aggregate"):
                vals = [r["scores"][m][k] for r in done if r["scores"][m][k] is not None]
                if vals:
                    entry["models"][m][k] = {"mean": statistics.fmean(vals),
                                             "sd": statistics.stdev(vals) if len(vals) > 1 else None,
                                             "ci95": bootstrap_interval(vals), "values": vals}
        for which in ("judgement", "judgement_full_update"):
            entry[which] = {key: sum(1 for r in done if (r.get(which) or {}).get(key)) for key in CRITERIA
                            if any((r.get(which) or {}).get(key) is not None for r in done)}
        entry["n_seeds"] = len(done)
        out[size] = entry
    return out


def markdown(summary: dict[str, Any]) -> str:
    L = ["| size | parameters | model | MIA AUC mean ± sd [95% CI] | aggregate mean ± sd [95% CI] |", "|---|---|---|---|---|"]
    for size, e in summary.items():
        for m in MODELS:
            cells = []
            for k in ("mia_auc", "aggregate"):
                v = e["models"][m].get(k)
                cells.append("n/a" if v is None else f"{v['mean']:.3f} ± {v['sd'] or 0:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]")
            L.append(f"| {size} | {e['parameters']:,} | {m} | {cells[0]} | {cells[1]} |")
    L += ["", "Criteria (umerge.demo.criteria), seeds where each holds, factor-wise merge / full-update merge:", "",
          "| size | seeds | " + " | ".join(CRITERIA) + " |", "|---|---|" + "---|" * len(CRITERIA)]
    for size, e in summary.items():
        cells = [f"{e['judgement'].get(k, '-')} / {e['judgement_full_update'].get(k, '-')}" for k in CRITERIA]
        L.append(f"| {size} | {e['n_seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(L) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "mia_auc", "MIA AUC (0.5 = balanced)"), (axes[1], "aggregate", "final aggregate")):
        for m in MODELS:
            pts = [(e["parameters"], e["models"][m][key]) for e in summary.values() if key in e["models"][m]]
            if not pts:
                continue
            xs = [p for p, _ in pts]
            ys = [v["mean"] for _, v in pts]
            err = [[v["mean"] - v["ci95"][0] for _, v in pts], [v["ci95"][1] - v["mean"] for _, v in pts]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=m)
        if key == "mia_auc":
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_title(title)
    axes[1].legend(fontsize=8)
    fig.suptitle("The demo pipeline by model size (mean over seeds, bootstrap 95% interval)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--sizes", nargs="+", default=["xs", "s", "m"], choices=list(SIZES))
    ap.add_argument("--seeds", default="3-5")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--report-only", action="store_true", help="Only summarise runs that have finished.")
    args = ap.parse_args()
    seeds = parse_seeds(args.seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    todo = [(size, seed) for size in args.sizes for seed in seeds]
    if args.report_only:
        todo = [(s, k) for s, k in todo if (args.out / s / f"seed-{k}" / "report.json").is_file()]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(lambda job: run_one(args.out, *job), todo))
    summary = summarize(rows, args.sizes)
    result = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "sizes": {s: SIZES[s] for s in args.sizes},
              "seeds": seeds, "runs": rows, "summary": summary, "wall_s": round(time.perf_counter() - t0, 1)}
    (args.out / "scale.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (args.out / "scale.md").write_text(markdown(summary), encoding="utf-8")
    plot(summary, args.out / "scale.png")
    for r in rows:
        if "error" in r:
            print(f"{r['size']} seed {r['seed']}: FAILED: {r['error']}", file=sys.stderr)
    print(markdown(summary))
    print(f"wrote {args.out / 'scale.json'}, scale.md, scale.png")


if __name__ == "__main__":
    main()
