"""Benchmark: `umerge ties` against mergekit's `ties` on TinyLlama-1.1B-shaped bf16 checkpoints.

Generates (once, then reuses) a base and two fine-tuned checkpoints with TinyLlama-1.1B shapes
(hidden 2048, intermediate 5632, 32 heads, 4 kv heads, vocab 32000; bf16; 3 shards each) under
--dir, warms the page cache, then runs each tool once in a fresh child process with the same
inputs (TIES, density 0.8, weights 1, lambda 1, bf16 output) and reports wall time and peak RSS
(the kernel's ru_maxrss of that process, see measure.py), the speed-up, and a Markdown table for the README.

    .venv/bin/python benches/bench_ties.py                     # 22 layers: umerge and mergekit -j 2
    .venv/bin/python benches/bench_ties.py --layers 22 44      # and twice the layers (RSS flat?)
    .venv/bin/python benches/bench_ties.py --out-of-core 64MiB # inputs >> budget, RSS within it
    sudo .venv/bin/python benches/bench_ties.py --cold         # page cache dropped before each tool

Every run also measures, in the same run, the disk's floor (benches/disk.py): the O_DIRECT
durable write of the output's size (warm: the floor of a merge whose inputs are cached), plus
the O_DIRECT read of every input byte (--cold). Each tool's wall time is printed as a ratio to
that floor, with the bytes it read from storage (/proc/<pid>/io read_bytes) against the inputs.

Needs the engine installed in this interpreter's environment (`umerge` next to sys.executable) and,
for mergekit, the peer venv from benches/make_peer_venv.sh ($UMERGE_PEERS or .venv-peers).
Disk: about 6.6 GB of inputs per 22 layers, plus one output at a time (outputs are deleted
unless --keep-outputs). This is a benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import disk  # noqa: E402
from measure import Measurement, run_measured, warm_page_cache  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SPEEDUP = "<speed-up>"  # filled in once mergekit has run


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit in ("B", "KiB", "MiB") else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def parse_size(text: str) -> int:
    """'64MiB' -> 67108864, '5GB' -> 5000000000, '1024' -> 1024 (Hugging Face / umerge convention)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    t = text.strip().upper()
    num = t.rstrip("KMGTIB")
    return int(float(num) * units[t[len(num):]])


def family_dir(root: Path, layers: int) -> Path:
    return root / f"tinyllama-{layers}L-bf16"


def ensure_family(root: Path, layers: int, shards: int, seed: int) -> tuple[Path, list[Path]]:
    """Generate the base and 2 fine-tuned checkpoints once; reuse them when the marker matches."""
    from umerge.synthetic import TINYLLAMA, CheckpointSpec, make_family

    spec = CheckpointSpec(TINYLLAMA.with_layers(layers), dtype="BF16", shards=shards, seed=seed)
    fam = family_dir(root, layers)
    marker = fam / "COMPLETE.json"
    wanted = json.dumps({**asdict(spec), "shape": asdict(spec.shape), "n_finetuned": 2}, sort_keys=True)
    if marker.exists() and marker.read_text() == wanted:
        print(f"reusing {fam}")
    else:
        if fam.exists():
            shutil.rmtree(fam)
        print(f"generating {fam}: 3 x {spec.shape.n_params() / 1e9:.2f}B parameters, bf16, {shards} shards ...",
              flush=True)
        t0 = time.perf_counter()
        make_family(fam, spec, n_finetuned=2)
        marker.write_text(wanted)
        print(f"  generated in {time.perf_counter() - t0:.0f} s")
    return fam / "base", [fam / "ft1", fam / "ft2"]


def umerge_executable() -> Path:
    exe = Path(sys.executable).parent / "umerge"
    if not exe.exists():
        found = shutil.which("umerge")
        if not found:
            sys.exit("bench_ties: no `umerge` command in this environment (install the package first)")
        exe = Path(found)
    return exe


def peer_venv() -> Path | None:
    root = Path(os.environ.get("UMERGE_PEERS", REPO / ".venv-peers"))
    return root if (root / "bin" / "mergekit-yaml").exists() else None


def run_umerge(base: Path, fts: list[Path], out: Path, density: float, threads: int | None,
               budget: str | None) -> Measurement:
    cmd: list[str | Path] = [umerge_executable(), "ties", *fts, "--base", base, "--density", str(density), "-o", out,
                             "--overwrite", "--quiet"]
    if threads:
        cmd += ["--threads", str(threads)]
    if budget:
        cmd += ["--memory-budget", budget]
    return run_measured(cmd)


def run_mergekit(peers: Path, base: Path, fts: list[Path], out: Path, density: float, threads: int) -> Measurement:
    config = out.parent / f"{out.name}.yml"
    models = "".join(f"  - model: {m}\n    parameters: {{weight: 1.0, density: {density}}}\n" for m in fts)
    config.write_text(f"merge_method: ties\nbase_model: {base}\nmodels:\n{models}dtype: bfloat16\n")
    if out.exists():
        shutil.rmtree(out)
    cmd = [peers / "bin" / "mergekit-yaml", config, out, "--no-copy-tokenizer", "--no-write-model-card", "--no-cuda",
           "--quiet", "-j", str(threads)]
    return run_measured(cmd)


def agreement(a: Path, b: Path, names: list[str]) -> tuple[int, int]:
    """(elements within 1 bf16 ulp, elements) over a few tensors of two outputs."""
    from umerge.safetensors_io import read_tensor, tensor_files

    fa, fb = tensor_files(a), tensor_files(b)
    ok = total = 0
    for name in names:
        x, y = read_tensor(fa[name], name), read_tensor(fb[name], name)
        ulp = np.abs(y).astype(np.float64) * 2.0**-7 + 1e-30
        ok += int(np.count_nonzero(np.abs(x.astype(np.float64) - y) <= ulp))
        total += x.size
    return ok, total


def reference_agreement(base: Path, fts: list[Path], outputs: list[Path], name: str, density: float) -> list[float]:
    """Per output: fraction of one tensor within 1 bf16 ulp of the float64 numpy reference (tests/)."""
    sys.path.insert(0, str(REPO / "tests"))
    import reference_merge as ref
    from umerge.safetensors_io import read_tensor, tensor_files

    def get(path: Path) -> np.ndarray:
        return read_tensor(tensor_files(path)[name], name)

    b = get(base)
    expected = ref.mergekit_ties(b, [(get(f) - b).astype(np.float64) for f in fts], density)
    ulp = np.abs(expected) * 2.0**-7 + 1e-30
    return [float(np.mean(np.abs(get(o).astype(np.float64) - expected) <= ulp)) for o in outputs]


def dir_bytes(paths: list[Path]) -> int:
    return sum(f.stat().st_size for p in paths for f in p.glob("*.safetensors"))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))
        ram = f", {mem / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        ram = ""
    return f"{os.cpu_count()} cores ({cpu}){ram}"


def _load() -> str:
    """The 1-minute load average (other work on the machine inflates wall times, not CPU times)."""
    return f"{os.getloadavg()[0]:.1f}"


def _check(m: Measurement, what: str) -> None:
    if m.returncode != 0:
        print(f"{what} failed (exit {m.returncode}):\n{m.stderr_tail}", file=sys.stderr)
        sys.exit(1)


def start_state(dirs: list[Path], cold: bool) -> None:
    """Before a tool runs: the page cache dropped (cold) or holding every input (warm)."""
    if cold:
        print("dropping the page cache ...", flush=True)
        disk.drop_page_cache()
    else:
        print(f"warming the page cache ({_human_bytes(dir_bytes(dirs))}) ...", flush=True)
        warm_page_cache(dirs)


class FloorCells:
    """The disk floor of one job, measured in this run, and the table cells comparing a tool with it."""

    def __init__(self, read_s: float | None, write_s: float, out_bytes: int) -> None:
        self.read_s, self.write_s, self.out_bytes = read_s, write_s, out_bytes

    @property
    def seconds(self) -> float:
        return (self.read_s or 0.0) + self.write_s

    @staticmethod
    def header(cold: bool) -> str:
        return "wall / disk floor | read from storage / inputs" if cold else "wall / durable-write floor"

    @staticmethod
    def rule(cold: bool) -> str:
        return "---|---" if cold else "---"

    def cells(self, m: Measurement, inputs: int) -> str:
        ratio = f"{m.seconds / self.seconds:.2f}x"
        return f"{ratio} | {m.read_bytes / inputs:.2f}" if self.read_s is not None else ratio

    def describe(self) -> str:
        write = f"O_DIRECT write + fsync of the output's {_human_bytes(self.out_bytes)}: {self.write_s:.1f} s"
        if self.read_s is None:
            return write
        return f"O_DIRECT read of the inputs {self.read_s:.1f} s + {write} = {self.seconds:.1f} s"


def disk_floor(dirs: list[Path], out: Path, cold: bool) -> FloorCells:
    """The floor for a job with inputs `dirs` and output `out` (already written by a tool)."""
    out_bytes = dir_bytes([out])
    read_s = disk.direct_read_seconds(disk.safetensors_files(dirs))[0] if cold else None
    return FloorCells(read_s, disk.direct_write_seconds(out.parent, out_bytes), out_bytes)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("bench-out"),
                   help="where inputs and outputs go (default ./bench-out)")
    p.add_argument("--layers", type=int, nargs="+", default=[22], help="decoder layers per size (TinyLlama: 22)")
    p.add_argument("--shards", type=int, default=3)
    p.add_argument("--density", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="umerge --threads (default: all cores)")
    p.add_argument("--memory-budget", default=None, help="umerge --memory-budget (default: umerge's, 512MiB)")
    p.add_argument("--mergekit-threads", type=int, default=2, help="mergekit-yaml -j (default 2)")
    p.add_argument("--skip-mergekit", action="store_true", help="time umerge only")
    p.add_argument("--mergekit-layers", type=int, nargs="*", default=None,
                   help="sizes (layer counts) to run mergekit on (default: all of --layers)")
    p.add_argument("--out-of-core", metavar="BUDGET", default=None,
                   help="instead: run umerge alone with this --memory-budget and compare peak RSS with it")
    p.add_argument("--cold", action="store_true",
                   help="drop the page cache before each tool (needs root) and compare with the disk floor")
    p.add_argument("--keep-outputs", action="store_true")
    args = p.parse_args(argv)
    if args.cold and not disk.can_drop_page_cache():
        sys.exit("bench_ties: --cold needs root to drop the page cache; without it, measure cold reads with "
                 "benches/bench_beyond_ram.py (inputs larger than memory)")

    import umerge

    args.dir.mkdir(parents=True, exist_ok=True)
    load_before = _load()
    peers = None if (args.skip_mergekit or args.out_of_core) else peer_venv()
    if not (args.skip_mergekit or args.out_of_core) and peers is None:
        print("note: no peer venv with mergekit (benches/make_peer_venv.sh); timing umerge only", file=sys.stderr)
    mk_layers = set(args.layers if args.mergekit_layers is None else args.mergekit_layers)
    rows: list[str] = []
    summary: list[str] = []
    floors: list[str] = []
    for layers in args.layers:
        base, fts = ensure_family(args.dir, layers, args.shards, args.seed)
        inputs = dir_bytes([base, *fts])
        label = f"TinyLlama-1.1B shapes, {layers} layers" if layers == 22 else f"TinyLlama shapes, {layers} layers"
        size = f"3 x {_human_bytes(inputs / 3)}"
        start_state([base, *fts], args.cold)
        budget = args.out_of_core or args.memory_budget
        out_u = args.dir / f"out-umerge-{layers}L"
        print(f"umerge ties ({layers} layers) ...", flush=True)
        mu = run_umerge(base, fts, out_u, args.density, args.threads, budget)
        _check(mu, "umerge")
        print(f"  {mu.seconds:.1f} s, peak RSS {mu.peak_rss_mib:.0f} MiB, read {_human_bytes(mu.read_bytes)} from storage")
        threads = args.threads or os.cpu_count()
        floor = disk_floor([base, *fts], out_u, args.cold)
        floors.append(f"{layers} layers: {floor.describe()}")
        if args.out_of_core:
            b = parse_size(args.out_of_core)
            rows.append(f"| {label} | {size} = {_human_bytes(inputs)} | {args.out_of_core} | {inputs / b:.0f}x | "
                        f"{mu.seconds:.1f} s | {mu.cpu_seconds:.1f} s | {mu.peak_rss_mib:.0f} MiB |")
        else:
            budget_txt = budget or "512MiB (default)"
            rows.append(f"| {label} | {size} | umerge {umerge.__version__} (--threads {threads}, --memory-budget "
                        f"{budget_txt}) | {mu.seconds:.1f} s | {mu.cpu_seconds:.1f} s | {mu.peak_rss_mib:.0f} MiB | "
                        f"{SPEEDUP} | {floor.cells(mu, inputs)} |")
        if peers is not None and layers in mk_layers:
            start_state([base, *fts], args.cold)
            out_m = args.dir / f"out-mergekit-{layers}L"
            print(f"mergekit-yaml ties -j {args.mergekit_threads} ({layers} layers) ...", flush=True)
            mm = run_mergekit(peers, base, fts, out_m, args.density, args.mergekit_threads)
            _check(mm, "mergekit")
            print(f"  {mm.seconds:.1f} s, peak RSS {mm.peak_rss_mib:.0f} MiB")
            ok, total = agreement(out_u, out_m, ["model.layers.0.self_attn.q_proj.weight", "model.norm.weight",
                                                 f"model.layers.{layers - 1}.mlp.down_proj.weight"])
            probe = "model.layers.0.self_attn.k_proj.weight"
            ref_u, ref_m = reference_agreement(base, fts, [out_u, out_m], probe, args.density)
            ratio = mm.seconds / mu.seconds
            rows[-1] = rows[-1].replace(SPEEDUP, f"{ratio:.1f}x ({mm.cpu_seconds / mu.cpu_seconds:.1f}x in CPU time)")
            rows.append(f"| {label} | {size} | mergekit 0.1.5 (-j {args.mergekit_threads}) | {mm.seconds:.1f} s | "
                        f"{mm.cpu_seconds:.1f} s | {mm.peak_rss_mib:.0f} MiB | 1x | {floor.cells(mm, inputs)} |")
            summary.append(f"{layers} layers: umerge {mu.seconds:.1f} s wall / {mu.cpu_seconds:.1f} s CPU / "
                           f"{mu.peak_rss_mib:.0f} MiB, mergekit {mm.seconds:.1f} s / {mm.cpu_seconds:.1f} s / "
                           f"{mm.peak_rss_mib:.0f} MiB: {ratio:.1f}x faster, "
                           f"{mm.peak_rss_bytes / max(mu.peak_rss_bytes, 1):.1f}x less memory.\n"
                           f"Outputs agree within 1 bf16 ulp on {ok / total:.4%} of {total:,} sampled elements; "
                           f"against the float64 numpy reference ({probe}): umerge {ref_u:.4%}, mergekit "
                           f"{ref_m:.4%} (mergekit does its arithmetic in bf16 for bf16 inputs, umerge in float32)")
            if not args.keep_outputs:
                shutil.rmtree(out_m, ignore_errors=True)
        if not args.keep_outputs:
            shutil.rmtree(out_u, ignore_errors=True)

    print()
    cache = "page cache dropped before each tool" if args.cold else "page cache warm"
    print(f"Machine: {machine()}; load average before/after: {load_before} / {_load()}. Inputs: base + 2 "
          f"fine-tuned, bf16, {args.shards} shards each, {cache}; TIES density {args.density}; each tool run "
          "once in a fresh process; CPU time = user + system; peak RSS = the process's ru_maxrss; read = bytes "
          "fetched from storage (/proc/<pid>/io) over the input size.")
    for line in floors:
        print(f"Disk floor, {line}")
    print(f"Command: .venv/bin/python benches/bench_ties.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print()
    if args.out_of_core:
        print("| inputs | total size | --memory-budget | inputs / budget | wall time | CPU time | peak RSS |")
        print("|---|---|---|---|---|---|---|")
    else:
        print(f"| inputs | size | tool | wall time | CPU time | peak RSS | speed-up | {FloorCells.header(args.cold)} |")
        print(f"|---|---|---|---|---|---|---|{FloorCells.rule(args.cold)}|")
    print("\n".join(r.replace(SPEEDUP, "") for r in rows))
    for line in summary:
        print(f"\n{line}")


if __name__ == "__main__":
    main()
