"""Reliability figures for the README: bad inputs, kill points, determinism, disk full, inputs
changed while mapped, fuzzing.

    .venv/bin/python benches/reliability.py                  # everything, fuzzing 60 s per target
    .venv/bin/python benches/reliability.py --fuzz-seconds 0 # skip libFuzzer (replay the corpus only)
    .venv/bin/python benches/reliability.py --json out.json  # also write the figures as JSON

What each section does (all through the real `umerge` command, as a user would run it):

1. Bad inputs: every case of the catalogue in tests/test_reliability_inputs.py, on a fresh copy
   of a synthetic family; prints the one-line error each gives and whether every promise held
   (exit 2, one `umerge: error:` line naming the problem, no output, nothing left beside it,
   inputs unchanged).
2. Kill points: an uninterrupted reference merge is timed, then the same merge (same target,
   --overwrite) is SIGKILLed at N moments spread over that time; after each kill the target must
   be absent or byte-identical to the reference. A final run must clean every stale temporary
   directory.
3. Determinism: the same merge with 1 and 2 threads and memory budgets of 16 MiB and 512 MiB;
   sha256 of every output shard.
4. Disk full: a 2 MiB tmpfs (when this process may mount one, else the engine's injected write
   limit), the error line and what is left on it.
5. Inputs changed while mapped: a shard truncated, or rewritten in place, by the progress
   callback in the middle of a merge; the exit and the message (never SIGBUS).
6. Fuzzing: each cargo-fuzz target run for --fuzz-seconds with libFuzzer (stable Rust with
   RUSTC_BOOTSTRAP=1), executions and crashes; then the corpus and regression replay in the
   ordinary test suite (`cargo test -p umerge-core --test fuzz_regressions`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "python"))

from conftest import run_umerge, umerge_command  # noqa: E402
from test_reliability_crash import CHANGE_WHILE_MAPPED, KILL_SHAPE, _try_mount_tmpfs  # noqa: E402
from test_reliability_inputs import CASES, run_case  # noqa: E402
from umerge.synthetic import CheckpointSpec, LlamaShape, make_family  # noqa: E402

FUZZ_DIR = REPO / "rust" / "umerge-core" / "fuzz"
FUZZ_TARGETS = ["safetensors_header", "shard_index", "planner"]


def scratch(name: str) -> Path:
    root = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    d = root / f"umerge-reliability-{os.getpid()}" / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


def short(line: str, tmp: Path) -> str:
    line = line.replace(str(tmp), "…")
    line = re.sub(r"/tmp/[^ )]*?/(models|small|elsewhere)/", r"…/\1/", line)
    return line if len(line) <= 240 else line[:237] + "..."


def bad_inputs() -> dict[str, Any]:
    rows = []
    for i, case in enumerate(CASES):
        tmp = scratch(f"bad-{i}")
        code, line, problems = run_case(case, tmp)
        rows.append({"kind": case.name, "exit": code, "error": short(line.removeprefix("umerge: error: "), tmp),
                     "ok": not problems, "problems": problems})
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n## Bad inputs: {len(rows)} kinds, {sum(r['ok'] for r in rows)} refused cleanly\n")
    print("| # | bad input | exit | error (one line on stderr) | promises held |")
    print("|---|---|---|---|---|")
    for i, r in enumerate(rows, 1):
        err = r["error"].replace("|", "\\|")
        print(f"| {i} | {r['kind']} | {r['exit']} | `{err}` | {'yes' if r['ok'] else 'NO: ' + '; '.join(r['problems'])} |")
    return {"kinds": len(rows), "clean": sum(r["ok"] for r in rows), "rows": rows}


def digest_tree(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def kill_points(n: int) -> dict[str, Any]:
    root = scratch("kill")
    base, fts = make_family(root / "models", CheckpointSpec(KILL_SHAPE, dtype="BF16", shards=3, seed=3), 2)

    def args(out: Path) -> list[str]:
        return ["ties", *map(str, fts), "--base", str(base), "--density", "0.8", "-o", str(out),
                "--threads", "1", "--quiet", "--overwrite"]

    t0 = time.monotonic()
    r = run_umerge(args(root / "reference"))
    t_ref = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    expected = digest_tree(root / "reference")
    parent = root / "targets"
    parent.mkdir()
    target = parent / "merged"
    env = {"PYTHONPATH": str(REPO / "python"), **os.environ}
    outcomes = []
    for i in range(n):
        # From just after the start to 1.3x the reference time, so that some runs finish first
        # (and later kills hit an --overwrite of a complete output).
        at = t_ref * (0.02 + 1.28 * i / max(n - 1, 1))
        proc = subprocess.Popen([*umerge_command(), *args(target)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(at)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed = proc.returncode == -signal.SIGKILL
        if not target.exists():
            state = "absent"
        elif digest_tree(target) == expected:
            state = "complete"
        else:
            state = "PARTIAL"
        # Killed while writing: its own temporary directory is left (the next run removes it).
        writing = any(p.name.endswith(f"-{proc.pid}") for p in parent.iterdir() if p.name.startswith(".umerge"))
        outcomes.append({"at_s": round(at, 3), "killed": killed, "target": state, "while_writing": writing})
    stale_before = sorted(p.name for p in parent.iterdir() if p.name.startswith(".umerge"))
    r = run_umerge(args(target))
    final_ok = r.returncode == 0 and digest_tree(target) == expected
    stale_after = sorted(p.name for p in parent.iterdir() if p.name.startswith(".umerge"))
    killed = sum(o["killed"] for o in outcomes)
    partial = sum(o["target"] == "PARTIAL" for o in outcomes)
    print(f"\n## Kill points: {killed} SIGKILLs over a {t_ref:.2f} s merge "
          f"(15 M parameters, bf16, 3 shards, --threads 1, same target with --overwrite)\n")
    print("| kill at (s) | killed | phase | target after the kill |")
    print("|---|---|---|---|")
    for o in outcomes:
        phase = "writing the output" if o["while_writing"] else ("start-up / reading / planning" if o["killed"] else "-")
        print(f"| {o['at_s']:.2f} | {'yes' if o['killed'] else 'finished first'} | {phase} | {o['target']} |")
    print(f"\nkilled while writing the output: {sum(o['while_writing'] for o in outcomes)}; "
          f"partial outputs: {partial}; absent: {sum(o['target'] == 'absent' for o in outcomes)}; "
          f"complete: {sum(o['target'] == 'complete' for o in outcomes)}")
    print(f"stale temporary directories before the next run: {len(stale_before)}, after it: {len(stale_after)}; "
          f"next run output identical to the reference: {final_ok}")
    shutil.rmtree(root, ignore_errors=True)
    return {"reference_s": t_ref, "kills": killed, "partial_outputs": partial, "outcomes": outcomes,
            "stale_before_next_run": len(stale_before), "stale_after_next_run": len(stale_after),
            "next_run_ok": final_ok}


def determinism() -> dict[str, Any]:
    root = scratch("det")
    shape = LlamaShape(hidden=256, intermediate=688, layers=4, heads=4, kv_heads=2, vocab=3000)
    base, fts = make_family(root / "models", CheckpointSpec(shape, dtype="BF16", shards=2, seed=8), 3)
    runs = {}
    for preset in ("mergekit", "paper"):
        for threads in (1, 2):
            for budget in ("16MiB", "512MiB"):
                out = root / f"{preset}-t{threads}-{budget}"
                r = run_umerge(["ties", *fts, "--base", base, "--density", "0.5", "--preset", preset, "-o", out,
                                "--threads", threads, "--memory-budget", budget, "--max-shard-size", "8MB", "--quiet"])
                assert r.returncode == 0, r.stderr
                runs[(preset, threads, budget)] = {k: v for k, v in digest_tree(out).items() if k.endswith(".safetensors")}
    print(f"\n## Determinism: {shape.n_params():,}-parameter bf16 models x 3, --max-shard-size 8MB\n")
    print("| preset | threads | memory budget | shards | sha256 of the first shard | same bytes as threads 1 / 16MiB |")
    print("|---|---|---|---|---|---|")
    same_all = True
    for (preset, threads, budget), d in runs.items():
        ref = runs[(preset, 1, "16MiB")]
        same = d == ref
        same_all &= same
        print(f"| {preset} | {threads} | {budget} | {len(d)} | {next(iter(d.values()))[:16]}… | {'yes' if same else 'NO'} |")
    shutil.rmtree(root, ignore_errors=True)
    return {"identical": same_all, "runs": len(runs)}


def disk_full() -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="umerge-diskfull-"))
    shape = LlamaShape(hidden=128, intermediate=352, layers=4, heads=4, kv_heads=2, vocab=2000)
    base, fts = make_family(root / "models", CheckpointSpec(shape, "F32", shards=2, seed=4), 2)
    small = root / "small"
    small.mkdir()
    mounted = _try_mount_tmpfs(small, "2m")
    env = {} if mounted else {"UMERGE_TEST_WRITE_LIMIT": str(2 * 2**20)}
    try:
        t0 = time.monotonic()
        r = run_umerge(["ties", *fts, "--base", base, "--density", "0.5", "-o", small / "merged", "--quiet"], env=env)
        dt = time.monotonic() - t0
        left = sorted(p.name for p in small.iterdir())
    finally:
        if mounted:
            subprocess.run(["umount", str(small)], check=False)
    how = "a 2 MiB tmpfs" if mounted else "an injected 2 MiB write limit (UMERGE_TEST_WRITE_LIMIT)"
    line = short(r.stderr.strip(), root)
    print(f"\n## Disk full ({how}; the output needs {shape.n_params() * 4 / 2**20:.1f} MiB)\n")
    print(f"exit {r.returncode} after {dt:.2f} s: `{line}`; left on the filesystem: {left or 'nothing'}")
    shutil.rmtree(root, ignore_errors=True)
    return {"how": how, "exit": r.returncode, "error": line, "left": left}


def changed_while_mapped() -> dict[str, Any]:
    out: dict[str, Any] = {}
    print("\n## Input changed while mapped (by the progress callback, mid-merge)\n")
    print("| change | exit | message | SIGBUS |")
    print("|---|---|---|---|")
    for mode in ("truncate", "rewrite"):
        root = scratch(f"mapped-{mode}")
        shape = LlamaShape(hidden=128, intermediate=352, layers=4, heads=4, kv_heads=2, vocab=2000)
        base, fts = make_family(root / "models", CheckpointSpec(shape, "F32", shards=3, seed=6), 2)
        victim = fts[1] / "model-00003-of-00003.safetensors"
        env = {"PYTHONPATH": str(REPO / "python"), **os.environ}
        r = subprocess.run([sys.executable, "-c", CHANGE_WHILE_MAPPED, mode, str(victim), str(base), str(root / "merged"),
                            *map(str, fts)], capture_output=True, text=True, env=env, timeout=300)
        msg = short(r.stdout.strip().removeprefix("ERROR "), root)
        sigbus = r.returncode == -signal.SIGBUS
        print(f"| {mode} | {r.returncode} | `{msg}` | {'YES' if sigbus else 'no'} |")
        out[mode] = {"exit": r.returncode, "message": msg, "sigbus": sigbus}
        shutil.rmtree(root, ignore_errors=True)
    return out


def fuzz(seconds: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    have = shutil.which("cargo-fuzz") or (Path.home() / ".cargo" / "bin" / "cargo-fuzz").exists()
    print(f"\n## Fuzzing ({seconds} s per target with libFuzzer)\n" if seconds and have else "\n## Fuzzing\n")
    if seconds and have:
        print("| target | executions | crashes | new corpus inputs |")
        print("|---|---|---|---|")
        env = {**os.environ, "RUSTC_BOOTSTRAP": "1"}
        for t in FUZZ_TARGETS:
            work = Path(tempfile.mkdtemp(prefix=f"umerge-fuzz-{t}-"))
            cmd = ["cargo", "fuzz", "run", "-O", t, str(work), str(FUZZ_DIR / "corpus" / t), "--",
                   f"-max_total_time={seconds}", "-print_final_stats=1", "-rss_limit_mb=4096", "-timeout=30"]
            r = subprocess.run(cmd, cwd=FUZZ_DIR, capture_output=True, text=True, env=env)
            m = re.search(r"stat::number_of_executed_units:\s*(\d+)", r.stderr)
            execs = int(m.group(1)) if m else 0
            crashes = len(re.findall(r"Test unit written to .*(crash|timeout|oom)-", r.stderr))
            corpus = len(list(work.iterdir()))
            results[t] = {"executions": execs, "crashes": crashes, "exit": r.returncode}
            print(f"| {t} | {execs:,} | {crashes} | {corpus} |")
            if r.returncode != 0 and crashes == 0:
                print(f"  (cargo fuzz exited {r.returncode}: {r.stderr.strip().splitlines()[-1:]})")
            shutil.rmtree(work, ignore_errors=True)
    r = subprocess.run(["cargo", "test", "-q", "-p", "umerge-core", "--test", "fuzz_regressions"], cwd=REPO,
                       capture_output=True, text=True)
    m = re.search(r"test result: (\w+)\. (\d+) passed; (\d+) failed", r.stdout)
    regressions = sorted(p.name for t in FUZZ_TARGETS for p in (FUZZ_DIR / "regressions" / t).glob("*"))
    corpus_files = sum(len(list((FUZZ_DIR / "corpus" / t).glob("*"))) for t in FUZZ_TARGETS)
    print(f"\ncorpus replay + proptest budget (cargo test --test fuzz_regressions): "
          f"{m.group(0) if m else r.stdout[-300:]}; committed corpus {corpus_files} files; "
          f"regression inputs from crashes: {len(regressions)} {regressions}")
    results["replay"] = {"ok": r.returncode == 0, "corpus_files": corpus_files, "regressions": regressions}
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kill-points", type=int, default=30)
    ap.add_argument("--fuzz-seconds", type=int, default=60)
    ap.add_argument("--only", nargs="*", default=None,
                    help="sections to run: bad kill det disk mapped fuzz (default: all)")
    ap.add_argument("--json", type=Path, default=None, help="also write every figure as JSON here")
    a = ap.parse_args()
    want = set(a.only or ["bad", "kill", "det", "disk", "mapped", "fuzz"])
    figures: dict[str, Any] = {}
    t0 = time.monotonic()
    if "bad" in want:
        figures["bad_inputs"] = bad_inputs()
    if "kill" in want:
        figures["kill_points"] = kill_points(a.kill_points)
    if "det" in want:
        figures["determinism"] = determinism()
    if "disk" in want:
        figures["disk_full"] = disk_full()
    if "mapped" in want:
        figures["changed_while_mapped"] = changed_while_mapped()
    if "fuzz" in want:
        figures["fuzz"] = fuzz(a.fuzz_seconds)
    shutil.rmtree(Path("/dev/shm") / f"umerge-reliability-{os.getpid()}", ignore_errors=True)
    print(f"\n(total {time.monotonic() - t0:.0f} s)")
    if a.json:
        a.json.write_text(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()
