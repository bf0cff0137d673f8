"""`umerge example`: the built-in demonstration of the merge engine, with nothing to download.

It writes three small Llama-shaped bfloat16 checkpoints (a base and two "fine-tuned" variants, each
the base plus a seeded random delta; see `umerge.synthetic`), merges them with TIES at density 0.8
through the public API `umerge.ties`, and prints what went in, what came out, and a few statistics
that show what TIES did: how often the two fine-tunes pulled an entry in opposite directions (the
interference that sign election resolves), and how much of the base the merge moved.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import click
import numpy as np

from umerge.errors import InputError
from umerge.synthetic import CheckpointSpec, LlamaShape, llama_tensors, load_checkpoint, make_family

DENSITY = 0.8
SUBDIRS = ("models", "merged")


def _example_shape() -> LlamaShape:
    # 4 layers of a Llama model, 3.4M parameters: 6.5 MiB per checkpoint in bf16, merged in about a second.
    return LlamaShape(hidden=256, intermediate=688, layers=4, heads=4, kv_heads=2, vocab=1024)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def _prepare(out: Path, overwrite: bool) -> None:
    """Refuse to touch a non-empty directory unless --overwrite; then remove only what we make."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise InputError(f"{out} exists and is not empty (use --overwrite to replace the example in it)")
        for name in SUBDIRS:
            if (out / name).exists():
                shutil.rmtree(out / name)
    out.mkdir(parents=True, exist_ok=True)


def _statistics(base: Path, fts: list[Path], merged: Path) -> dict[str, float]:
    """Entry counts over the whole model: opposite-sign deltas, entries moved by the merge."""
    b = load_checkpoint(base)
    models = [load_checkpoint(p) for p in fts]
    out = load_checkpoint(merged)
    total = conflicts = moved = 0
    in_norm = out_norm = 0.0
    for name, bv in b.items():
        d = [m[name] - bv for m in models]
        signs = np.sign(np.stack(d))
        conflicts += int(np.count_nonzero((signs.max(axis=0) > 0) & (signs.min(axis=0) < 0)))
        md = out[name] - bv
        moved += int(np.count_nonzero(md))
        total += bv.size
        in_norm += float(np.mean([np.abs(x).sum() for x in d]))
        out_norm += float(np.abs(md).sum())
    return {"entries": total, "conflicts": conflicts / total, "moved": moved / total,
            "delta_ratio": out_norm / in_norm if in_norm else 0.0}


@click.command("example")
@click.option("-o", "--out", "out", type=click.Path(path_type=Path), default=Path("example-out"), show_default=True,
              help="Directory for the example checkpoints (models/) and the merge (merged/).")
@click.option("--overwrite", is_flag=True, help="Replace an earlier example in the directory.")
def example(out: Path, overwrite: bool) -> None:
    """Generate small example checkpoints and merge them with TIES, printing what was done.

    \b
    Writes OUT/models/{base,ft1,ft2} (Llama-shaped, bf16, 2 shards each, seeded) and merges
    ft1 and ft2 onto base with TIES at density 0.8 into OUT/merged.
    """
    import umerge

    _prepare(out, overwrite)
    spec = CheckpointSpec(_example_shape(), dtype="BF16", shards=2, seed=0)
    echo = click.echo
    echo(f"umerge example: TIES merge of two fine-tuned models onto their base (umerge {umerge.__version__})")
    echo(f"1. writing example checkpoints under {out / 'models'}")
    base, fts = make_family(out / "models", spec, n_finetuned=2)
    n_tensors = len(llama_tensors(spec.shape))
    for path in (base, *fts):
        echo(f"   {path}: {n_tensors} tensors, {spec.shape.n_params():,} parameters, bf16, "
             f"{_human(_dir_bytes(path))} in {len(list(path.glob('*.safetensors')))} shards")
    merged = out / "merged"
    cmd = f"umerge ties {fts[0]} {fts[1]} --base {base} --density {DENSITY} -o {merged}"
    echo(f"2. merging with TIES (preset mergekit, density {DENSITY}, weights 1, lambda 1), the same as:")
    echo(f"   {cmd}")
    report = umerge.ties([str(p) for p in fts], base=str(base), density=DENSITY, out=str(merged), progress=False)
    echo(f"   wrote {merged}: {report.tensors} tensors, {_human(report.bytes_written)}"
         f" in {report.seconds:.2f} s, peak memory {_human(report.peak_rss_bytes)}")
    for warning in report.warnings:
        echo(f"   warning: {warning}")
    stats = _statistics(base, fts, merged)
    echo("3. what TIES did, over all entries of the model:")
    echo(f"   trimmed: each task vector keeps its top {DENSITY:.0%} of entries by magnitude, per tensor")
    echo(f"   sign conflicts: {stats['conflicts']:.1%} of {stats['entries']:,} entries were pushed in opposite "
         "directions by the two fine-tunes; the elected sign keeps only the agreeing ones there")
    echo(f"   moved from the base: {stats['moved']:.1%} of entries "
         "(the rest: trimmed in both, or rounded back in bf16)")
    echo(f"   size of the merged change vs an input's change (L1): {stats['delta_ratio']:.2f}")
    echo(f"inspect the result with: umerge inspect {merged}")
    sys.stdout.flush()

