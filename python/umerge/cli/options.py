"""Click options that several commands share (`ties`, the other method commands, `fold`,
`merge-adapters`, `run`, `eval`, `search`, `analyze`): one definition of each option's name, type and default.

Each factory returns a decorator; `help` defaults to the wording of the merge commands and may be
given where a command says something more specific (e.g. `fold`'s output dtype). Every command that
writes takes its destination as `-o/--out`; `--out-dtype` takes the short names (bf16, f16, f32) and
the long ones (bfloat16, float16, float32; see `umerge.merge.DTYPE_NAMES`). Input models are
`ModelPath`s: a missing one is a one-line error, which for a Hub id says how to download it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from umerge.merge import DTYPE_NAMES, OUT_DTYPES, out_dtype_name

F = Callable[..., Any]
Decorator = Callable[[F], F]


class HiddenAliasOption(click.Option):
    """An option whose `hidden_aliases` (old spellings) parse as usual but are left out of --help."""

    def __init__(self, *args: Any, hidden_aliases: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hidden_aliases = hidden_aliases

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        shown, self.opts = self.opts, [o for o in self.opts if o not in self.hidden_aliases]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = shown


class ModelPath(click.ParamType):
    """An input checkpoint or adapter path, which must exist: `umerge.merge.require_local` says so in
    one line, and for a Hugging Face Hub id (owner/name) how to download it."""

    name = "path"

    def __init__(self, what: str = "model") -> None:
        self.what = what

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from umerge.merge import require_local

        require_local(value, self.what)
        return str(value)


def out_option(default: str | None = "merged",
               help: str = "Output directory (built beside it and renamed in when complete).",
               *, hidden_aliases: tuple[str, ...] = (), **kwargs: Any) -> Decorator:
    """`-o/--out`, the destination of every command that writes (`hidden_aliases`: old spellings)."""
    kwargs.setdefault("type", click.Path())
    return click.option("-o", "--out", *hidden_aliases, "out", default=default, show_default=default is not None,
                        cls=HiddenAliasOption, hidden_aliases=hidden_aliases, help=help, **kwargs)


def _out_dtype(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    return out_dtype_name(value)


def out_dtype_option(help: str = "Output dtype (default: the base's). Rounded to nearest even.") -> Decorator:
    return click.option("--out-dtype", type=click.Choice(list(DTYPE_NAMES), case_sensitive=False), default=None,
                        callback=_out_dtype, metavar="[" + "|".join(OUT_DTYPES) + "]",
                        help=help + " bfloat16, float16 and float32 are accepted too.")


def threads_option(help: str = "Worker threads (default: all cores). Output bytes do not depend on it.") -> Decorator:
    return click.option("--threads", type=click.IntRange(min=1), default=None, help=help)


def memory_budget_option(
    help: str = "Working memory, e.g. 512MiB (default), 2GiB. Output bytes do not depend on it.",
) -> Decorator:
    return click.option("--memory-budget", default=None, metavar="SIZE", help=help)


def max_shard_size_option(
    help: str = "Largest shard file, header included, e.g. 5GB (default), 2GiB, 1000000.",
) -> Decorator:
    return click.option("--max-shard-size", default=None, metavar="SIZE", help=help)


def page_cache_option() -> Decorator:
    return click.option(
        "--page-cache", type=click.Choice(["auto", "keep", "drop"]), default=None, metavar="[auto|keep|drop]",
        help="What the run leaves in the page cache. auto (default): as found: inputs already cached are "
             "read from it, others around it (O_DIRECT), and a run larger than half the memory drops its "
             "output's pages once on disk. keep: read through it and leave it (a re-run is warm). drop: drop "
             "every input and output page behind the merge. Output bytes do not depend on it.")


def overwrite_option(help: str = "Replace an existing non-empty output directory.") -> Decorator:
    return click.option("--overwrite", is_flag=True, help=help)


def allow_nonfinite_option(help: str = "Merge inputs holding NaN or Inf instead of refusing them.") -> Decorator:
    return click.option("--allow-nonfinite", is_flag=True, help=help)


def strict_option(help: str) -> Decorator:
    return click.option("--strict", is_flag=True, help=help)


def quiet_option(help: str = "No progress bar and no summary.") -> Decorator:
    return click.option("--quiet", "-q", is_flag=True, help=help)


def eval_data_options(data_help: str = "Directory with forget.* and retain.* (LUME layout).",
                      data_required: bool = False) -> Decorator:
    """`--data`, `--mia-members`, `--mia-nonmembers`, `--mmlu-dir`: the evaluation data of `umerge eval`
    (and of `umerge search`, which scores every candidate on it)."""
    def decorate(f: F) -> F:
        return apply(
            f,
            click.option("--data", type=click.Path(path_type=Path), required=data_required, help=data_help),
            click.option("--mia-members", type=click.Path(dir_okay=False, path_type=Path), help="JSON-lines MIA members."),
            click.option("--mia-nonmembers", type=click.Path(dir_okay=False, path_type=Path),
                         help="JSON-lines MIA nonmembers."),
            click.option("--mmlu-dir", type=click.Path(file_okay=False, path_type=Path),
                         help="MMLU CSV layout: dev/ and test/."),
        )
    return decorate


def eval_settings_options() -> Decorator:
    """How `umerge.evaluate.evaluate` runs: batch size, generation length, row cap, MMLU shots,
    Min-K% fraction, torch device (`umerge eval`, `umerge search`)."""
    def decorate(f: F) -> F:
        return apply(
            f,
            click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1)),
            click.option("--max-new-tokens", default=256, show_default=True, type=click.IntRange(min=1)),
            click.option("--max-rows", type=click.IntRange(min=1), help="Keep the first N rows of each task and kind per split."),
            click.option("--mmlu-k-shot", default=5, show_default=True, type=click.IntRange(min=0)),
            click.option("--min-k", default=0.2, show_default=True, type=click.FloatRange(0, 1, min_open=True),
                         help="Fraction of tokens for the Min-K% and Min-K%++ attacks."),
            click.option("--device", help="torch device (default: cuda when available, else cpu)."),
        )
    return decorate


def apply(f: F, *decorators: Decorator) -> F:
    """Applies `decorators` so that their options appear in --help in the order given."""
    for d in reversed(decorators):
        f = d(f)
    return f
