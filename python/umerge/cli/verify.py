"""`umerge verify`: check a checkpoint before trusting it (a thin layer over the engine's verifier).

The checks (all run by the Rust engine, `umerge_core::verify`, which reports every problem rather
than the first): every shard's header against the safetensors rules; the shard index against what
the shards hold (`weight_map`, `metadata.total_size`, names inside the directory); file sizes; an
optional NaN/Inf scan of every float tensor; and the sha256 of every shard against the checksums
that `umerge` records in the recipe `umerge.yml` when it writes a merge.

Exit status: 0 when the checkpoint is valid, 2 when it is not (one line `umerge: error: ...` on
stderr, the full list of problems on stdout).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from umerge.cli._format import human_size
from umerge.errors import InputError


def verify_checkpoint(path: str | Path, scan_nonfinite: bool = False, hash: bool = True) -> dict[str, Any]:
    """Verify the checkpoint at `path` (directory or .safetensors file); returns the engine's report.

    Keys: `valid`, `format`, `shards` (file, bytes, tensors, header_ok, sha256, recipe_sha256),
    `tensor_count`, `total_bytes`, `checks` (which ran), `recipe_checked`, `nonfinite` (per tensor:
    nan, inf, first_index), `errors`, `warnings`.
    """
    from umerge import _core

    return json.loads(_core.verify(str(path), scan_nonfinite, hash))


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("path", type=click.Path(exists=True))
@click.option("--scan-nonfinite", "--scan", "--nan", "scan", is_flag=True,
              help="Also read every float tensor and report NaN and Inf values (reads all the data).")
@click.option("--no-hash", is_flag=True, help="Skip the sha256 of each shard (and the comparison with the recipe).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify(path: str, scan: bool, no_hash: bool, as_json: bool) -> None:
    """Check the checkpoint at PATH: headers, index, sizes, checksums (and NaN/Inf with --scan-nonfinite).

    \b
    PATH is a model directory or a .safetensors file. Checksums are compared with the
    `shards:` line of the umerge.yml recipe that `umerge` writes beside every merge.
    Exits 0 when valid, 2 when not.

    \b
    Example:
        umerge verify merged/ --scan-nonfinite
    """
    report = verify_checkpoint(path, scan_nonfinite=scan, hash=not no_hash)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        state = "valid" if report["valid"] else "INVALID"
        click.echo(f"{path}: {state} {report['format']} checkpoint: {report['tensor_count']} tensors, "
                   f"{human_size(report['total_bytes'])} of tensor data, {len(report['shards'])} shard(s)")
        for s in report["shards"]:
            mark = "ok" if s["header_ok"] else "BAD"
            sha = s.get("sha256") or "-"
            rec = s.get("recipe_sha256")
            match = "" if rec is None else ("  = recipe" if rec == sha else "  != recipe")
            click.echo(f"  {mark:<3} {s['file']}  {human_size(s['bytes'])}  {s['tensors']} tensors  sha256 {sha}{match}")
        click.echo(f"  checks: {', '.join(report['checks'])}"
                   + ("; checksums match the recipe" if report["recipe_checked"] and report["valid"] else ""))
        for w in report["warnings"]:
            click.echo(f"  warning: {w}")
        for e in report["errors"]:
            click.echo(f"  error: {e}")
    if not report["valid"]:
        errors = report["errors"]
        more = f" (and {len(errors) - 1} more problem(s), listed above)" if len(errors) > 1 else ""
        raise InputError(f"{path} is not a valid checkpoint: {errors[0] if errors else 'unknown problem'}{more}")
