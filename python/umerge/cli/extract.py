"""`umerge extract-lora`: a PEFT LoRA adapter from a fine-tune and its base, a thin layer over
`umerge.adapters.extract.extract_lora` (mergekit-extract-lora's semantics, the SVD in Rust).

mergekit-extract-lora's own spellings of the options parse too, unlisted in --help:
`--base-model`, `--out-path`, `--max-rank`, `--include-regex`, `--exclude-regex`; its
`--model FT` is umerge's FINETUNED argument.
"""

from __future__ import annotations

import click

from umerge.cli import options as opt

_CTX = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

_EPILOG = """\b
Examples:
    umerge extract-lora ft/ --base base/ -r 32 -o lora/
    umerge extract-lora ft/ --base base/ -r 64 --sv-epsilon 1e-3 -e 'lm_head' -o lora/
    umerge extract-lora ft/ --base base/ -r 16 --embed-lora -i 'layers\\.(2[0-9])\\.' -o lora/
\b
Then, in Python:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("base/"), "lora/")
"""


_HIDDEN = opt.HiddenAliasOption  # mergekit's spellings parse but are not listed


@click.command("extract-lora", context_settings=_CTX, epilog=_EPILOG)
@click.argument("finetuned", type=opt.ModelPath("fine-tuned model"))
@click.option("--base", "--base-model", "base", cls=_HIDDEN, hidden_aliases=("--base-model",), required=True,
              type=opt.ModelPath("base"),
              help="The model FINETUNED was fine-tuned from: the adapter approximates FINETUNED - BASE.")
@click.option("-r", "--rank", "--max-rank", "rank", cls=_HIDDEN, hidden_aliases=("--max-rank",),
              type=click.IntRange(min=1), default=128, show_default=True,
              help="Largest rank of each module (mergekit's --max-rank); a module smaller than it gets its smaller "
                   "dimension.")
@click.option("--sv-epsilon", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="Keep only singular values above this (absolute, as mergekit); modules get their own rank "
                   "(rank_pattern). 0 keeps every one up to --rank.")
@click.option("--distribute-scale/--no-distribute-scale", default=True, show_default=True,
              help="lora_B = U S^1/2 and lora_A = S^1/2 V^T (mergekit's default); --no-distribute-scale puts S on "
                   "lora_A: B = U, A = S V^T. Either way B @ A is the same.")
@click.option("--embed-lora", is_flag=True,
              help="Decompose the input embeddings too (PEFT's lora_embedding_A/B) and lm_head as a linear LoRA; "
                   "by default both are saved at full size (modules_to_save) when they changed.")
@click.option("-i", "--include", "--include-regex", "include", cls=_HIDDEN, hidden_aliases=("--include-regex",),
              multiple=True, metavar="REGEX",
              help="Only modules matching one of these Python regexes (re.search on the module name) are decomposed; "
                   "repeatable.")
@click.option("-e", "--exclude", "--exclude-regex", "exclude", cls=_HIDDEN, hidden_aliases=("--exclude-regex",),
              multiple=True, metavar="REGEX",
              help="Modules matching one of these are left out (embeddings included); repeatable.")
@click.option("--save-module", "save_modules", multiple=True, metavar="NAME",
              help="Save this module (full name, or last name such as lm_head) at full size instead; repeatable.")
@click.option("--skip-undecomposable", is_flag=True,
              help="Leave out the weights that cannot be decomposed (norms: not 2-D) instead of saving them at full size.")
@click.option("--oversample", type=click.IntRange(min=0), default=10, show_default=True,
              help="Randomized SVD: sketch columns beyond the rank.")
@click.option("--power-iters", type=click.IntRange(min=0, max=100), default=2, show_default=True,
              help="Randomized SVD: power iterations, two more passes over each task vector apiece; more bring "
                   "a flat spectrum's result closer to the exact SVD's.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random sketches.")
@opt.out_option("lora", "Adapter directory (built beside it and renamed in when complete).",
                hidden_aliases=("--out-path",))
@opt.out_dtype_option("dtype of the factors (default: the fine-tune's). Rounded to nearest even.")
@opt.threads_option("Worker threads (default: all cores). Output bytes do not depend on it.")
@opt.memory_budget_option("Working memory, e.g. 512MiB (default), 2GiB. Output bytes do not depend on it.")
@opt.overwrite_option()
@opt.quiet_option("No progress bar and no summary (warnings and errors still go to stderr).")
def extract_lora(finetuned: str, base: str, rank: int, sv_epsilon: float, distribute_scale: bool, embed_lora: bool,
                 include: tuple[str, ...], exclude: tuple[str, ...], save_modules: tuple[str, ...],
                 skip_undecomposable: bool, oversample: int, power_iters: int, seed: int, out: str,
                 out_dtype: str | None, threads: int | None, memory_budget: str | None, overwrite: bool,
                 quiet: bool) -> None:
    """Extract a PEFT LoRA adapter from FINETUNED and its --base: for each linear layer, the
    truncated SVD of the task vector FINETUNED - BASE.

    \b
    As mergekit-extract-lora: delta = U S V^T is cut to the top --rank singular values (and
    those above --sv-epsilon), lora_alpha = r so B @ A is the approximation itself; norms and,
    without --embed-lora, embeddings are saved at full size (modules_to_save). Unlike it, modules
    equal to the base are left out. The SVD is randomized (Halko, Martinsson and Tropp 2011;
    exact where rank + oversample reaches the smaller dimension), streamed within
    --memory-budget. The summary gives the median over modules of ||delta - BA|| / ||delta||.
    """
    from umerge.adapters.extract import extract_lora as run
    from umerge.cli.merge import _print_summary

    report = run(finetuned, base, out, rank=rank, distribute_scale=distribute_scale, sv_epsilon=sv_epsilon,
                 embed_lora=embed_lora, include=include, exclude=exclude, save_modules=save_modules,
                 skip_undecomposable=skip_undecomposable, oversample=oversample, power_iters=power_iters, seed=seed,
                 out_dtype=out_dtype, threads=threads, memory_budget=memory_budget, overwrite=overwrite,
                 progress=not quiet)
    _print_summary(report, quiet)
