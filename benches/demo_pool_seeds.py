"""Summarise per-seed demo runs made by several `umerge demo --seeds` commands as one multi-seed run.

    .venv/bin/python benches/demo_pool_seeds.py -o pooled/ runs-3-5/ runs-6-9/

Reads every ``seed-K/report.json`` under the given directories (each seed once) and writes
``pooled/report.json`` and ``pooled/report.md`` with `umerge.demo.seeds.summarize` and `render`:
the same summary `umerge demo --seeds` writes. A seed's run does not depend on the other seeds of
its command (each seeds its own world, model and training), so on one machine the pooled summary
equals the one a single `--seeds` command over all those seeds would write; the commands of the
pooled runs are listed in the summary's "pooled_from".
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from umerge.demo.seeds import render, summarize


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="directories written by `umerge demo --seeds`")
    ap.add_argument("-o", "--out", type=Path, required=True)
    args = ap.parse_args(argv)
    reports: dict[int, dict] = {}
    commands = []
    for run in args.runs:
        summary = run / "report.json"
        if summary.is_file():
            commands.append(json.loads(summary.read_text(encoding="utf-8")).get("command"))
        for seed_dir in sorted(run.glob("seed-*")):
            m = re.fullmatch(r"seed-(\d+)", seed_dir.name)
            rep = seed_dir / "report.json"
            if not m or not rep.is_file():
                continue
            seed = int(m.group(1))
            if seed in reports:
                print(f"seed {seed} appears twice ({seed_dir})", file=sys.stderr)
                return 2
            reports[seed] = json.loads(rep.read_text(encoding="utf-8"))
    if not reports:
        print("no seed-K/report.json found", file=sys.stderr)
        return 2
    summary = summarize(reports)
    command = f"benches/demo_pool_seeds.py -o {args.out} " + " ".join(map(str, args.runs))
    summary["command"], summary["pooled_from"] = command, commands
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    (args.out / "report.md").write_text(render(summary, "; ".join(c for c in commands if c)), encoding="utf-8")
    print(f"report: {args.out / 'report.md'} (seeds {', '.join(map(str, sorted(reports)))})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
