"""`umerge quantize`: fake-quantize a model to int4 or int8 (a thin layer over `umerge.quantization`)."""

from __future__ import annotations

import click

from umerge.cli import options as opt
from umerge.quantization import DEFAULT_GROUP_SIZE, DEFAULT_INCLUDE

_EPILOG = """\b
Examples:
  umerge quantize unlearned/ -o unlearned-int4/                      # int4, groups of 128
  umerge quantize unlearned/ -o unlearned-int8/ --bits 8 --group-size -1   # int8, per row
  umerge quantize model/ -o q/ --exclude 'embed_tokens'             # quantize lm_head too
  umerge eval --model unlearned/ --data lume/ --quantize int4 -o eval-int4/   # score it
"""


@click.command("quantize", epilog=_EPILOG, context_settings={"help_option_names": ["-h", "--help"],
                                                             "max_content_width": 100})
@click.argument("model", type=opt.ModelPath("model"))
@opt.out_option("quantized", "Output directory (built beside it, renamed in when complete).")
@click.option("--bits", type=click.Choice(["4", "8"]), default="4", show_default=True,
              help="int4 (levels -7..7) or int8 (-127..127).")
@click.option("--group-size", type=int, default=DEFAULT_GROUP_SIZE, show_default=True,
              help="Consecutive input columns sharing one scale (the last group of a row may be shorter); "
                   "-1: one scale per row.")
@click.option("--include", metavar="REGEX", default=None,
              help=f"Quantize the 2-D float tensors whose name matches (re.search). Default: {DEFAULT_INCLUDE!r}.")
@click.option("--exclude", metavar="REGEX", default=None,
              help="Keep these in full precision (replaces the default; '' excludes nothing). Default: the "
                   "token and position embeddings and the output head, by name: embed_tokens, embed_positions, "
                   "embed_out, tok_embeddings, wte, wpe, word_embeddings, position_embeddings, "
                   "token_type_embeddings, lm_head (umerge.quantization.DEFAULT_EXCLUDE).")
@opt.out_dtype_option("Output dtype of float tensors (default: each tensor's own). Rounded to nearest even.")
@opt.threads_option()
@opt.memory_budget_option()
@opt.page_cache_option()
@opt.max_shard_size_option("Largest shard file, e.g. 5GB (default).")
@opt.overwrite_option()
@opt.allow_nonfinite_option("Accept NaN or Inf in the inputs (a group holding one is written unchanged).")
@opt.quiet_option()
def quantize_cmd(model: str, out: str, bits: str, group_size: int, include: str | None, exclude: str | None,
                 out_dtype: str | None, threads: int | None, memory_budget: str | None, page_cache: str | None,
                 max_shard_size: str | None, overwrite: bool, allow_nonfinite: bool, quiet: bool) -> None:
    """Fake-quantize MODEL: quantize each linear weight to int4/int8 and back, and write the model.

    \b
    Per row of a weight W [out, in] and per group of --group-size input columns, in float32:
        scale = max|w| / qmax        (qmax 7 for int4, 127 for int8)
        w'    = clamp(round(w / scale), -qmax, qmax) * scale   (round: ties to even)
    written back in W's dtype; an all-zero group stays zero (AWQ's symmetric round-to-nearest).
    Quantized: 2-D float tensors named *.weight, except embeddings and lm_head; norms, biases and
    every other tensor are copied unchanged. Config and tokenizer are copied; transformers loads
    the output as any model. Use it to check that unlearning survives quantization (Zhang et al.
    2025, arXiv:2410.16454: forgotten knowledge came back after 4-bit quantization).
    """
    from umerge.quantization import quantize

    report = quantize(model, out, bits=int(bits), group_size=group_size, include=include, exclude=exclude,
                      out_dtype=out_dtype, threads=threads, memory_budget=memory_budget,
                      max_shard_size=max_shard_size, overwrite=overwrite, allow_nonfinite=allow_nonfinite,
                      progress=not quiet, page_cache=page_cache)
    for w in report.warnings:
        click.echo(f"umerge: warning: {w}", err=True)
    if not quiet:
        click.echo(f"{report.method} in {report.seconds:.1f} s, peak RSS {report.peak_rss_bytes / 2**20:.0f} MiB, "
                   f"{report.threads} threads -> {report.output}")
