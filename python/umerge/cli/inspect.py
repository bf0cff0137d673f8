"""`umerge inspect`: what a checkpoint holds (tensors, dtypes, shapes, bytes, shards) and whether it is valid."""

from __future__ import annotations

import json
import sys

import click

from umerge.cli._format import human_size


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("path", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def inspect_cmd(path: str, as_json: bool) -> None:
    """Describe the checkpoint at PATH and check that it is valid.

    PATH is a directory (model.safetensors, model.safetensors.index.json, or *.safetensors) or a
    .safetensors file. Every header is validated by the safetensors format's rules. Exits 2 when
    the checkpoint is invalid.
    """
    from umerge.merge import inspect

    info = inspect(path)
    if as_json:
        click.echo(json.dumps(info, indent=2))
    elif not info.get("valid"):
        click.echo(f"{path}: INVALID: {info.get('error')}")
    else:
        click.echo(f"{info['path']}: valid {info['format']} safetensors checkpoint")
        click.echo(
            f"  {info['tensor_count']} tensors, {info['parameters']:,} elements, {human_size(info['total_bytes'])} of tensor data"
        )
        dt = ", ".join(f"{k} {v:,}" for k, v in info["elements_by_dtype"].items())
        click.echo(f"  elements by dtype: {dt}")
        click.echo(f"  {len(info['shards'])} shard(s):")
        for s in info["shards"]:
            click.echo(f"    {s['file']}  {human_size(s['bytes'])}  {s['tensors']} tensors")
        width = max((len(t["name"]) for t in info["tensors"]), default=4)
        click.echo("  tensors:")
        for t in info["tensors"]:
            shape = "x".join(str(d) for d in t["shape"]) or "scalar"
            click.echo(f"    {t['name']:<{width}}  {t['dtype']:<5} {shape:<16} {human_size(t['bytes'])}")
    if not info.get("valid"):
        if not as_json:
            click.echo(f"umerge: error: invalid checkpoint: {info.get('error')}", err=True)
        sys.exit(2)
