"""Benchmark: `umerge extract-lora` against mergekit's `mergekit-extract-lora` on the same inputs.

A base and one fine-tune (`umerge.synthetic`: base + a small Gaussian delta on every tensor, so every
task vector has a flat spectrum, the hardest case for a randomized SVD) with TinyLlama-1.1B shapes
in bf16 by default, generated once under --dir (the TinyLlama family is the one benches/bench_ties.py
uses, reused when present). The page cache is warmed, then each tool runs once in a fresh child
process with the same rank (32, every linear layer, embeddings and norms saved at full size, as
mergekit does by default) and is measured as benches/measure.py measures (wall time, CPU time,
peak RSS of that process). Both adapters are then compared on a few modules: the relative error
||delta - B @ A||_F / ||delta||_F of each tool beside the optimum (numpy's float64 singular values).

    .venv/bin/python benches/bench_extract_lora.py                       # 1.1B shapes, r = 32, both tools
    .venv/bin/python benches/bench_extract_lora.py --shape tiny          # smoke test, seconds
    .venv/bin/python benches/bench_extract_lora.py --skip-mergekit       # umerge only

mergekit runs on the CPU (`mergekit-extract-lora ... --max-rank 32 -j N`, exact SVDs in float32 by
torch); umerge with its defaults (all cores, 512 MiB budget, randomized SVD with p = 10, q = 2).
Needs `umerge` beside this interpreter and, for mergekit, the peer venv (benches/make_peer_venv.sh;
$UMERGE_PEERS or .venv-peers). Disk: 2 x 2.05 GiB of inputs at 1.1B shapes (4.4 GB more if
bench_ties.py's family is generated for them), plus two adapters of about 0.4 GB, deleted unless
--keep-outputs. This is a benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ties import _load, dir_bytes, ensure_family, machine, peer_venv, umerge_executable  # noqa: E402
from measure import Measurement, run_measured, warm_page_cache  # noqa: E402

SHAPES = ("tinyllama", "tiny", "tiny-odd")


def family(root: Path, shape_name: str, layers: int | None, seed: int) -> tuple[Path, Path, str]:
    """(base, fine-tune, description): bench_ties.py's TinyLlama family, or a small one of its own."""
    from umerge.synthetic import TINY, TINY_ODD, TINYLLAMA, CheckpointSpec, make_family

    if shape_name == "tinyllama":
        n = layers or TINYLLAMA.layers
        base, fts = ensure_family(root, n, 3, seed)
        return base, fts[0], f"TinyLlama-1.1B shapes, {n} layers" if n == 22 else f"TinyLlama shapes, {n} layers"
    shape = TINY if shape_name == "tiny" else TINY_ODD
    shape = shape.with_layers(layers) if layers else shape
    spec = CheckpointSpec(shape, dtype="BF16", shards=1, seed=seed)
    fam = root / f"extract-{shape_name}-{shape.layers}L-bf16"
    marker = fam / "COMPLETE.json"
    wanted = json.dumps({**asdict(spec), "shape": asdict(spec.shape), "n_finetuned": 1}, sort_keys=True)
    if not (marker.exists() and marker.read_text() == wanted):
        shutil.rmtree(fam, ignore_errors=True)
        make_family(fam, spec, n_finetuned=1)
        marker.write_text(wanted)
    return fam / "base", fam / "ft1", f"{shape_name} shapes ({shape.n_params():,} parameters), {shape.layers} layers"


def run_umerge(ft: Path, base: Path, out: Path, rank: int, threads: int | None, budget: str | None) -> Measurement:
    cmd: list[str | Path] = [umerge_executable(), "extract-lora", ft, "--base", base, "-r", str(rank), "-o", out,
                             "--overwrite", "--quiet"]
    if threads:
        cmd += ["--threads", str(threads)]
    if budget:
        cmd += ["--memory-budget", budget]
    return run_measured(cmd)


def run_mergekit(peers: Path, ft: Path, base: Path, out: Path, rank: int, threads: int) -> Measurement:
    shutil.rmtree(out, ignore_errors=True)
    return run_measured([peers / "bin" / "mergekit-extract-lora", "--model", ft, "--base-model", base, "--out-path", out,
                         "--max-rank", str(rank), "-j", str(threads)])


def errors(base: Path, ft: Path, adapters: list[Path], modules: list[str], rank: int) -> list[str]:
    """Per module: each adapter's relative error and the optimum of rank `rank` (float64)."""
    from umerge.safetensors_io import read_tensor, tensor_files

    fb, ff = tensor_files(base), tensor_files(ft)
    lines = []
    for module in modules:
        name = module + ".weight"
        delta = read_tensor(ff[name], name).astype(np.float64) - read_tensor(fb[name], name)
        norm = np.linalg.norm(delta)
        s = np.linalg.svd(delta, compute_uv=False)
        cells = []
        for a in adapters:
            f = a / "adapter_model.safetensors"
            b = read_tensor(f, f"base_model.model.{module}.lora_B.weight").astype(np.float64)
            ab = read_tensor(f, f"base_model.model.{module}.lora_A.weight").astype(np.float64)
            cells.append(f"{np.linalg.norm(delta - b @ ab) / norm:.6f}")
        optimum = np.sqrt(np.sum(s[rank:] ** 2)) / norm
        lines.append(f"| {module} {list(delta.shape)} | " + " | ".join(cells) + f" | {optimum:.6f} |")
    return lines


def _check(m: Measurement, what: str) -> None:
    if m.returncode != 0:
        print(f"{what} failed (exit {m.returncode}):\n{m.stderr_tail}", file=sys.stderr)
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("bench-out"), help="where inputs and outputs go (default ./bench-out)")
    p.add_argument("--shape", choices=SHAPES, default="tinyllama", help="model shapes (default: TinyLlama-1.1B's)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's; TinyLlama 22)")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="umerge --threads (default: all cores)")
    p.add_argument("--memory-budget", default=None, help="umerge --memory-budget (default: umerge's, 512MiB)")
    p.add_argument("--mergekit-threads", type=int, default=os.cpu_count() or 1, help="mergekit -j (default: all cores)")
    p.add_argument("--skip-mergekit", action="store_true", help="time umerge only")
    p.add_argument("--keep-outputs", action="store_true")
    args = p.parse_args(argv)

    import umerge

    args.dir.mkdir(parents=True, exist_ok=True)
    load_before = _load()
    peers = None if args.skip_mergekit else peer_venv()
    if not args.skip_mergekit and peers is None:
        print("note: no peer venv with mergekit (benches/make_peer_venv.sh); timing umerge only", file=sys.stderr)
    base, ft, label = family(args.dir, args.shape, args.layers, args.seed)
    inputs = dir_bytes([base, ft])
    threads = args.threads or os.cpu_count()

    print(f"warming the page cache ({inputs / 2**30:.2f} GiB) ...", flush=True)
    warm_page_cache([base, ft])
    out_u = args.dir / f"out-extract-umerge-{args.shape}"
    print(f"umerge extract-lora -r {args.rank} ...", flush=True)
    mu = run_umerge(ft, base, out_u, args.rank, args.threads, args.memory_budget)
    _check(mu, "umerge")
    print(f"  {mu.seconds:.1f} s, {mu.cpu_seconds:.1f} s CPU, peak RSS {mu.peak_rss_mib:.0f} MiB")
    budget = args.memory_budget or "512MiB (default)"
    rows = [f"| {label}, base + fine-tune, 2 x {inputs / 2 / 2**30:.2f} GiB bf16 | umerge {umerge.__version__} "
            f"(--threads {threads}, --memory-budget {budget}) | {mu.seconds:.1f} s | {mu.cpu_seconds:.1f} s | "
            f"{mu.peak_rss_mib:.0f} MiB | <speed-up> |"]
    adapters, names = [out_u], ["umerge"]
    if peers is not None:
        warm_page_cache([base, ft])
        out_m = args.dir / f"out-extract-mergekit-{args.shape}"
        print(f"mergekit-extract-lora --max-rank {args.rank} -j {args.mergekit_threads} ...", flush=True)
        mm = run_mergekit(peers, ft, base, out_m, args.rank, args.mergekit_threads)
        _check(mm, "mergekit")
        print(f"  {mm.seconds:.1f} s, {mm.cpu_seconds:.1f} s CPU, peak RSS {mm.peak_rss_mib:.0f} MiB")
        rows[0] = rows[0].replace("<speed-up>", f"{mm.seconds / mu.seconds:.1f}x ({mm.cpu_seconds / mu.cpu_seconds:.1f}x "
                                                f"in CPU time)")
        rows.append(f"| | mergekit 0.1.5 (-j {args.mergekit_threads}) | {mm.seconds:.1f} s | {mm.cpu_seconds:.1f} s | "
                    f"{mm.peak_rss_mib:.0f} MiB | 1x |")
        adapters.append(out_m)
        names.append("mergekit")
    else:
        rows[0] = rows[0].replace(" <speed-up> |", " |")

    from umerge.safetensors_io import tensor_files

    layers = sorted({int(n.split(".")[2]) for n in tensor_files(ft) if n.startswith("model.layers.")})
    probes = [f"model.layers.{layers[0]}.self_attn.k_proj", f"model.layers.{layers[0]}.self_attn.q_proj",
              f"model.layers.{layers[-1]}.mlp.down_proj"]
    print("comparing the adapters with numpy's SVD ...", flush=True)
    error_rows = errors(base, ft, adapters, probes, args.rank)

    print()
    print(f"Machine: {machine()}; load average before/after: {load_before} / {_load()}. Inputs: "
          f"{label}, bf16 (umerge.synthetic: Gaussian deltas, flat spectra); rank {args.rank}; page cache warm; each "
          "tool run once in a fresh process; CPU time = user + system; peak RSS = the process's ru_maxrss.")
    print(f"Command: .venv/bin/python benches/bench_extract_lora.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print()
    print("| inputs | tool | wall time | CPU time | peak RSS | speed-up |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(row)
    print()
    print("Relative error ||delta - B @ A||_F / ||delta||_F (bf16 factors) and the rank-r optimum:")
    print()
    print("| module | " + " | ".join(names) + " | optimum |")
    print("|---|" + "---|" * len(names) + "---|")
    for row in error_rows:
        print(row)
    if not args.keep_outputs:
        for a in adapters:
            shutil.rmtree(a, ignore_errors=True)


if __name__ == "__main__":
    main()
