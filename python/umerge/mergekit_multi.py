"""Multi-document mergekit configs (mergekit-multi): several merges, one feeding the next.

mergekit 0.1.5's `mergekit-multi` (`mergekit/scripts/multimerge.py`) reads a YAML file of several
documents separated by ``---``, each a merge config with one more key, ``name:`` (at most one
document has none). Wherever a config names a model (``base_model``, ``models:``, a slice's
sources, ``tokenizer_source``), a document's name stands for that document's output. mergekit
writes each named document to INTERMEDIATE_DIR/NAME and the unnamed one to ``--out-path``, running
every document after those it refers to.

`umerge run multi.yml -o OUT` (`run`) does the same with the umerge engine:

- OUT is the unnamed document's output, as in mergekit; when every document is named, the last
  document's (mergekit would leave it in the intermediate directory and write no OUT);
- every other document is a stage written to INTERMEDIATE/NAME, INTERMEDIATE being
  ``intermediate_dir`` or else ``OUT-intermediate`` beside OUT; every document runs, in
  dependency order (a document after those it names, otherwise in file order);
- the stages are removed once OUT is written (and when a run fails), unless ``keep_intermediate``;
- before anything runs, every document is checked (`check`): YAML, each config's keys, method
  and parameters (`mergekit_yaml.translate`), names (unique, plain directory names, at most one
  document unnamed), each model reference a document's name or an existing path, no cycle. A
  stage's checks that need its inputs' files (layer ranges against their layer counts, tensor
  shapes) run when its turn comes, since those inputs are earlier stages' outputs.

Options of the command line (threads, memory, ``--seed``, shard size) apply to every stage,
except ``out_dtype``: the command line's ``--out-dtype`` sets OUT's dtype only, so stages keep
their own config's dtype and lose no precision before the last merge.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from umerge import mergekit_yaml
from umerge.errors import InputError

NAME_KEY = "name"


@dataclass(frozen=True)
class Stage:
    """One document of a multi-document config, ready to run."""

    #: Its name (None for the unnamed document, whose output is OUT).
    name: str | None
    #: Its position in the file, from 1 (for messages).
    number: int
    #: Its config, with the names of other documents replaced by their output paths.
    config: dict[str, Any]
    #: Where it is written.
    out: Path
    #: The names of the documents it refers to.
    needs: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"document {self.number}" + (f" ({self.name})" if self.name is not None else "")


def is_multi(docs: Sequence[Mapping[str, Any]]) -> bool:
    """True for a multi-document config: several documents, or one with a ``name:``."""
    return len(docs) > 1 or any(NAME_KEY in d for d in docs)


def _check_name(name: Any, where: str) -> str:
    """A document's name, which becomes a directory name: a plain one (no path separator)."""
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"{where}: name must be a non-empty string, got {mergekit_yaml._show(name)}")
    if name in (".", "..") or any(c in name for c in "/\\\0") or mergekit_yaml._CONTROL.search(name):
        raise InputError(f"{where}: name {mergekit_yaml._show(name)} must be a plain directory name (no /, \\, "
                         "control characters, . or ..): the stage is written to INTERMEDIATE/NAME")
    return name


def _references(config: Mapping[str, Any]) -> list[tuple[Callable[[str], None], Any, str]]:
    """Every model reference of a config: (a setter that replaces it, its value, what it is)."""
    refs: list[tuple[Callable[[str], None], Any, str]] = []

    def at(d: Any, key: str, what: str) -> None:
        if isinstance(d, dict) and d.get(key) is not None:
            def replace(value: str, d: dict[str, Any] = d, key: str = key) -> None:
                d[key] = value

            refs.append((replace, d[key], what))

    at(config, "base_model", "base_model")
    if config.get("tokenizer_source") not in (None, "base", "union"):
        at(config, "tokenizer_source", "tokenizer_source")
    for i, m in enumerate(config.get("models") or () if isinstance(config.get("models"), list) else ()):
        at(m, "model", f"models[{i}].model")
    for i, sl in enumerate(config.get("slices") or () if isinstance(config.get("slices"), list) else ()):
        at(sl, "base_model", f"slices[{i}].base_model")
        srcs = sl.get("sources") if isinstance(sl, dict) else None
        for j, src in enumerate(srcs if isinstance(srcs, list) else ()):
            at(src, "model", f"slices[{i}].sources[{j}].model")
    return refs


def check(docs: Sequence[Mapping[str, Any]], out: str | os.PathLike[str], where: str,
          intermediate_dir: str | os.PathLike[str] | None = None) -> list[Stage]:
    """The stages of a multi-document config in the order they run, the last writing `out`;
    an InputError for anything wrong that can be found before running (see the module docs)."""
    out = Path(out)
    inter = Path(intermediate_dir) if intermediate_dir is not None else out.parent / f"{out.name}-intermediate"
    names: dict[str, int] = {}
    unnamed: list[int] = []
    for i, d in enumerate(docs):
        w = f"document {i + 1} of {where}"
        if NAME_KEY not in d or d[NAME_KEY] is None:
            unnamed.append(i)
            continue
        name = _check_name(d[NAME_KEY], w)
        if name in names:
            raise InputError(f"{w}: name {name!r} is also document {names[name] + 1}'s: each document needs its own "
                             "name")
        names[name] = i
    if len(unnamed) > 1:
        raise InputError(f"documents {' and '.join(str(i + 1) for i in unnamed[:2])} of {where} both have no name: "
                         "at most one document (the final merge) may have none, as in mergekit-multi")
    final = unnamed[0] if unnamed else len(docs) - 1

    configs: list[dict[str, Any]] = []
    needs: list[list[str]] = []
    for i, d in enumerate(docs):
        w = f"document {i + 1} of {where}"
        config = {k: v for k, v in d.items() if k != NAME_KEY}
        try:
            mergekit_yaml.translate(config, w)  # keys, method, parameters: before anything runs
        except InputError as exc:
            text = str(exc)
            raise InputError(text if w in text else f"{w}: {text}") from None
        config = _copy(config)
        used: list[str] = []
        for set_ref, value, what in _references(config):
            ref = mergekit_yaml._model_ref(value, f"{w}: {what}")
            if ref in names:
                if ref not in used:
                    used.append(ref)
                set_ref(os.fspath(inter / ref))
            elif not os.path.exists(ref):
                known = f" (its documents are named: {', '.join(sorted(names))})" if names else ""
                raise InputError(f"{w}: {what} {ref} is neither a local path nor the name of a document of "
                                 f"{where}{known}")
        configs.append(config)
        needs.append(used)

    order = _dependency_order([d.get(NAME_KEY) if i not in unnamed else None for i, d in enumerate(docs)],
                              needs, names, final, where)
    stages = []
    for i in order:
        stage_name = None if i in unnamed else str(docs[i][NAME_KEY])
        target = out if i == final else inter / str(stage_name)
        stages.append(Stage(stage_name, i + 1, configs[i], target, tuple(needs[i])))
    stage_outs = {os.path.realpath(s.out) for s in stages if s.out != out}
    if os.path.realpath(out) in stage_outs:
        raise InputError(f"the output {out} is also a stage's output: give another -o or --intermediate-dir")
    return stages


def _copy(value: Any) -> Any:
    """A deep copy of a YAML value (dicts, lists, scalars), so patching never changes the input."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _dependency_order(doc_names: Sequence[Any], needs: Sequence[Sequence[str]], names: Mapping[str, int], final: int,
                      where: str) -> list[int]:
    """The documents in an order where each comes after those it names (otherwise file order),
    with the final one last; a cycle is an InputError that names it."""
    order: list[int] = []
    state: dict[int, str] = {}  # "open" while its dependencies are visited, then "done"

    def visit(i: int, path: list[int]) -> None:
        if state.get(i) == "done":
            return
        if state.get(i) == "open":
            cycle = path[path.index(i):] + [i]
            shown = " -> ".join(str(doc_names[j]) for j in cycle)
            raise InputError(f"documents of {where} refer to each other in a cycle: {shown} (a merge cannot use "
                             "its own output)")
        state[i] = "open"
        for n in needs[i]:
            visit(names[n], [*path, i])
        state[i] = "done"
        order.append(i)

    for i in range(len(doc_names)):
        if i != final:
            visit(i, [])
    visit(final, [])
    if order[-1] != final:
        # Some document needs the final one's output: the final output would not be the last merge.
        after = [doc_names[j] for j in order[order.index(final) + 1:]]
        raise InputError(f"document {final + 1} of {where}, whose output is the final one, is used by "
                         f"{', '.join(map(str, after))}: name the final merge so that nothing refers to it, or leave "
                         "it unnamed")
    return order


def run(docs: Sequence[Mapping[str, Any]], out: str | os.PathLike[str], *, where: str = "config",
        intermediate_dir: str | os.PathLike[str] | None = None, keep_intermediate: bool = False,
        seed: int | None = None, progress: Any = True, on_stage: Callable[[Stage, int, int], None] | None = None,
        **options: Any) -> Any:
    """Runs every document of a multi-document config (see the module docs); returns the final
    merge's `MergeReport`, its warnings preceded by the stages' (each prefixed with its document).
    `on_stage(stage, k, n)` is called before the k-th of n stages runs. `options` go to every
    stage's `mergekit_yaml.run_config`, except `out_dtype`, which sets the final output's only."""
    from umerge.merge import MergeReport

    stages = check(docs, out, where, intermediate_dir)
    if not options.get("overwrite"):
        # The engine refuses these too, but only when that stage's turn comes: after the others ran.
        for stage in stages:
            p = stage.out
            if p.exists() and (not p.is_dir() or any(p.iterdir())):
                raise InputError(f"the output of {stage.label} exists and is not empty (pass --overwrite / "
                                 f"overwrite=True to replace it) ({p})")
    final_dtype = options.pop("out_dtype", None)
    inter_root = stages[0].out.parent if len(stages) > 1 else None
    made_root = inter_root is not None and not inter_root.exists()
    written: list[Path] = []
    warnings: list[str] = []
    report: Any = None
    try:
        for k, stage in enumerate(stages, 1):
            if on_stage is not None:
                on_stage(stage, k, len(stages))
            last = k == len(stages)
            if not last:
                stage.out.parent.mkdir(parents=True, exist_ok=True)
            opts = dict(options, out_dtype=final_dtype) if last else dict(options)
            label = f"{stage.label} of {where}"
            try:
                report = mergekit_yaml.run_config(stage.config, stage.out, where=label, seed=seed, progress=progress,
                                                  **opts)
            except InputError as exc:
                text = str(exc)
                raise InputError(text if label in text else f"{label}: {text}") from None
            if not last:
                written.append(stage.out)
                warnings.extend(f"{stage.label}: {w}" for w in getattr(report, "warnings", ()))
    finally:
        if not keep_intermediate:
            for p in written:
                shutil.rmtree(p, ignore_errors=True)
            if made_root and inter_root is not None:
                try:
                    inter_root.rmdir()
                except OSError:
                    pass  # something else was put there meanwhile: leave it
    if warnings and isinstance(report, MergeReport):
        report = dataclasses.replace(report, warnings=(*warnings, *report.warnings))
    return report


def describe(stages: Sequence[Stage]) -> list[dict[str, Any]]:
    """The stages as JSON-ready dicts (for ``--print-spec``): name, output, what each needs, its config."""
    return [{"document": s.number, "name": s.name, "out": os.fspath(s.out), "needs": list(s.needs),
             "config": s.config} for s in stages]


__all__ = ["Stage", "check", "describe", "is_multi", "run"]
