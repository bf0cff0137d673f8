"""The `umerge` command line: a thin layer over the Python API.

Subcommands live in their own modules and are imported only when invoked, so `umerge --help`
and the merge commands never import torch. Every command reports failures the same way: one line
`umerge: error: <what> (<where>)` on stderr, exit 2 for bad input or usage, 1 for an internal
failure, and the traceback only with `--debug`. Command names are shown with hyphens and answer to
underscores too (`task-arithmetic`, `task_arithmetic`; see `umerge.cli._convention`).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from umerge.cli._convention import ConventionGroup, canonical_name
from umerge.errors import InputError, UmergeError

# command name (as --help shows it) -> (module, attribute). Order here is the order in `umerge --help`.
_COMMANDS: dict[str, tuple[str, str]] = {
    # Merging
    "ties": ("umerge.cli.merge", "ties"),
    "linear": ("umerge.cli.methods", "linear"),
    "task-arithmetic": ("umerge.cli.methods", "task_arithmetic"),
    "magnitude-prune": ("umerge.cli.methods", "magnitude_prune"),
    "dare-linear": ("umerge.cli.methods", "dare_linear"),
    "dare-ties": ("umerge.cli.methods", "dare_ties"),
    "breadcrumbs": ("umerge.cli.methods", "breadcrumbs"),
    "breadcrumbs-ties": ("umerge.cli.methods", "breadcrumbs_ties"),
    "della": ("umerge.cli.methods", "della"),
    "della-linear": ("umerge.cli.methods", "della_linear"),
    "slerp": ("umerge.cli.methods", "slerp"),
    "model-stock": ("umerge.cli.methods", "model_stock"),
    "nuslerp": ("umerge.cli.methods", "nuslerp"),
    "multislerp": ("umerge.cli.methods", "multislerp"),
    "karcher": ("umerge.cli.methods", "karcher"),
    "nearswap": ("umerge.cli.methods", "nearswap"),
    "sce": ("umerge.cli.methods", "sce"),
    "arcee-fusion": ("umerge.cli.methods", "arcee_fusion"),
    "ram": ("umerge.cli.methods", "ram"),
    "ramplus-tl": ("umerge.cli.methods", "ramplus_tl"),
    "methods": ("umerge.cli.methods", "methods_cmd"),
    "run": ("umerge.cli.methods", "run_cmd"),
    "example": ("umerge.cli.example", "example"),
    # LoRA adapters
    "fold": ("umerge.cli.fold", "fold"),
    "merge-adapters": ("umerge.cli.fold", "merge_adapters_cmd"),
    "extract-lora": ("umerge.cli.extract", "extract_lora"),
    # Checking checkpoints
    "inspect": ("umerge.cli.inspect", "inspect_cmd"),
    "verify": ("umerge.cli.verify", "verify"),
    "quantize": ("umerge.cli.quantize", "quantize_cmd"),
    # Unlearning workbench (the `train` extra)
    "train": ("umerge.cli.train", "train"),
    "presets": ("umerge.cli.train", "presets"),
    "eval": ("umerge.cli.eval", "eval_cmd"),
    "search": ("umerge.cli.search", "search_cmd"),
    "analyze": ("umerge.cli.analyze", "analyze"),
    "demo": ("umerge.cli.demo", "demo"),
    "world": ("umerge.cli.demo", "world"),
}


class _LazyGroup(ConventionGroup):
    """A click group that imports each subcommand's module on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(_COMMANDS) + sorted(super().list_commands(ctx))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        name = canonical_name(cmd_name)
        if name in _COMMANDS:
            module, attr = _COMMANDS[name]
            command: click.Command = getattr(importlib.import_module(module), attr)
            return command
        return super().get_command(ctx, name)


def _version() -> str:
    from umerge import __version__

    return __version__


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(version=_version(), prog_name="umerge")
@click.option("--debug", is_flag=True, help="Show the full traceback on errors (accepted anywhere on the line).")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Fast, out-of-core model merging, and unlearning via model merging.

    \b
    Merge three checkpoints with TIES in small, fixed memory:
        umerge ties ft1/ ft2/ --base base/ --density 0.8 -o merged/
    Run `umerge COMMAND --help` for each command's options.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _fail(message: str, code: int) -> None:
    click.echo(f"umerge: error: {message}", err=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> Any:
    """Entry point of the `umerge` script: runs the CLI and maps exceptions to exit codes."""
    args = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted anywhere on the line (`umerge ties ... --debug`), not only before the
    # subcommand, so it is taken out here rather than declared on every command.
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        return cli.main(args=args, prog_name="umerge", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        _fail("aborted", 1)
    except click.ClickException as exc:
        if debug:
            raise
        # Usage errors: keep click's one-line message, exit 2 as click does.
        _fail(exc.format_message(), 2)
    except InputError as exc:
        if debug:
            raise
        _fail(str(exc), 2)
    except UmergeError as exc:
        # A failure the engine diagnosed itself (disk full, an input changed while read): its
        # message already says what and where, so no "internal error" wrapper; exit 1.
        if debug:
            raise
        _fail(str(exc), 1)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        if debug:
            raise
        _fail(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", 1)
    return None


if __name__ == "__main__":
    main()
