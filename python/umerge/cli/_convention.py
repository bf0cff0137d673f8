"""How the CLI names its commands: one place for the spelling rule and the unknown-command message.

Commands are shown with hyphens (`task-arithmetic`, `merge-adapters`, `loss-curves`) and answer to
the underscore spelling too (`task_arithmetic`, the name mergekit's configs use), so both work
everywhere. An unknown command is a one-line usage error that suggests the closest command.
"""

from __future__ import annotations

import difflib

import click


def canonical_name(name: str) -> str:
    """The spelling `--help` shows: `task_arithmetic` -> `task-arithmetic`."""
    return name.replace("_", "-")


def unknown_command(name: str, known: list[str], prog: str) -> click.UsageError:
    """`no such command 'tie' (did you mean 'ties'?); see umerge --help`."""
    close = difflib.get_close_matches(canonical_name(name), known, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return click.UsageError(f"no such command {name!r}{hint}; see {prog} --help")


class ConventionGroup(click.Group):
    """A click group whose commands answer to both spellings and that suggests the closest command."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return super().get_command(ctx, canonical_name(cmd_name))

    def resolve_command(self, ctx: click.Context,
                        args: list[str]) -> tuple[str | None, click.Command | None, list[str]]:
        name = args[0]
        if (not name.startswith("-") and not ctx.resilient_parsing
                and self.get_command(ctx, name) is None):
            raise unknown_command(name, self.list_commands(ctx), ctx.command_path)
        # the canonical name, so that usage lines and errors say `umerge task-arithmetic`
        return super().resolve_command(ctx, [canonical_name(name), *args[1:]])
