"""Calibrate the demo's unlearning learning rate on calibration seeds, judged by the fixed criteria.

    .venv/bin/python benches/demo_calibration.py --seeds 0-2 --lr 3e-3 5e-3 1e-2 -o calib/ [--jobs 2]

Runs the full demo (`umerge demo`, full mode) once per (learning rate, seed) with only the demo's
unlearning learning rate changed (the presets' loss weights and batch sizes stay the paper's), each in
its own process (one torch thread each, so `--jobs 2` uses both cores of a 2-core machine), and
writes ``calib/calibration.json`` and ``calib/calibration.md``: per run, the criteria of
`umerge.demo.criteria` and the numbers they were decided on, and per learning rate the criteria
counted over the seeds.

The aim the settings are judged against (fixed before the runs): model1 over-forgets while keeping
retain regurgitation near vanilla's; model2 unlearns partly (forget regurgitation well below
vanilla's, AUC above 0.5). The held-out seeds are not run here: `umerge demo --seeds 3-7` with the
chosen setting frozen in `umerge.demo.config`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from umerge.demo.seeds import parse_seeds

RUN_ONE = """
import json, sys
from umerge.demo.config import config_for
from umerge.demo.pipeline import DemoOptions, run_demo
out, seed, lr = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
cfg = config_for(False, seed)
cfg.unlearn_overrides = {**cfg.unlearn_overrides, "lr": lr}
run_demo(DemoOptions(out=out, seed=seed, progress=False, config=cfg))
"""


def run(out: Path, seed: int, lr: float) -> dict:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RUN_ONE, str(out), str(seed), repr(lr)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"seed": seed, "lr": lr, "error": proc.stderr.strip().splitlines()[-1:]}
    rep = json.loads((out / "report.json").read_text())
    s, f = rep["scores"], rep["findings"]
    row = {"seed": seed, "lr": lr, "seconds": round(time.perf_counter() - t, 1), "judgement": f.get("judgement")}
    for name in ("vanilla", "model1", "model2", "merge-ties-factorwise"):
        row[name] = {k: s[name].get(k) for k in ("mia_auc", "aggregate", "forget_regurgitation", "retain_regurgitation")}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0-2")
    ap.add_argument("--lr", type=float, nargs="+", default=[3e-3, 5e-3, 1e-2])
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    seeds = parse_seeds(args.seeds)
    jobs = [(args.out / f"lr-{lr:g}" / f"seed-{s}", s, lr) for lr in args.lr for s in seeds]
    if any(p.exists() for p, _, _ in jobs):
        sys.exit(f"{args.out}: runs already there; choose another -o")
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda j: run(*j), jobs))
    (args.out / "calibration.json").write_text(json.dumps(rows, indent=2) + "\n")
    keys = ("model1_over_forgets", "model2_under_forgets", "model2_did_not_unlearn", "merge_balanced",
            "merge_beats_parents")
    lines = [f"Command: .venv/bin/python benches/demo_calibration.py --seeds {args.seeds} --lr "
             f"{' '.join(f'{x:g}' for x in args.lr)} -o {args.out}", "",
             "| lr | seed | AUC model1 / model2 / merge | forget reg. model1 / model2 (vanilla) | retain reg. model1 / "
             "model2 (vanilla) | aggregate model1 / model2 / merge | " + " | ".join(keys) + " |",
             "|---" * (6 + len(keys)) + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['lr']:g} | {r['seed']} | error: {r['error']} |")
            continue
        v, a, b, m, j = r["vanilla"], r["model1"], r["model2"], r["merge-ties-factorwise"], r["judgement"] or {}
        lines.append(
            f"| {r['lr']:g} | {r['seed']} | {a['mia_auc']:.3f} / {b['mia_auc']:.3f} / {m['mia_auc']:.3f} | "
            f"{a['forget_regurgitation']:.3f} / {b['forget_regurgitation']:.3f} ({v['forget_regurgitation']:.3f}) | "
            f"{a['retain_regurgitation']:.3f} / {b['retain_regurgitation']:.3f} ({v['retain_regurgitation']:.3f}) | "
            f"{a['aggregate']:.3f} / {b['aggregate']:.3f} / {m['aggregate']:.3f} | "
            + " | ".join("yes" if j.get(k) else "no" for k in keys) + " |")
    (args.out / "calibration.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
