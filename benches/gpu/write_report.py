"""Write OUT/gpu-report.json and OUT/gpu-report.md from what `benches/gpu/reproduce.sh` left in OUT.

    python benches/gpu/write_report.py OUT --size gpu --subset 32 --lume DIR

Reads ``steps.tsv`` (wall time and exit status of each step), ``checks/*.json`` (one
batched-generation check per model, from `check_batched_generation.py`), ``nvidia-smi.txt`` when
there is one, ``demo-command.txt`` and the demo's ``report.json`` (``--demo-dir``) (its stage timings, the
calibration, the scores of the checked models); the software versions are read here. Nothing is
recomputed: the report only gathers, so every number in it can be traced to a file beside it.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
from pathlib import Path
from typing import Any

FORMAT = "umerge-gpu-report/1"


def environment() -> dict[str, Any]:
    """Python, torch, CUDA, cuDNN, transformers and peft versions, and the GPU torch sees."""
    import peft
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "cuda_available": cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "bf16_supported": bool(torch.cuda.is_bf16_supported()) if cuda else None,
    }


def gather(out: Path, demo_dir: Path, size: str, subset: int, lume: str) -> dict[str, Any]:
    with (out / "steps.tsv").open(newline="", encoding="utf-8") as fh:
        steps = [{"step": r["step"], "seconds": float(r["seconds"]), "rc": int(r["rc"])}
                 for r in csv.DictReader(fh, delimiter="\t")]
    # in the order they ran
    paths = sorted((out / "checks").glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
    checks = {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in paths}
    smi = out / "nvidia-smi.txt"
    cmd = out / "demo-command.txt"
    demo_report = demo_dir / "report.json"
    demo: dict[str, Any] | None = None
    if demo_report.is_file():
        d = json.loads(demo_report.read_text(encoding="utf-8"))
        demo = {
            "report": str(demo_report),
            "config": d.get("config"),
            "data": d.get("data"),
            "calibration_passed": (d.get("calibration") or {}).get("passed"),
            "timings_s": d.get("timings_s"),
            "scores": {n: (d.get("scores") or {}).get(n) for n in checks},
        }
    return {
        "format": FORMAT,
        "size": size,
        "subset": subset,
        "lume": lume,
        "demo_command": cmd.read_text(encoding="utf-8").strip() if cmd.is_file() else None,
        "environment": environment(),
        "nvidia_smi": smi.read_text(encoding="utf-8") if smi.is_file() else None,
        "steps": steps,
        "batched_check": {
            "passed": bool(checks) and all(c["all_equal"] for c in checks.values()),
            "models": {n: {k: c[k] for k in ("n", "n_equal", "all_equal", "batch_size", "max_new_tokens", "device",
                                             "dtype", "seconds_batched", "seconds_single", "truncated_prompts")}
                       for n, c in checks.items()},
        },
        "demo": demo,
    }


def _fmt(v: Any) -> str:
    return "n/a" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def to_markdown(r: dict[str, Any]) -> str:
    env = r["environment"]
    bc = r["batched_check"]
    lines = [
        "# GPU recipe report",
        "",
        f"SIZE={r['size']}, SUBSET={r['subset']}, LUME={r['lume']}",
        "",
        f"Demo command: `{r['demo_command']}`",
        "",
        "## Batched-generation check",
        "",
        f"**{'PASSED' if bc['passed'] else 'FAILED'}**: greedy generation with the batch size below "
        "against one prompt at a time, same model, same prompts, texts compared exactly.",
        "",
        "| Model | Equal | Batch size | New tokens | Device | Dtype | Batched (s) | One at a time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, c in bc["models"].items():
        lines.append(f"| {name} | {c['n_equal']}/{c['n']} | {c['batch_size']} | {c['max_new_tokens']} | {c['device']} "
                     f"| {c['dtype']} | {c['seconds_batched']:.1f} | {c['seconds_single']:.1f} |")
    lines += ["", "Differing prompts, if any, are listed in checks/MODEL.json (`mismatches`).", "",
              "## Wall times", "", "| Step | Seconds | Exit |", "|---|---|---|"]
    lines += [f"| {s['step']} | {s['seconds']:.1f} | {s['rc']} |" for s in r["steps"]]
    demo = r["demo"]
    if demo is not None:
        lines += ["", "Demo stages (from the demo's report.json):", "", "| Stage | Seconds |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in (demo["timings_s"] or {}).items()]
        lines += ["", "## Scores of the checked models (the demo's report.json)", "",
                  f"Vanilla calibration (memorisation target) passed: {_fmt(demo['calibration_passed'])}", ""]
        keys = sorted({k for s in demo["scores"].values() if s for k, v in s.items() if isinstance(v, (int, float))})
        if keys:
            lines += ["| Model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
            for name, s in demo["scores"].items():
                lines.append(f"| {name} | " + " | ".join(_fmt((s or {}).get(k)) for k in keys) + " |")
    lines += ["", "## Environment", ""]
    lines += [f"- {k}: {_fmt(v)}" for k, v in env.items()]
    lines += ["", "nvidia-smi:", ""]
    lines += ["```", r["nvidia_smi"].rstrip(), "```"] if r["nvidia_smi"] else ["(not present on this machine)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="the OUT_DIR of reproduce.sh")
    p.add_argument("--demo-dir", type=Path, required=True, help="the demo's output directory")
    p.add_argument("--size", required=True)
    p.add_argument("--subset", type=int, required=True)
    p.add_argument("--lume", required=True)
    args = p.parse_args(argv)
    report = gather(args.out, args.demo_dir, args.size, args.subset, args.lume)
    (args.out / "gpu-report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (args.out / "gpu-report.md").write_text(to_markdown(report), encoding="utf-8")
    print(f"batched check {'PASSED' if report['batched_check']['passed'] else 'FAILED'}: "
          + ", ".join(f"{n} {c['n_equal']}/{c['n']}" for n, c in report["batched_check"]["models"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
