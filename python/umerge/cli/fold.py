"""`umerge fold` (adapter -> full model) and `umerge merge-adapters` (adapters -> adapter or model):
thin layers over `umerge.adapters`."""

from __future__ import annotations

import click

from umerge.adapters.combine import COMBINATIONS
from umerge.cli import options as opt

_CTX = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _summary(report: object, quiet: bool) -> None:
    for w in getattr(report, "warnings", ()):
        click.echo(f"umerge: warning: {w}", err=True)
    if not quiet:
        click.echo(report.summary())  # type: ignore[attr-defined]


@click.command(context_settings=_CTX)
@click.argument("adapters", nargs=-1, required=True, type=opt.ModelPath("adapter"))
@click.option("--base", required=True, type=opt.ModelPath("base"), help="The base model the adapter was trained on.")
@opt.out_option("folded", "Output directory (built beside it, renamed in when complete).")
@opt.out_dtype_option("Output dtype of float tensors (default: the base's). Rounded to nearest even.")
@opt.threads_option("Worker threads (default: all cores).")
@opt.memory_budget_option("Working memory, e.g. 512MiB (default), 2GiB.")
@opt.page_cache_option()
@opt.max_shard_size_option("Largest shard file, e.g. 5GB (default).")
@opt.overwrite_option()
@opt.allow_nonfinite_option("Accept NaN or Inf in the inputs.")
@opt.quiet_option()
def fold(adapters: tuple[str, ...], base: str, out: str, out_dtype: str | None, threads: int | None,
         memory_budget: str | None, page_cache: str | None, max_shard_size: str | None, overwrite: bool,
         allow_nonfinite: bool, quiet: bool) -> None:
    """Fold PEFT LoRA ADAPTERS into --base: W + scaling * B @ A for every targeted module.

    \b
    Writes a full Hugging Face checkpoint (the base's dtype unless --out-dtype), the same as
    PEFT's merge_and_unload + save_pretrained, streaming the base shard by shard. Several
    adapters add up. scaling = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora).

    \b
    Example:
        umerge fold unlearned-adapter/ --base olmo-7b/ -o olmo-7b-unlearned/
    """
    from umerge.adapters.folding import fold as run

    report = run(list(adapters), base, out, out_dtype=out_dtype, threads=threads, memory_budget=memory_budget,
                 max_shard_size=max_shard_size, overwrite=overwrite, allow_nonfinite=allow_nonfinite, progress=not quiet,
                 page_cache=page_cache)
    _summary(report, quiet)


@click.command("merge-adapters", context_settings=_CTX)
@click.argument("adapters", nargs=-1, required=True, type=opt.ModelPath("adapter"))
@click.option("--method", type=click.Choice(list(COMBINATIONS)), default="ties", show_default=True,
              help="PEFT add_weighted_adapter combination type. linear/ties/dare_*/magnitude_prune merge "
                   "lora_A and lora_B separately; cat concatenates (exact, rank = sum); *_svd merge the full updates and truncate by SVD.")
@click.option("--density", type=float, default=None, help="Fraction of entries kept (ties, dare_*, magnitude_prune).")
@click.option("--weight", "weights", type=float, multiple=True, help="Weight per adapter, in order (default 1.0 each).")
@click.option("--majority-sign", type=click.Choice(["total", "frequency"]), default="total", show_default=True,
              help="TIES sign election: sign of the sum (total) or of the vote (frequency).")
@click.option("--delta", type=click.Choice(["factors", "full"]), default="factors", show_default=True,
              help="factors: PEFT's factor-wise merge. full: merge each module's update scaling * B @ A.")
@click.option("--svd-rank", type=click.IntRange(min=1), default=None, help="Rank of the SVD-truncated result (default: the largest input rank).")
@click.option("--base", type=opt.ModelPath("base"), default=None,
              help="With --delta full: add the merged update to this base and write a full model.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of DARE's random masks.")
@opt.out_option("merged", "Output directory.")
@opt.out_dtype_option("Output dtype (default: the first adapter's, or the base's).")
@opt.threads_option("Worker threads (default: all cores).")
@opt.memory_budget_option("Working memory for --base outputs, e.g. 512MiB.")
@opt.page_cache_option()
@opt.overwrite_option()
@opt.quiet_option("No summary.")
def merge_adapters_cmd(adapters: tuple[str, ...], method: str, density: float | None, weights: tuple[float, ...],
                       majority_sign: str, delta: str, svd_rank: int | None, base: str | None, seed: int, out: str,
                       out_dtype: str | None, threads: int | None, memory_budget: str | None, page_cache: str | None,
                       overwrite: bool, quiet: bool) -> None:
    """Merge PEFT LoRA ADAPTERS into a new adapter, as PEFT's add_weighted_adapter does.

    \b
    Example (the ZJUKLAB unlearning system's merge):
        umerge merge-adapters a/ b/ --method ties --density 0.8 -o ab/
    """
    from umerge.adapters import merge_adapters

    report = merge_adapters(list(adapters), out, method=method, weights=list(weights) or None, density=density,
                            majority_sign=majority_sign, delta=delta, svd_rank=svd_rank, base=base, seed=seed,
                            out_dtype=out_dtype, threads=threads, memory_budget=memory_budget, overwrite=overwrite,
                            progress=not quiet and base is not None, page_cache=page_cache)
    _summary(report, quiet)
