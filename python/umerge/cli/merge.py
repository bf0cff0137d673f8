"""`umerge ties`: the TIES merge command, a thin layer over `umerge.merge.ties`."""

from __future__ import annotations

import sys

import click

from umerge.cli import options as opt


def _print_summary(report: object, quiet: bool) -> None:
    warnings = getattr(report, "warnings", ())
    for w in list(warnings)[:10]:
        click.echo(f"umerge: warning: {w}", err=True)
    if len(warnings) > 10:
        click.echo(f"umerge: warning: ... and {len(warnings) - 10} more (see the report)", err=True)
    if not quiet:
        click.echo(report.summary())  # type: ignore[attr-defined]


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("models", nargs=-1, required=True, type=opt.ModelPath())
@click.option("--base", type=opt.ModelPath("base"),
              help="The model the fine-tunes started from. Required: TIES merges task vectors (model - base).")
@click.option("--density", type=float, required=True,
              help="Fraction of each task vector's entries kept, by magnitude: exactly floor(density * n) per tensor "
                   "(0 < D <= 1; 1 keeps all). TIES paper and mergekit commonly use 0.2-0.8.")
@click.option("--weight", "weights", type=float, multiple=True,
              help="Weight of each model's task vector, given once per model in order (default 1.0 each).")
@click.option("--lambda", "lambda_", type=float, default=1.0, show_default=True, help="Scale of the merged task vector added to the base.")
@click.option("--preset", type=click.Choice(["mergekit", "peft", "paper"]), default=None,
              help="Default: mergekit for full models, peft for LoRA adapters. "
                   "mergekit: sign elected on weighted deltas, mean divided by the sum of agreeing weights. "
                   "peft: sign on unweighted deltas, mean over the count of agreeing entries (PEFT merge_utils.ties). "
                   "paper: trim over the whole model at once, zero signs take the model's majority, mean over the count.")
@click.option("--majority-sign", type=click.Choice(["total", "frequency"]), default=None,
              help="peft preset (and adapters): elect the sign of the sum (total, default) or of the vote (frequency).")
@click.option("--normalize/--no-normalize", default=True, show_default=True,
              help="mergekit preset: divide the agreeing sum by the agreeing weights; --no-normalize adds "
                   "lambda times the agreeing sum itself (mergekit's normalize: false).")
@click.option("--delta", type=click.Choice(["factors", "full"]), default="factors", show_default=True,
              help="LoRA adapter inputs only: factors merges lora_A and lora_B separately (PEFT add_weighted_adapter); "
                   "full merges each module's update scaling * B @ A (then --base writes a full model, else --svd-rank truncates).")
@click.option("--svd-rank", type=click.IntRange(min=1), default=None,
              help="LoRA adapters with --delta full and no --base: rank of the SVD-truncated adapter (default: the largest input rank).")
@opt.out_option()
@opt.out_dtype_option()
@opt.threads_option()
@opt.memory_budget_option()
@opt.page_cache_option()
@opt.max_shard_size_option()
@opt.strict_option("A tensor missing from some model is an error (default: merge over the models that have it, with a warning).")
@opt.overwrite_option()
@opt.allow_nonfinite_option()
@opt.quiet_option("No progress bar and no summary (warnings and errors still go to stderr).")
def ties(
    models: tuple[str, ...],
    base: str | None,
    density: float,
    weights: tuple[float, ...],
    lambda_: float,
    preset: str | None,
    majority_sign: str | None,
    normalize: bool,
    delta: str,
    svd_rank: int | None,
    out: str,
    out_dtype: str | None,
    threads: int | None,
    memory_budget: str | None,
    page_cache: str | None,
    max_shard_size: str | None,
    strict: bool,
    overwrite: bool,
    allow_nonfinite: bool,
    quiet: bool,
) -> None:
    """TIES-merge fine-tuned MODELS onto their --base (trim, elect sign, disjoint merge).

    \b
    For each tensor and task vector d_i = model_i - base:
      trim   keep the floor(density * n) largest |d_i|, zero the rest
      elect  the sign of the sum over models, per element (sum >= 0 -> +)
      merge  average the entries agreeing with it; out = base + lambda * average
    MODELS are checkpoint directories (model.safetensors, a sharded
    model.safetensors.index.json, or *.safetensors) or .safetensors files.
    Memory stays within --memory-budget whatever the model size.
    MODELS may instead be PEFT LoRA adapter directories: they are merged
    as PEFT's add_weighted_adapter(combination_type="ties") does (factor-wise,
    preset peft, no --base needed) into a new adapter, or, with --base, folded
    into a full model (umerge ties a/ b/ --density 0.8 -o ab/).

    \b
    Example:
        umerge ties ft1/ ft2/ --base base/ --density 0.8 -o merged/
    """
    from umerge.merge import ties as ties_api

    # The base, the density's range and the weight count are checked below the CLI (the engine,
    # `umerge.merge.weight_params`), and their errors exit 2 like click's.
    report = ties_api(
        list(models),
        base,
        density=density,
        weights=list(weights) if weights else None,
        lambda_=lambda_,
        preset=preset,
        majority_sign=majority_sign,
        normalize=normalize,
        delta=delta,
        svd_rank=svd_rank,
        out=out,
        out_dtype=out_dtype,
        threads=threads,
        memory_budget=memory_budget,
        page_cache=page_cache,
        max_shard_size=max_shard_size,
        strict=strict,
        overwrite=overwrite,
        allow_nonfinite=allow_nonfinite,
        progress=(not quiet) and (sys.stderr.isatty() or _force_bar()),
    )
    _print_summary(report, quiet)


def _force_bar() -> bool:
    """Show the bar on a non-terminal stderr only when asked (UMERGE_PROGRESS=1)."""
    import os

    return os.environ.get("UMERGE_PROGRESS") == "1"
