"""Benchmark: merging inputs larger than the machine's memory, against the disk's floor.

Generates a base and two fine-tuned checkpoints with TinyLlama-1.1B layer shapes (bf16) and as
many decoder layers as it takes for the three inputs together to exceed the machine's memory
(MemTotal x --memory-factor, default 1.15), so no page cache can hold them and every input byte
comes from storage. Then, for each method (TIES density 0.8 against the base; linear, the plain
average of the two fine-tunes), it:

1. drops the page cache (as root; without root the inputs' size alone keeps them out of it);
2. caches a bystander file (--bystander, default 1 GiB): another process's working set;
3. runs the merge once in a fresh child process (wall time, CPU time, peak RSS, bytes read from
   storage via /proc/<pid>/io);
4. measures in the same run the disk floor of that job: an O_DIRECT read of every input byte the
   method reads, plus an O_DIRECT write and fsync of the output's size (benches/disk.py);
5. reports how much of the bystander file is still cached (mincore): a merge that evicts other
   processes' working sets wholesale would leave little.

    .venv/bin/python benches/bench_beyond_ram.py --dir DIR           # TIES and linear
    .venv/bin/python benches/bench_beyond_ram.py --dir DIR --layers 4 --memory-factor 0  # smoke test

Disk: four times one model's size (three inputs and the output) plus the bystander; checked
before anything is written. Everything generated is removed at the end unless --keep-inputs.
A benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import disk  # noqa: E402
from bench_ties import _human_bytes, _load, dir_bytes, ensure_family, family_dir, machine, umerge_executable  # noqa: E402
from measure import Measurement, run_measured  # noqa: E402

METHODS = ("ties", "linear")
#: Largest shard written, so the generated checkpoints look like published ones (about 2 GB each).
SHARD_BYTES = 2 * 10**9


def mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def layers_needed(target_total: int) -> int:
    """Decoder layers for three TinyLlama-shaped bf16 models to hold at least `target_total` bytes."""
    from umerge.synthetic import TINYLLAMA

    one = TINYLLAMA.with_layers(1).n_params() * 2
    two = TINYLLAMA.with_layers(2).n_params() * 2
    per_layer, fixed = two - one, 2 * one - two
    return max(1, math.ceil((target_total / 3 - fixed) / per_layer))


def model_bytes(layers: int) -> int:
    from umerge.synthetic import TINYLLAMA

    return TINYLLAMA.with_layers(layers).n_params() * 2


def merge_command(method: str, base: Path, fts: list[Path], out: Path, args: argparse.Namespace) -> list[str | Path]:
    cmd: list[str | Path] = [umerge_executable(), method, *fts]
    if method == "ties":
        cmd += ["--base", base, "--density", "0.8"]
    cmd += ["-o", out, "--quiet", "--overwrite"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.memory_budget:
        cmd += ["--memory-budget", args.memory_budget]
    if args.page_cache:
        cmd += ["--page-cache", args.page_cache]
    return cmd


def cache_bystander(path: Path, nbytes: int) -> None:
    """Write (once) and read `path`, so its pages are in the page cache as a live process's would be."""
    if not path.exists() or path.stat().st_size != nbytes:
        block = os.urandom(disk.BLOCK)
        with open(path, "wb") as f:
            for _ in range(nbytes // disk.BLOCK):
                f.write(block)
    with open(path, "rb", buffering=0) as f:
        while f.read(disk.BLOCK):
            pass


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("bench-out"), help="where inputs and outputs go")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--memory-factor", type=float, default=1.15,
                   help="the inputs together hold at least this times MemTotal (default 1.15)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers per model (default: from --memory-factor)")
    p.add_argument("--threads", type=int, default=None, help="umerge --threads (default: all cores)")
    p.add_argument("--memory-budget", default=None, help="umerge --memory-budget (default: umerge's, 512MiB)")
    p.add_argument("--page-cache", choices=["auto", "keep", "drop"], default=None, help="umerge --page-cache")
    p.add_argument("--bystander", type=int, default=1024, metavar="MIB", help="bystander working set (MiB; 0: none)")
    p.add_argument("--keep-inputs", action="store_true", help="keep the generated checkpoints for a rerun")
    args = p.parse_args(argv)

    memory = mem_total()
    layers = args.layers or layers_needed(int(memory * args.memory_factor))
    one = model_bytes(layers)
    bystander_bytes = args.bystander * 2**20 // disk.BLOCK * disk.BLOCK
    args.dir.mkdir(parents=True, exist_ok=True)
    fam = family_dir(args.dir, layers)
    have = dir_bytes([fam / d for d in ("base", "ft1", "ft2") if (fam / d).is_dir()])
    need = 4 * one + bystander_bytes - have
    free = shutil.disk_usage(args.dir).free
    print(f"{layers} layers: 3 x {_human_bytes(one)} of inputs = {_human_bytes(3 * one)} against "
          f"{_human_bytes(memory)} of memory; this run needs {_human_bytes(need)} more disk, "
          f"{_human_bytes(free)} free in {args.dir}", flush=True)
    if need > free:
        sys.exit(f"bench_beyond_ram: not enough disk in {args.dir}: {_human_bytes(need)} needed, "
                 f"{_human_bytes(free)} free (use --dir elsewhere or fewer --layers)")

    shards = max(1, math.ceil(one / SHARD_BYTES))
    base, fts = ensure_family(args.dir, layers, shards, 0)
    bystander = args.dir / "bystander.bin"
    rows: list[str] = []
    notes: list[str] = []
    load_before = _load()
    try:
        for method in args.methods:
            inputs = [base, *fts] if method == "ties" else fts
            in_bytes = dir_bytes(inputs)
            out = args.dir / f"out-beyond-ram-{method}"
            dropped = disk.drop_page_cache()
            if bystander_bytes:
                cache_bystander(bystander, bystander_bytes)
                before = disk.cached_fraction([bystander])
            print(f"umerge {method} ({_human_bytes(in_bytes)} of inputs) ...", flush=True)
            m: Measurement = run_measured(merge_command(method, base, fts, out, args))
            if m.returncode:
                sys.exit(f"umerge {method} failed (exit {m.returncode}):\n{m.stderr_tail}")
            kept = f"{disk.cached_fraction([bystander]):.0%} (of {before:.0%})" if bystander_bytes else "n/a"
            out_bytes = dir_bytes([out])
            shutil.rmtree(out)  # the floor's scratch file takes its place on disk
            read_s, _ = disk.direct_read_seconds(disk.safetensors_files(inputs))
            write_s = disk.direct_write_seconds(args.dir, out_bytes)
            floor = read_s + write_s
            print(f"  {m.seconds:.1f} s (floor {floor:.1f} s), peak RSS {m.peak_rss_mib:.0f} MiB, "
                  f"read {_human_bytes(m.read_bytes)}", flush=True)
            rows.append(f"| {method} | {_human_bytes(in_bytes)} | {m.seconds:.1f} s | {m.cpu_seconds:.1f} s | "
                        f"{m.peak_rss_mib:.0f} MiB | {floor:.1f} s | {m.seconds / floor:.2f}x | "
                        f"{m.read_bytes / in_bytes:.2f} | {kept} |")
            notes.append(f"{method}: O_DIRECT read of the inputs {read_s:.1f} s + O_DIRECT write + fsync of the "
                         f"output's {_human_bytes(out_bytes)} {write_s:.1f} s; page cache "
                         f"{'dropped' if dropped else 'not dropped (no root)'} before the run")
    finally:
        bystander.unlink(missing_ok=True)
        for method in args.methods:
            shutil.rmtree(args.dir / f"out-beyond-ram-{method}", ignore_errors=True)
        if not args.keep_inputs:
            shutil.rmtree(fam, ignore_errors=True)

    budget = args.memory_budget or "512MiB (default)"
    print()
    print(f"Machine: {machine()}; load average before/after: {load_before} / {_load()}. Inputs: TinyLlama-1.1B "
          f"layer shapes with {layers} layers, bf16, {shards} shards per model, 3 x {_human_bytes(one)} "
          f"({3 * one / memory:.2f}x the memory); umerge --memory-budget {budget}, --page-cache "
          f"{args.page_cache or 'auto'}; each merge run once in a fresh process; CPU time = user + system; "
          "read = bytes fetched from storage over the input size; bystander = a "
          f"{args.bystander} MiB file cached before the merge, fraction still cached after it.")
    for line in notes:
        print(f"Disk floor, {line}")
    print(f"Command: .venv/bin/python benches/bench_beyond_ram.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print()
    print("| method | inputs | wall time | CPU time | peak RSS | disk floor | wall / floor | read / inputs "
          "| bystander still cached |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
