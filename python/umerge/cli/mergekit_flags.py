"""mergekit-yaml's command-line flags on `umerge run`: one table, and what umerge does with each.

A mergekit user's command line (`mergekit-yaml cfg.yml out/ --cuda -j 8 --copy-tokenizer`) runs
under `umerge run` unchanged. Each flag of mergekit 0.1.x's `mergekit-yaml` is in `FLAGS`, once,
with how umerge handles it and why:

- NOTE: nothing to do in umerge; accepted, and one `umerge: note:` line on stderr says what umerge
  does instead (`--cuda`: the merge runs on the CPU);
- MAPS: becomes the umerge option that does the same (`-j` is `--threads`), with a note where the
  meaning differs (`--out-shard-size` counts parameters, `--max-shard-size` bytes);
- REFUSED: umerge cannot do what the flag asks; a one-line error says why and what to do.

The flags are hidden from the option list of `umerge run --help`; `help_section` writes the table
there instead. This module is about the command line only: configs are `umerge.mergekit_yaml`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from umerge.errors import InputError

NOTE, MAPS, REFUSED = "note", "maps", "refused"
F = Callable[..., Any]


def _param_count(value: str) -> int:
    """mergekit's shard size, a parameter count: `5B` (billions), `500M`, `1000K`, `123456`."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMbB]?)\s*", value)
    if m is None:
        raise InputError(f"--out-shard-size {value!r} is not a parameter count (examples: 5B, 500M, 1000000)")
    return int(m[1]) * {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}[m[2].lower()]


@dataclass(frozen=True)
class Flag:
    """One mergekit flag (`decls`: its spellings, all meaning the same here) and what umerge does."""

    decls: tuple[str, ...]
    handling: str               # NOTE, MAPS or REFUSED
    says: str                   # the note or the error's reason ("" for a mapping that needs no note)
    value: Any = None           # a click type for a flag that takes a value; None for a switch
    to: str | None = None       # MAPS: the keyword of `umerge run` it sets
    becomes: str = ""           # MAPS: the umerge option it becomes, as --help says it
    metavar: str = "N"          # how --help names the value of a flag that takes one

    @property
    def dest(self) -> str:
        return "mk_" + self.decls[-1].lstrip("-").replace("-", "_")

    @property
    def shown(self) -> str:
        return "/".join(self.decls)


_CPU = "umerge merges on the CPU, streaming memory-mapped inputs within --memory-budget"
_SHARDS = ("counts parameters per shard; umerge sizes shards in bytes, so it becomes --max-shard-size = that many "
           "parameters x the output dtype's bytes per element (the recipe OUT/umerge.yml records the bytes)")

#: Every flag of mergekit-yaml (mergekit 0.1.x) that `umerge run` takes, with its handling and reason.
#: `-o/--out`, `--quiet`, `--help` are umerge's own and mean the same; OUT may also be the second argument.
FLAGS: tuple[Flag, ...] = (
    Flag(("--cuda", "--no-cuda"), NOTE, _CPU),
    Flag(("--device",), NOTE, _CPU, value=str, metavar="DEVICE"),
    Flag(("--gpu-rich",), NOTE, _CPU),
    Flag(("--read-to-gpu", "--no-read-to-gpu"), NOTE, _CPU),
    Flag(("--multi-gpu", "--no-multi-gpu"), NOTE, _CPU),
    Flag(("--low-cpu-memory", "--no-low-cpu-memory"), NOTE,
         "umerge's working memory stays within --memory-budget (512MiB by default) whatever the model size"),
    Flag(("--lazy-unpickle", "--no-lazy-unpickle"), NOTE,
         "umerge memory-maps safetensors always and reads no pickled checkpoints"),
    Flag(("--allow-crimes", "--no-allow-crimes"), NOTE,
         "umerge does not compare architectures: it merges tensors by name and refuses tensors whose shapes differ"),
    Flag(("--unsafe-truncate-embeddings",), REFUSED,
         "umerge does not cut embedding rows to the smallest vocabulary: embeddings whose shapes differ are "
         "refused; give models with the same vocabulary"),
    Flag(("--no-unsafe-truncate-embeddings",), NOTE,
         "umerge's only behaviour: embeddings are never truncated, and differing shapes are refused"),
    Flag(("--trust-remote-code", "--no-trust-remote-code"), NOTE,
         "umerge runs no model code; it reads tensors and copies config files"),
    Flag(("--transformers-cache",), NOTE,
         "umerge downloads nothing: models are local directories (hf download ID --local-dir DIR)", value=str,
         metavar="DIR"),
    Flag(("--lora-merge-cache",), NOTE, "umerge run takes no LoRA references (model+lora), so caches none",
         value=str, metavar="DIR"),
    Flag(("--lora-merge-dtype",), NOTE, "umerge run takes no LoRA references (model+lora)", value=str,
         metavar="DTYPE"),
    Flag(("--clone-tensors", "--no-clone-tensors"), NOTE,
         "umerge writes each output tensor from its own buffer; there is nothing to clone"),
    Flag(("--copy-tokenizer",), NOTE,
         "umerge always copies the tokenizer files, from tokenizer_source or else the base (or the first model)"),
    Flag(("--no-copy-tokenizer",), REFUSED,
         "umerge run always copies the tokenizer files beside the weights; drop the flag "
         "(and delete them from the output afterwards if unwanted)"),
    Flag(("--write-model-card", "--no-write-model-card"), NOTE,
         "umerge writes no README.md model card; the merge's recipe is OUT/umerge.yml"),
    Flag(("--safe-serialization",), NOTE, "umerge always writes safetensors"),
    Flag(("--no-safe-serialization",), REFUSED,
         "umerge writes safetensors only, never pickled .bin checkpoints; drop the flag"),
    Flag(("--async-write", "--no-async-write"), NOTE,
         "umerge schedules its own writing and hashing of shards; --threads sets its worker threads"),
    Flag(("--write-threads",), NOTE,
         "umerge schedules its own writing and hashing of shards; --threads sets its worker threads",
         value=click.IntRange(min=1)),
    Flag(("-v",), NOTE, "umerge has no log levels: warnings always show, the summary unless --quiet"),
    Flag(("--no-quiet",), NOTE, "umerge's default: the summary is printed (and a progress bar on a terminal)"),
    Flag(("-j", "--num-threads"), MAPS, "", value=click.IntRange(min=1), to="threads", becomes="--threads N"),
    Flag(("--random-seed",), MAPS,
         "is --seed: it seeds umerge's own masks (mergekit's distribution, other draws); "
         "unused by methods that draw nothing", value=click.IntRange(min=0), to="random_seed",
         becomes="--seed N, for the methods that draw random masks (others ignore it, as mergekit's do)"),
    Flag(("--out-shard-size",), MAPS, _SHARDS, value=str, to="out_shard_params",
         becomes="--max-shard-size: N parameters (5B, 500M) x the output dtype's bytes per element"),
)


def add_options(f: F) -> F:
    """Adds every flag of FLAGS to a command, hidden from its option list."""
    for flag in reversed(FLAGS):
        if flag.value is not None:
            f = click.option(*flag.decls, flag.dest, type=flag.value, default=None, hidden=True)(f)
        else:
            f = click.option(*flag.decls, flag.dest, count=True, hidden=True)(f)
    return f


def _given(value: Any) -> bool:
    return value is not None and value is not False and value != 0


def apply(kw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Takes the flags out of a command's keywords: returns the umerge keywords the MAPS flags set
    and the notes to print; a REFUSED flag, or a mapped flag that disagrees with the umerge option
    given beside it, is an InputError."""
    mapped: dict[str, Any] = {}
    notes: list[str] = []
    for flag in FLAGS:
        value = kw.pop(flag.dest)
        if not _given(value):
            continue
        if flag.handling == REFUSED:
            raise InputError(f"{flag.shown} is not supported: {flag.says}")
        if flag.handling == MAPS:
            assert flag.to is not None
            if flag.to == "out_shard_params":
                value = _param_count(value)
            if flag.to in kw and kw[flag.to] is not None and kw[flag.to] != value:
                raise InputError(f"{flag.shown} {value} and --{flag.to} {kw[flag.to]} disagree (give one)")
            mapped[flag.to] = value
        if flag.says:
            notes.append(f"{flag.shown} {flag.says}" if flag.handling == MAPS else f"{flag.shown}: {flag.says}")
    return mapped, notes


def help_section(ctx: click.Context, formatter: click.HelpFormatter) -> None:
    """The table of mergekit-yaml flags, as a section of `umerge run --help`."""
    def named(flag: Flag) -> str:
        return flag.shown + ("" if flag.value is None else f" {flag.metavar}")

    rows = [(named(f), f.becomes) for f in FLAGS if f.handling == MAPS]
    rows += [(named(f), "error: " + f.says.split(";")[0]) for f in FLAGS if f.handling == REFUSED]
    rows.append(("the others", "accepted, with a one-line note saying what umerge does instead: "
                 + ", ".join(f.decls[0] + (f" {f.metavar}" if f.value is not None else "")
                             for f in FLAGS if f.handling == NOTE) + " (and their --no- forms)"))
    with formatter.section("mergekit-yaml flags (so that a mergekit-yaml command line runs unchanged)"):
        formatter.write_dl(rows)


class RunCommand(click.Command):
    """A command whose --help ends with the table of mergekit-yaml flags."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_options(ctx, formatter)
        help_section(ctx, formatter)
