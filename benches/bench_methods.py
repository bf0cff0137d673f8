"""Benchmark: the paper's Table 2 methods, umerge against mergekit, on TinyLlama-1.1B bf16 shapes.

For each of linear, dare_linear, dare_ties, magnitude_prune and ties, one mergekit YAML config is
written and run through both tools in the same run, each in a fresh child process with a warm
page cache: `umerge run CONFIG.yml` and `mergekit-yaml CONFIG.yml` (-j 2). magnitude_prune is
mergekit's `breadcrumbs` with `gamma: 0` (mergekit has no method of that name; with gamma 0 it
keeps exactly the top-density magnitudes; `umerge run` runs it as its `breadcrumbs`, which with
gamma 0 is its `magnitude_prune`). DARE runs
with mergekit's defaults (L1 rescale), so both tools do the same work. Reports wall time, CPU time
(user + system), peak RSS (wait4) and the speed-up, as a Markdown table.

    .venv/bin/python benches/bench_methods.py                       # all five methods
    .venv/bin/python benches/bench_methods.py --methods linear ties # a subset
    .venv/bin/python benches/bench_methods.py --methods della_linear --skip-mergekit
    .venv/bin/python benches/bench_methods.py --methods nuslerp multislerp karcher nearswap
    .venv/bin/python benches/bench_methods.py --methods passthrough     # a frankenmerge (copies)
    .venv/bin/python benches/bench_methods.py --methods sce arcee_fusion ram
    sudo .venv/bin/python benches/bench_methods.py --cold   # page cache dropped before each tool

Each umerge run is also compared with the disk's floor for that job, measured in the same run
(benches/disk.py): warm, the O_DIRECT write + fsync of the output's size; --cold, that plus the
O_DIRECT read of every input the method reads, with the bytes read from storage over that size.

Inputs: the base and two fine-tuned checkpoints of benches/bench_ties.py (generated once under
--dir, default ./bench-out, and reused). Needs the peer venv (benches/make_peer_venv.sh) for
mergekit; without it only umerge is timed. A benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import disk  # noqa: E402
from bench_ties import (  # noqa: E402
    FloorCells,
    _human_bytes,
    _load,
    dir_bytes,
    disk_floor,
    ensure_family,
    machine,
    peer_venv,
    start_state,
    umerge_executable,
)
from measure import Measurement, run_measured  # noqa: E402

TABLE2 = ("linear", "dare_linear", "dare_ties", "magnitude_prune", "ties")
#: Also available with --methods (not in the paper's table): mergekit's defaults (epsilon 0.15, L1 rescale);
#: the spherical methods, nearswap, sce, arcee_fusion and ram (`SPHERICAL`), model_stock filter-wise and ties
#: without normalize.
#: `passthrough` is a frankenmerge: the first two thirds of ft1's layers, then the last two thirds of
#: ft2's (overlapping), the second slice's o_proj and down_proj scaled to 0 (copies, no merging).
EXTRA = ("della_linear", "della", "nuslerp", "nuslerp_columns", "multislerp", "karcher", "nearswap",
         "model_stock_filter_wise", "ties_unnormalized", "sce", "arcee_fusion", "ram", "passthrough")
#: Methods of a base and one other model.
ONE_MODEL = ("nearswap", "arcee_fusion")

#: method -> (mergekit method, parameters block, whether model weights apply): methods without density.
SPHERICAL = {
    "sce": ("sce", "parameters: {select_topk: 0.1}\n", False),
    "arcee_fusion": ("arcee_fusion", "", False),
    "ram": ("ram", "", False),
    "nuslerp": ("nuslerp", "", True),
    "nuslerp_columns": ("nuslerp", "parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}\n", True),
    "multislerp": ("multislerp", "", True),
    "karcher": ("karcher", "", False),
    "nearswap": ("nearswap", "parameters: {t: 0.001}\n", False),
    "model_stock_filter_wise": ("model_stock", "parameters: {filter_wise: true}\n", False),
}


def config_text(method: str, base: Path, fts: list[Path], density: float, layers: int = 22) -> str:
    """The mergekit YAML for one method (weights 1.0; linear: 0.5 each; bf16 arithmetic and output)."""
    if method == "passthrough":
        first, second = (0, max(1, 2 * layers // 3)), (layers // 3, layers)
        scale = ("    parameters:\n      scale:\n        - {filter: o_proj, value: 0.0}\n"
                 "        - {filter: down_proj, value: 0.0}\n        - {value: 1.0}\n")
        return (f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {fts[0]}\n"
                f"        layer_range: [{first[0]}, {first[1]}]\n  - sources:\n      - model: {fts[1]}\n"
                f"        layer_range: [{second[0]}, {second[1]}]\n{scale}dtype: bfloat16\n")
    if method == "linear":
        models = "".join(f"  - model: {m}\n    parameters: {{weight: 0.5}}\n" for m in fts)
        return f"merge_method: linear\nmodels:\n{models}dtype: bfloat16\n"
    if method in SPHERICAL:
        mk, params, weighted = SPHERICAL[method]
        used = fts[:1] if method in ONE_MODEL else fts
        models = "".join(f"  - model: {m}\n" + ("    parameters: {weight: 1.0}\n" if weighted else "") for m in used)
        return f"merge_method: {mk}\nbase_model: {base}\nmodels:\n{models}{params}dtype: bfloat16\n"
    if method == "ties_unnormalized":
        models = "".join(f"  - model: {m}\n    parameters: {{weight: 0.5, density: {density}}}\n" for m in fts)
        return f"merge_method: ties\nbase_model: {base}\nmodels:\n{models}parameters: {{normalize: false}}\ndtype: bfloat16\n"
    mk = {"magnitude_prune": "breadcrumbs"}.get(method, method)
    gamma = "      gamma: 0.0\n" if method == "magnitude_prune" else ""
    models = "".join(f"  - model: {m}\n    parameters:\n      weight: 1.0\n      density: {density}\n{gamma}" for m in fts)
    return f"merge_method: {mk}\nbase_model: {base}\nmodels:\n{models}dtype: bfloat16\n"


def inputs_read(method: str, base: Path, fts: list[Path]) -> list[Path]:
    """The checkpoints a method reads (config_text's models and base)."""
    if method in ("linear", "passthrough"):
        return fts
    if method == "nearswap":
        return [base, fts[0]]
    return [base, *fts]


def run_umerge(config: Path, out: Path, threads: int | None) -> Measurement:
    cmd: list[str | Path] = [umerge_executable(), "run", config, "-o", out, "--overwrite", "--quiet"]
    if threads:
        cmd += ["--threads", str(threads)]
    return run_measured(cmd)


def run_mergekit(peers: Path, config: Path, out: Path, threads: int) -> Measurement:
    if out.exists():
        shutil.rmtree(out)
    return run_measured([peers / "bin" / "mergekit-yaml", config, out, "--no-copy-tokenizer", "--no-write-model-card",
                         "--no-cuda", "--quiet", "-j", str(threads)])


def _fail(m: Measurement, what: str) -> str:
    print(f"{what} failed (exit {m.returncode}):\n{m.stderr_tail}", file=sys.stderr)
    return f"failed (exit {m.returncode})"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("bench-out"), help="inputs and outputs (default ./bench-out)")
    p.add_argument("--methods", nargs="+", default=list(TABLE2), choices=TABLE2 + EXTRA)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--density", type=float, default=0.8)
    p.add_argument("--threads", type=int, default=None, help="umerge --threads (default: all cores)")
    p.add_argument("--mergekit-threads", type=int, default=2, help="mergekit-yaml -j (default 2)")
    p.add_argument("--skip-mergekit", action="store_true")
    p.add_argument("--cold", action="store_true",
                   help="drop the page cache before each tool (needs root) and compare with the disk floor")
    args = p.parse_args(argv)
    if args.cold and not disk.can_drop_page_cache():
        sys.exit("bench_methods: --cold needs root to drop the page cache")

    args.dir.mkdir(parents=True, exist_ok=True)
    load_before = _load()
    base, fts = ensure_family(args.dir, args.layers, 3, 0)
    inputs = dir_bytes([base, *fts])
    peers = None if args.skip_mergekit else peer_venv()
    if peers is None and not args.skip_mergekit:
        print("note: no peer venv with mergekit (benches/make_peer_venv.sh); timing umerge only", file=sys.stderr)
    threads = args.threads or os.cpu_count()
    rows: list[str] = []
    floors: list[str] = []
    for method in args.methods:
        config = args.dir / f"bench-{method}.yml"
        config.write_text(config_text(method, base, fts, args.density, args.layers))
        used = inputs_read(method, base, fts)
        start_state(used, args.cold)
        out_u = args.dir / f"out-umerge-{method}"
        print(f"umerge run ({method}) ...", flush=True)
        mu = run_umerge(config, out_u, args.threads)
        u_txt = _fail(mu, "umerge") if mu.returncode else f"{mu.seconds:.1f} s | {mu.cpu_seconds:.1f} s | {mu.peak_rss_mib:.0f} MiB"
        print(f"  {u_txt}", flush=True)
        f_txt = ""
        if not mu.returncode:
            floor = disk_floor(used, out_u, args.cold)
            floors.append(f"{method}: {floor.describe()}")
            f_txt = floor.cells(mu, dir_bytes(used))
        shutil.rmtree(out_u, ignore_errors=True)
        if peers is None:
            rows.append(f"| {method} | {u_txt} | | | | | {f_txt} |")
            continue
        start_state(used, args.cold)
        out_m = args.dir / f"out-mergekit-{method}"
        print(f"mergekit-yaml ({method}, -j {args.mergekit_threads}) ...", flush=True)
        mm = run_mergekit(peers, config, out_m, args.mergekit_threads)
        m_txt = _fail(mm, "mergekit") if mm.returncode else f"{mm.seconds:.1f} s | {mm.cpu_seconds:.1f} s | {mm.peak_rss_mib:.0f} MiB"
        print(f"  {m_txt}", flush=True)
        shutil.rmtree(out_m, ignore_errors=True)
        ratio = f"{mm.seconds / mu.seconds:.1f}x ({mm.cpu_seconds / max(mu.cpu_seconds, 1e-9):.1f}x CPU)" \
            if not (mu.returncode or mm.returncode) else "n/a"
        rows.append(f"| {method} | {u_txt} | {m_txt} | {ratio} | {f_txt} |")

    print()
    print(f"Machine: {machine()}; load average before/after: {load_before} / {_load()}. Inputs: base + 2 fine-tuned, "
          f"TinyLlama-1.1B shapes ({args.layers} layers), bf16, 3 shards each, 3 x {_human_bytes(inputs / 3)}; "
          f"density {args.density}; umerge --threads {threads}, default --memory-budget (512MiB); mergekit 0.1.5 "
          f"-j {args.mergekit_threads}; page cache {'dropped before each tool' if args.cold else 'warm'}; CPU time = "
          "user + system; peak RSS from wait4.")
    for line in floors:
        print(f"Disk floor, {line}")
    print(f"Command: .venv/bin/python benches/bench_methods.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print()
    print("| method | umerge wall | umerge CPU | umerge peak RSS | mergekit wall | mergekit CPU | mergekit peak RSS "
          f"| speed-up (wall) | umerge {FloorCells.header(args.cold)} |")
    print(f"|---|---|---|---|---|---|---|---|{FloorCells.rule(args.cold)}|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
