"""Click options that several commands share (`ties`, the other method commands, `fold`,
`merge-adapters`, `run`): one definition of each option's name, type and default.

Each factory returns a decorator; `help` defaults to the wording of the merge commands and may be
given where a command says something more specific (e.g. `fold`'s output dtype).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

F = Callable[..., Any]
Decorator = Callable[[F], F]

OUT_DTYPE_CHOICES = ["bf16", "f16", "f32"]


def out_option(default: str = "merged",
               help: str = "Output directory (built beside it and renamed in when complete).") -> Decorator:
    return click.option("-o", "--out", default=default, show_default=True, type=click.Path(), help=help)


def out_dtype_option(help: str = "Output dtype (default: the base's). Rounded to nearest even.") -> Decorator:
    return click.option("--out-dtype", type=click.Choice(OUT_DTYPE_CHOICES), default=None, help=help)


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


def overwrite_option(help: str = "Replace an existing non-empty output directory.") -> Decorator:
    return click.option("--overwrite", is_flag=True, help=help)


def allow_nonfinite_option(help: str = "Merge inputs holding NaN or Inf instead of refusing them.") -> Decorator:
    return click.option("--allow-nonfinite", is_flag=True, help=help)


def strict_option(help: str) -> Decorator:
    return click.option("--strict", is_flag=True, help=help)


def quiet_option(help: str = "No progress bar and no summary.") -> Decorator:
    return click.option("--quiet", "-q", is_flag=True, help=help)


def apply(f: F, *decorators: Decorator) -> F:
    """Applies `decorators` so that their options appear in --help in the order given."""
    for d in reversed(decorators):
        f = d(f)
    return f
