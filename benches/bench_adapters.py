"""Benchmark: folding and merging LoRA adapters with umerge against PEFT, on a TinyLlama-1.1B-shaped
bf16 base.

Reuses (or generates) the base of benches/bench_ties.py under --dir, writes two random r=32
LoRA adapters on every linear layer (float32 factors, lora_alpha 64, PEFT's file layout), warms
the page cache, then runs each job once in a fresh child process and reports wall time, CPU time
and peak RSS (rusage of the child; CPU time is the steadier figure on a shared machine):

- fold:  `umerge fold A --base BASE` vs PEFT's from_pretrained + PeftModel.from_pretrained +
         merge_and_unload + save_pretrained (bf16);
- merge: `umerge merge-adapters A B --method ties --density 0.8` then `umerge fold`, vs PEFT's
         load + add_weighted_adapter(combination_type="ties", density=0.8) + merge_and_unload +
         save_pretrained.

    .venv/bin/python benches/bench_adapters.py            # prints a Markdown table for the README
    sudo .venv/bin/python benches/bench_adapters.py --cold   # page cache dropped before each job

Each job's wall time is also printed as a ratio to the disk's floor for it, measured in the same
run (benches/disk.py): warm, the O_DIRECT write + fsync of the output's size (the durable-write
floor); --cold, that plus the O_DIRECT read of every input byte (base and adapters), with the bytes
the job read from storage (/proc/<pid>/io) over the input size.

This is a benchmark, not a test: nothing here asserts (it checks that the two folded outputs
agree to one bf16 ulp on a few tensors, and prints the fraction).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import disk  # noqa: E402
from bench_ties import FloorCells, dir_bytes, disk_floor, ensure_family, machine, start_state, umerge_executable  # noqa: E402
from measure import Measurement, run_measured  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_adapter(base: Path, out: Path, r: int, alpha: int, seed: int) -> Path:
    """A random PEFT LoRA adapter on every linear layer of `base` (float32 factors)."""
    from umerge.safetensors_io import read_header, tensor_files, write_tensors

    if (out / "adapter_model.safetensors").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for name, f in sorted(tensor_files(base).items()):
        parts = name.split(".")
        if len(parts) < 3 or parts[-2] not in TARGETS or parts[-1] != "weight":
            continue
        header, _ = read_header(f)
        rows, cols = header[name]["shape"]
        mod = "base_model.model." + name[: -len(".weight")]
        tensors[mod + ".lora_A.weight"] = (rng.standard_normal((r, cols), dtype=np.float32) / np.sqrt(cols)).astype(np.float32)
        tensors[mod + ".lora_B.weight"] = (rng.standard_normal((rows, r), dtype=np.float32) * 1e-3).astype(np.float32)
    write_tensors(out / "adapter_model.safetensors", tensors, dtype="F32", metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "r": r,
           "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": TARGETS, "bias": "none",
           "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True}
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return out


PEFT_SCRIPT = textwrap.dedent("""
    import sys, torch, transformers, peft
    base, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    adapters = sys.argv[4:]
    torch.set_num_threads(2)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    pm = peft.PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
    for i, a in enumerate(adapters[1:], 1):
        pm.load_adapter(a, adapter_name=f"a{i}")
    if mode == "ties":
        names = [f"a{i}" for i in range(len(adapters))]
        pm.add_weighted_adapter(names, [1.0] * len(names), "m", combination_type="ties", density=0.8)
        pm.set_adapter("m")
        for n in names:
            pm.delete_adapter(n)
    pm.merge_and_unload().save_pretrained(out)
""")


def run_peft(base: Path, out: Path, mode: str, adapters: list[Path]) -> Measurement:
    if out.exists():
        shutil.rmtree(out)
    return run_measured([sys.executable, "-c", PEFT_SCRIPT, base, out, mode, *adapters])


def agreement(a: Path, b: Path) -> float:
    """Fraction of elements within one bf16 ulp over the targeted tensors of layer 0 and the last layer."""
    from umerge.safetensors_io import read_tensor, tensor_files

    fa, fb = tensor_files(a), tensor_files(b)
    names = [n for n in fa if any(t in n for t in TARGETS) and (".layers.0." in n or ".layers.21." in n)]
    ok = total = 0
    for n in names:
        x, y = read_tensor(fa[n], n).astype(np.float64), read_tensor(fb[n], n).astype(np.float64)
        ok += int(np.sum(np.abs(x - y) <= np.abs(y) * 2.0**-7 + 1e-30))
        total += x.size
    return ok / max(total, 1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("bench-out"))
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--cold", action="store_true",
                    help="drop the page cache before each job (needs root) and compare with the disk floor")
    args = ap.parse_args(argv)
    if args.cold and not disk.can_drop_page_cache():
        sys.exit("bench_adapters: --cold needs root to drop the page cache")
    root = args.dir.resolve()
    base, _ = ensure_family(root, 22, 3, 0)
    ads = [write_adapter(base, root / f"lora-r{args.rank}-{i}", args.rank, 2 * args.rank, seed=100 + i) for i in range(2)]
    exe = umerge_executable()
    rows = []
    floors = []

    def umerge(*a: object) -> Measurement:
        m = run_measured([exe, *a, "--quiet", "--overwrite"])
        if m.returncode:
            sys.exit(f"umerge failed: {m.stderr_tail}")
        return m

    def peft(out: Path, mode: str, inputs: list[Path]) -> Measurement | None:
        if args.skip_peft:
            return None
        start_state([base, *inputs], args.cold)
        return run_peft(base, out, mode, inputs)

    out_u, out_p = root / "fold-umerge", root / "fold-peft"
    start_state([base, ads[0]], args.cold)
    mu = umerge("fold", ads[0], "--base", base, "-o", out_u)
    floor = disk_floor([base, ads[0]], out_u, args.cold)
    floors.append(f"fold: {floor.describe()}")
    mp = peft(out_p, "fold", [ads[0]])
    rows.append(("fold 1 adapter", [mu], mp, None if mp is None or mp.returncode else agreement(out_u, out_p),
                 floor, dir_bytes([base, ads[0]])))

    ab = root / "ties-adapter-umerge"
    start_state([base, *ads], args.cold)
    m1 = umerge("merge-adapters", *ads, "--method", "ties", "--density", "0.8", "-o", ab)
    m2 = umerge("fold", ab, "--base", base, "-o", out_u)
    floor = disk_floor([base, *ads], out_u, args.cold)
    floors.append(f"ties + fold: {floor.describe()}")
    mp = peft(out_p, "ties", ads)
    rows.append(("ties 2 adapters + fold", [m1, m2], mp, None if mp is None or mp.returncode else agreement(out_u, out_p),
                 floor, dir_bytes([base, *ads])))

    print(f"\nmachine: {machine()}")
    print(f"base: TinyLlama-1.1B shapes, bf16, 3 shards; adapters: r={args.rank}, alpha={2 * args.rank}, all linear "
          f"layers, f32; page cache {'dropped before each job' if args.cold else 'warm'}")
    for line in floors:
        print(f"disk floor, {line}")
    print(f"command: .venv/bin/python benches/bench_adapters.py {' '.join(argv if argv is not None else sys.argv[1:])}\n")
    ratio_head, ratio_rule = FloorCells.header(args.cold), FloorCells.rule(args.cold)
    print("| job | umerge wall s (CPU s) | umerge peak RSS MiB | PEFT wall s (CPU s) | PEFT peak RSS MiB "
          f"| speed-up wall (CPU) | outputs within 1 bf16 ulp | umerge {ratio_head} |")
    print(f"|---|---|---|---|---|---|---|{ratio_rule}|")
    for name, ums, mp, agree, floor, inputs in rows:
        uw = sum(m.seconds for m in ums)
        uc = sum(m.cpu_seconds for m in ums)
        ur = max(m.peak_rss_mib for m in ums)
        whole = Measurement([], uw, uc, max(m.peak_rss_bytes for m in ums), 0, "", sum(m.read_bytes for m in ums))
        cells = floor.cells(whole, inputs)
        if mp is None or mp.returncode:
            tail = "" if mp is None else mp.stderr_tail.strip().splitlines()[-1:]
            print(f"| {name} | {uw:.1f} ({uc:.1f}) | {ur:.0f} | failed {tail} | | | | {cells} |")
        else:
            print(f"| {name} | {uw:.1f} ({uc:.1f}) | {ur:.0f} | {mp.seconds:.1f} ({mp.cpu_seconds:.1f}) | {mp.peak_rss_mib:.0f} "
                  f"| {mp.seconds / uw:.1f}x ({mp.cpu_seconds / max(uc, 1e-9):.1f}x) | {agree:.4%} | {cells} |")
    for p in (out_u, out_p):
        shutil.rmtree(p, ignore_errors=True)


if __name__ == "__main__":
    main()
