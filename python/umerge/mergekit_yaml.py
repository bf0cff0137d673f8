"""mergekit YAML configs -> umerge merge specs (`umerge run CONFIG.yml -o OUT`).

Reads a mergekit configuration (mergekit 0.1.5 schema) and builds the engine's spec (see
`umerge.merge`), so a config runs unchanged and gives mergekit's result. What is supported:

- ``models:`` (each ``model: PATH`` with optional ``parameters``), or ``slices:`` (layer
  stacking): each slice lists sources, a model and a ``layer_range`` [start, end) each, the same
  number of layers from every source of the slice; the output's layers are the slices' in order,
  renumbered (ranges may overlap, repeat or leave layers out), the tensors outside the layers come
  from the first slice's sources (embeddings) or the last's (final norm, lm_head), and config.json's
  layer count becomes the sum (the engine's ``slices``, see `umerge.merge` and ``plan.rs``).
  Per-source and per-slice ``parameters`` and gradients are honoured as mergekit resolves them;
  a method that uses the base needs it among every slice's sources;
- ``merge_method``: linear, task_arithmetic, ties (``normalize: false`` too), dare_linear,
  dare_ties, breadcrumbs, breadcrumbs_ties, della, della_linear, slerp, model_stock (``filter_wise``
  too), nuslerp, multislerp, karcher, nearswap, sce, arcee_fusion, ram, ramplus_tl, passthrough
  (each tensor copied from its one model, times ``scale`` where given: one model under ``models:``
  or one source per slice);
- ``base_model``; global ``parameters`` and per-model ``parameters``; filter lists
  (``- filter: mlp`` / ``value: 0.5``, then a default ``- value: ...``; ``filter: "*"`` matches
  everything); gradients (lists interpolated over the layer index);
- ``dtype`` and ``out_dtype`` (the output dtype is ``out_dtype``, else ``dtype``, else the base's);
  umerge always computes in float32 (float64 for float64 inputs), which for bf16/f16 ``dtype`` is
  more precise than mergekit's arithmetic in that dtype;
- ``tokenizer_source``: ``base`` (the default: tokenizer files come from the base) or a model
  path (its tokenizer files are copied over the output's; embeddings are not permuted, so the
  vocabularies must agree).

Model paths are local and, as in mergekit, relative ones are taken from the working directory
(``../base`` is fine): one that does not exist is an `InputError` before anything is read, and
one that looks like a Hub id (``owner/name``) says how to download it (`umerge.merge.require_local`).
mergekit-yaml's command-line flags are the CLI's business (`umerge.cli.mergekit_flags`); two reach
here as keywords: ``random_seed`` (``--random-seed``) and ``out_shard_params`` (``--out-shard-size``).

A config whose ``models:`` are all PEFT LoRA adapter directories is an adapter recipe
(`umerge.adapters.recipe`): merged factor-wise with PEFT's semantics and folded into ``base_model``,
as ``umerge ties A/ B/ --base BASE`` does.

A model written ``MODEL+ADAPTER`` (mergekit's LoRA reference, as ``model``, ``base_model`` or a
slice's source) is the model with the PEFT LoRA adapter folded in: mergekit writes a merged copy
(PEFT's ``merge_and_unload``) and merges that; umerge folds ``W + scaling * B @ A`` inside the
merge as it reads the weight (the spec's ``lora`` / ``base_lora``, `umerge.merge`), so nothing but
the output is written. A path that exists as written is taken literally, ``+`` and all.

Anything else (other keys, ``modules``, ``tokenizer``, ``union`` tokenizers, other methods,
``rescale: true`` on a magnitude-trimming method) is an `InputError` naming it:
never silently ignored. The one thing ignored is what mergekit ignores too: a parameter that some
mergekit method takes but the config's method does not (``weight`` on slerp or model_stock, as
mergekit's own test configs have it) is dropped with a warning naming it, its model and the method
(`ConfigWarning`, or `to_spec`'s ``warn``; `umerge run` prints ``umerge: warning:``). A name no
mergekit method takes stays an error (mergekit would ignore ``wieght`` silently; here it is a typo
caught).

Hostile or broken files fail in one line, quickly, before anything is built (`load_config`): only a
regular file (a FIFO or directory is refused without blocking) of at most 16 MiB, UTF-8, nested at
most 64 levels, at most 100,000 values with YAML aliases expanded (so an alias bomb costs its text,
not 9**9 strings), a mapping with names for keys, at most 1,000 models; a long list of missing or
unreadable models is reported as its first three and a count.

mergekit's defaults are written into the spec explicitly where they differ from umerge's:
``density: 1.0`` for the task-vector methods, ``rescale: l1`` (mergekit's ``rescale: true``) for
DARE and DELLA, ``normalize: true`` for della. The random methods draw umerge's counter-based
masks (``--seed``), not torch's generator: same distribution as mergekit, different draws.
``int8_mask`` only changes mergekit's mask storage type, not the result; it is accepted and dropped.
As in mergekit, linear and karcher take ``base_model`` as one more input when it is not listed
among the models (karcher has no base: it is the mean of all its inputs).

Where parameters vary per tensor (gradients, slices) they are resolved here exactly as mergekit
resolves them — layer i of L sits at t = i / (L - 1) within its slice, tensors outside the layers at
t = 0; a model's own parameters matched against its own tensor names (the source layer), the shared
ones against the output's — and written as filter rules on full output tensor names (longest name
first, so each tensor's own rule is its first match). For that, a sliced config's output tensors are
routed here as the engine's planner routes them (`_sliced_inputs`).

Multi-document configs (mergekit-multi) are `umerge.mergekit_multi`'s: it runs each document
through `run_config`.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import reprlib
import shutil
import stat
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from umerge.errors import InputError
from umerge.merge import DTYPE_NAMES

TOP_KEYS = {"models", "slices", "merge_method", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source"}
UNSUPPORTED_TOP = {"modules", "tokenizer", "chat_template"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json")
RANDOM_METHODS = ("dare_linear", "dare_ties", "della", "della_linear")
TASK_VECTOR = {"task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
               "della", "della_linear"}
# parameters each method takes in mergekit (shared and per model) that umerge maps.
METHOD_PARAMS: dict[str, set[str]] = {
    "linear": {"weight", "normalize"},
    "task_arithmetic": {"weight", "normalize", "lambda", "int8_mask", "density", "rescale"},
    "ties": {"weight", "density", "lambda", "normalize", "int8_mask", "rescale"},
    "dare_linear": {"weight", "density", "lambda", "normalize", "int8_mask", "rescale"},
    "dare_ties": {"weight", "density", "lambda", "normalize", "int8_mask", "rescale"},
    "breadcrumbs": {"weight", "density", "lambda", "normalize", "int8_mask", "rescale", "gamma"},
    "breadcrumbs_ties": {"weight", "density", "lambda", "normalize", "int8_mask", "rescale", "gamma"},
    "della": {"weight", "density", "lambda", "normalize", "int8_mask", "rescale", "epsilon"},
    "della_linear": {"weight", "density", "lambda", "normalize", "int8_mask", "rescale", "epsilon"},
    "slerp": {"t"},
    "model_stock": {"filter_wise"},
    "nuslerp": {"weight", "nuslerp_flatten", "nuslerp_row_wise"},
    "multislerp": {"weight", "normalize_weights", "eps"},
    "karcher": {"max_iter", "tol"},
    "nearswap": {"t"},
    "passthrough": {"scale"},
    "sce": {"select_topk", "int8_mask"},
    "arcee_fusion": set(),
    "ram": {"epsilon"},
    "ramplus_tl": {"r", "alpha", "epsilon"},
}
#: Every parameter name that some merge method of mergekit 0.1.5 takes (the parameters of each method
#: in its registry). mergekit reads only the parameters of the config's method and ignores the rest,
#: and its own test configs set `weight` on slerp and model_stock: such a parameter is dropped with a
#: warning. A name outside this set is refused instead (mergekit would ignore it too, but it is most
#: likely a typo, `wieght`, that would silently change the merge).
MERGEKIT_PARAMS = frozenset({
    "alpha", "density", "eps", "epsilon", "filter_wise", "gamma", "int8_mask", "lambda", "max_iter", "normalize",
    "normalize_weights", "nuslerp_flatten", "nuslerp_row_wise", "r", "rescale", "scale", "select_topk", "t", "tol",
    "weight",
})
#: Methods whose mergekit version merges the base as one more input when it is not listed.
BASE_AS_INPUT = ("linear", "karcher")
#: Methods that need base_model (mergekit's `BasePolicy.REQUIRED`), and those that use it when
#: given (`OPTIONAL`); the others ignore it (in slices, a base listed among the sources is then
#: merged as one more model, as mergekit does).
BASE_REQUIRED = frozenset({*TASK_VECTOR, "slerp", "model_stock", "nearswap", "sce", "arcee_fusion", "ram", "ramplus_tl"})
BASE_OPTIONAL = frozenset({"nuslerp", "multislerp"})
#: Parameters that mergekit resolves per input model (the others are shared by all inputs).
PER_MODEL_KEYS = frozenset({"weight", "density", "gamma", "epsilon", "scale"})
#: Parameters that are one true/false for the whole model, passed to the engine under these names.
FLAGS = {"model_stock": ("filter_wise",), "nuslerp": ("nuslerp_flatten", "nuslerp_row_wise"),
         "multislerp": ("normalize_weights",)}
#: The parts of a tensor name that precede its layer number (`model.layers.12.mlp...`).
LAYER_WORDS = ("layers", "h", "blocks", "layer", "block")


class ConfigWarning(UserWarning):
    """A config setting that umerge ignores as mergekit does (a parameter the method does not use)."""


@dataclass(frozen=True)
class Source:
    """One input model with its own parameter settings (highest precedence first)."""

    path: str
    settings: tuple[Mapping[str, Any], ...]


#: Limits on what a config may be, all far above any real mergekit config (a few KiB, a few hundred
#: values, nested under ten levels) and all checked before anything is built from the YAML, so a
#: hostile or mistaken file costs milliseconds and one line, not minutes or a crash.
MAX_CONFIG_BYTES = 16 * 2**20
#: Nesting levels (mappings and lists inside each other); Python's own recursion gives out near 1,000.
MAX_DEPTH = 64
#: Values (scalars, mappings and lists) once aliases are expanded: bounds "billion laughs" configs,
#: whose text is small but whose aliases expand to 9**9 values.
MAX_NODES = 100_000
#: Models in `models:` (or sources in one slice). mergekit has no limit; umerge checks each input
#: before merging, and a longer list is a generated file gone wrong rather than a merge.
MAX_MODELS = 1_000
#: How many problems with the models one error line lists before "and N more".
SHOWN_PROBLEMS = 3

# Values from a config in error messages: short, escaped, one line, however big or deep the value.
_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlevel = 120, 60, 3


def _show(value: Any) -> str:
    """A config value as an error message shows it (YAML's words for null and the flags)."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return _REPR.repr(value)


def _key(path: str) -> str:
    """A path's identity for comparing model references."""
    return os.path.realpath(path)


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Reads a YAML config file into a dict; an InputError when it cannot be one (see `parse_config`)."""
    p = os.fspath(path)
    return parse_config(_config_text(p), p)


def load_documents(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Reads a YAML file of one or more documents (separated by ``---``, as mergekit-multi takes
    them) into one dict each, with the checks of `parse_config`."""
    p = os.fspath(path)
    return parse_documents(_config_text(p), p)


def _config_text(p: str) -> str:
    """The text of a config file (`_read_config_file`), which must be UTF-8."""
    raw = _read_config_file(p)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise InputError(f"config is not UTF-8 text: byte 0x{raw[exc.start]:02x} on line {line} "
                         f"(save it as UTF-8, as mergekit reads it) ({p})") from None


def _read_config_file(p: str) -> bytes:
    """The bytes of a regular file of at most MAX_CONFIG_BYTES. A directory, or a FIFO (whose read
    would block until something writes to it) or a device, is refused by `fstat` on a descriptor
    opened without blocking, so the file checked is the file read."""
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        if exc.errno == errno.EISDIR:
            raise InputError(f"config is a directory, not a YAML file ({p})") from None
        raise InputError(f"cannot read config: {exc.strerror} ({p})") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise InputError(f"config is a directory, not a YAML file ({p})")
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"config is not a regular file (a FIFO, socket or device): give a YAML file ({p})")
        if st.st_size > MAX_CONFIG_BYTES:
            raise InputError(f"config is {st.st_size / 2**20:.1f} MiB, more than umerge run reads "
                             f"({MAX_CONFIG_BYTES // 2**20} MiB; a mergekit config is a few KiB) ({p})")
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)  # +1: a file that grew since fstat is still caught
    except OSError as exc:
        raise InputError(f"cannot read config: {exc.strerror} ({p})") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_CONFIG_BYTES:
        raise InputError(f"config is more than {MAX_CONFIG_BYTES // 2**20} MiB, more than umerge run reads ({p})")
    return raw


def parse_config(text: str, where: str = "config") -> dict[str, Any]:
    """A YAML config's text as a dict: an InputError for YAML that is invalid, too deep or too big
    (`_check_shape`, before anything is built), or that is not a mapping."""
    docs = parse_documents(text, where)
    if len(docs) != 1:
        raise InputError(f"config has {len(docs)} YAML documents (separated by ---) where one is expected ({where})")
    return docs[0]


def parse_documents(text: str, where: str = "config") -> list[dict[str, Any]]:
    """Every document of a YAML text (one, or several separated by ``---``) as a dict, with the
    checks of `parse_config` (the shape limits count the whole text)."""
    import yaml

    # libyaml's parser when PyYAML has it: about 15 times faster than the pure-Python one, which
    # reads the same YAML where it is missing.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    _check_shape(text, where, loader)
    try:
        docs = list(yaml.load_all(text, Loader=loader))  # noqa: S506 - a safe loader (CSafeLoader or SafeLoader)
    except yaml.YAMLError as exc:
        raise InputError(f"invalid YAML: {_yaml_problem(exc)} ({where})") from None
    except Exception as exc:  # noqa: BLE001
        # PyYAML's constructors let the value's own errors through: `!!int x` is a ValueError,
        # `2020-13-45` (a date) another, a bad `!!timestamp` an AttributeError. The text is the
        # cause of any of them, so each is the user's error, said in one line.
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"invalid YAML: a value cannot be read ({first}) ({where})") from None
    if not docs or all(d is None for d in docs):
        raise InputError(f"config is empty: a mergekit config is a YAML mapping with merge_method and models: "
                         f"or slices: ({where})")
    for i, data in enumerate(docs):
        which = f"document {i + 1} of " if len(docs) > 1 else ""
        if data is None:
            raise InputError(f"{which}{where} is empty: remove the extra --- or give it a config")
        if not isinstance(data, dict):
            kind = "a list" if isinstance(data, list) else f"a single value ({_show(data)})"
            raise InputError(f"a mergekit config must be a mapping of keys (merge_method: ..., models: ...), "
                             f"got {kind} ({which}{where})")
    return docs


def _yaml_problem(exc: Exception) -> str:
    """PyYAML's error in one line: the problem and where it is (its own text spans several lines)."""
    # PyYAML's parts read as one sentence: "while constructing a mapping" + "found unhashable key".
    parts = [getattr(exc, "context", None), getattr(exc, "problem", None)]
    problem = ", ".join(p for p in parts if p) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return " ".join(f"{problem}{_at(mark)}".split())


def _at(mark: Any) -> str:
    """` at line L, column C` of a YAML mark (parser events and errors carry one), or nothing."""
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _check_shape(text: str, where: str, loader: Any) -> None:
    """Refuses YAML nested deeper than MAX_DEPTH or holding more than MAX_NODES values once its
    aliases are expanded, and aliases of a value inside itself, from the parser's events alone.

    Nothing is built and nothing recurses: each alias counts the size and height its anchor had when
    it closed, so a billion-laughs config is refused at the cost of its text, a config 5,000 levels
    deep stops at level MAX_DEPTH, and a list of 200,000 models at the MAX_NODES-th value."""
    import yaml

    total = 0  # values so far, aliases expanded
    # Each open mapping or list: [its anchor, `total` when it opened, the height of its tallest child].
    stack: list[list[Any]] = []
    anchors: dict[str, tuple[int, int]] = {}  # anchor -> (values once expanded, height)

    def add(size: int, height: int, mark: Any) -> None:
        nonlocal total
        total += size
        if total > MAX_NODES:
            raise InputError(f"config has more than {MAX_NODES} values (aliases expanded; a mergekit config has a "
                             f"few hundred), refused{_at(mark)} ({where})")
        if len(stack) + height > MAX_DEPTH:
            raise InputError(f"config nests more than {MAX_DEPTH} levels deep{_at(mark)} "
                             f"(a mergekit config nests a few) ({where})")
        if stack:
            stack[-1][2] = max(stack[-1][2], height)

    try:
        for ev in yaml.parse(text, Loader=loader):
            if isinstance(ev, yaml.CollectionStartEvent):
                add(1, 1, ev.start_mark)
                stack.append([ev.anchor, total - 1, 0])
            elif isinstance(ev, yaml.CollectionEndEvent):
                anchor, start, child_height = stack.pop()
                if stack:
                    stack[-1][2] = max(stack[-1][2], child_height + 1)
                if anchor is not None:
                    anchors[anchor] = (total - start, child_height + 1)
            elif isinstance(ev, yaml.ScalarEvent):
                add(1, 1, ev.start_mark)
                if ev.anchor is not None:
                    anchors[ev.anchor] = (1, 1)
            elif isinstance(ev, yaml.AliasEvent):
                if any(entry[0] == ev.anchor for entry in stack):
                    raise InputError(f"invalid YAML: alias *{ev.anchor}{_at(ev.start_mark)} is inside the value "
                                     f"it names (a value that contains itself) ({where})")
                # An unknown anchor counts as one value here; composing the YAML then says it is undefined.
                size, height = anchors.get(str(ev.anchor), (1, 1))
                add(size, height, ev.start_mark)
    except yaml.YAMLError as exc:
        raise InputError(f"invalid YAML: {_yaml_problem(exc)} ({where})") from None


#: Control characters (newline, NUL, ...): no real model path has one, a NUL cannot be passed to the
#: operating system at all, and a newline would break the one-line error that names the path.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _model_ref(value: Any, where: str) -> str:
    """A model reference as a path. Relative paths are kept as written and, as in mergekit, taken
    from the working directory (so `../base` is legal); a missing one is reported later, by name."""
    if isinstance(value, dict) and set(value) == {"model"}:  # the {model: {model: path}} form
        value = value["model"]
    if isinstance(value, dict) and set(value) <= {"path", "revision"} and "path" in value and not value.get("revision"):
        value = value["path"]
    if not isinstance(value, str) or not value:
        raise InputError(f"{where}: a model must be a local path, got {_show(value)}")
    if _CONTROL.search(value):
        raise InputError(f"{where}: a model path with a control character (newline, tab, NUL) is not supported: "
                         f"{_show(value)}")
    if "+" in value and not os.path.exists(value):
        parts = value.split("+")
        if len(parts) != 2 or not all(parts):
            raise InputError(f"{where}: a LoRA reference is MODEL+ADAPTER, two paths joined by one '+': {_show(value)}")
    return value


def split_lora(ref: str) -> tuple[str, str | None]:
    """mergekit's ``model+lora`` reference -> (model path, adapter path); a plain path -> (path, None).
    A path that exists as written is taken literally (a directory may have '+' in its name)."""
    if "+" not in ref or os.path.exists(ref):
        return ref, None
    model, _, lora = ref.partition("+")
    return model, lora


def _add_lora_refs(spec: dict[str, Any], models: Sequence[str], base: str | None) -> None:
    """Gives the spec's models (built from the model parts of `models` and `base`) the ``lora`` their
    ``model+lora`` reference names (``base_lora`` for the base), which the engine folds in as it
    reads: W + scaling * B @ A, no merged copy written."""
    from umerge.adapters.folding import fold_entry

    for m, ref in zip(spec["models"], models):
        lora = split_lora(ref)[1]
        if lora is not None:
            m["lora"] = fold_entry(lora)
    lora = split_lora(base)[1] if base is not None and spec.get("base") is not None else None
    if lora is not None:
        spec["base_lora"] = fold_entry(lora)


def _check_keys(d: Mapping[Any, Any], allowed: set[str], where: str) -> None:
    # YAML keys may be numbers, null, flags or dates (`1: x`, `null: x`): mergekit's keys are names.
    odd = [k for k in d if not isinstance(k, str)]
    if odd:
        raise InputError(f"key {_show(odd[0])} in {where} is not a name (umerge supports: {', '.join(sorted(allowed))})")
    extra = [k for k in d if k not in allowed]
    if extra:
        raise InputError(f"unsupported key {_show(extra[0])} in {where} (umerge supports: {', '.join(sorted(allowed))})")


# ---- parameter settings -------------------------------------------------------------------

def _scalar(v: Any, key: str, where: str) -> Any:
    if isinstance(v, bool) or isinstance(v, float):
        return v
    if isinstance(v, int):
        # YAML integers have no size limit; the engine's numbers are floats (mergekit's too).
        try:
            float(v)
        except OverflowError:
            raise InputError(f"parameter {key} in {where}: {_show(v)} is too large for a number") from None
        return v
    if isinstance(v, str):
        try:
            return float(v)  # YAML "1e-3" is a string; mergekit validates it to a number
        except ValueError:
            return v
    raise InputError(f"parameter {key} in {where}: {_show(v)} is not a number, word or flag")


def _normalize_setting(v: Any, key: str, where: str) -> Any:
    """A mergekit setting in a canonical form: scalar, gradient (list) or rules (list of dicts)."""
    if isinstance(v, dict):
        v = [v]
    if isinstance(v, list):
        if not v:
            raise InputError(f"parameter {key} in {where}: empty list")
        if all(isinstance(e, dict) for e in v):
            rules = []
            for e in v:
                _check_keys(e, {"filter", "value"}, f"a filter rule of parameter {key} in {where}")
                if "value" not in e:
                    raise InputError(f"a filter rule of parameter {key} in {where} has no value")
                f = e.get("filter")
                if f is not None and not isinstance(f, str):
                    raise InputError(f"parameter {key} in {where}: filter {_show(f)} is not a string")
                val = e["value"]
                if isinstance(val, list) and not val:
                    raise InputError(f"a filter rule of parameter {key} in {where} has an empty list as its value")
                val = [_scalar(x, key, where) for x in val] if isinstance(val, list) else _scalar(val, key, where)
                rules.append({"filter": None if f in (None, "*") else f, "value": val})
            return rules
        if any(isinstance(e, (dict, list)) for e in v):
            raise InputError(f"parameter {key} in {where}: mixes filter rules with plain values")
        return [_scalar(e, key, where) for e in v]
    return _scalar(v, key, where)


def _is_rules(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and isinstance(v[0], dict)


def _has_gradient(v: Any) -> bool:
    if _is_rules(v):
        return any(isinstance(r["value"], list) for r in v)
    return isinstance(v, list)


def _interp(values: list[Any], t: float) -> Any:
    """mergekit's gradient: numbers interpolate linearly, other values pick an entry."""
    if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in values):
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def evaluate(setting: Any, name: str, t: float) -> Any:
    """The value of a canonical setting for tensor `name` at layer position `t`; None when no rule matches."""
    if _is_rules(setting):
        for r in setting:
            if r["filter"] is None or r["filter"] in name:
                return _interp(r["value"], t) if isinstance(r["value"], list) else r["value"]
        return None
    if isinstance(setting, list):
        return _interp(setting, t)
    return setting


def _to_engine(v: Any) -> Any:
    """A canonical setting in the engine's form (rules without a filter drop the key)."""
    if _is_rules(v):
        return [({"filter": r["filter"]} if r["filter"] is not None else {}) | {"value": r["value"]} for r in v]
    return v


# ---- tensor names and layer positions -------------------------------------------------------

def tensor_names(paths: Sequence[str]) -> list[str]:
    """Union of tensor names of the checkpoints (headers only)."""
    from umerge.merge import inspect

    names: list[str] = []
    seen: set[str] = set()
    for p in paths:
        p = split_lora(p)[0]  # a LoRA changes values, not names
        info = inspect(p)
        if not info.get("valid", False):
            raise InputError(f"cannot read checkpoint: {info.get('error', 'invalid')} ({p})")
        for t in info["tensors"]:
            if t["name"] not in seen:
                seen.add(t["name"])
                names.append(t["name"])
    return names


def _layer_part(name: str) -> tuple[int, int] | None:
    """(position among the dot-separated parts, value) of a tensor name's layer number: the first
    part that is a number right after one of LAYER_WORDS (the engine's `params::layer_index`)."""
    parts = name.split(".")
    for k in range(len(parts) - 1):
        if parts[k] in LAYER_WORDS and parts[k + 1].isascii() and parts[k + 1].isdigit():
            return k + 1, int(parts[k + 1])
    return None


def layer_of(name: str) -> int | None:
    """The layer number of a tensor name (`model.layers.12.mlp.up_proj.weight` -> 12), or None."""
    found = _layer_part(name)
    return found[1] if found else None


def with_layer(name: str, layer: int) -> str:
    """The same tensor name in layer `layer` (the name itself when it is outside the layers)."""
    found = _layer_part(name)
    if found is None:
        return name
    parts = name.split(".")
    parts[found[0]] = str(layer)
    return ".".join(parts)


# ---- the translation ------------------------------------------------------------------------

@dataclass(frozen=True)
class SliceSource:
    """One source of a slice: layers [start, end) of a model, with its own parameter settings."""

    path: str
    start: int
    end: int
    settings: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True)
class Slice:
    """One output slice: its sources (the same number of layers each) and its own parameters."""

    sources: tuple[SliceSource, ...]
    settings: tuple[Mapping[str, Any], ...]

    @property
    def length(self) -> int:
        return self.sources[0].end - self.sources[0].start


@dataclass
class Translation:
    """A config turned into engine terms."""

    method: str
    base: str | None
    models: list[Source]
    global_params: dict[str, Any]
    slices: list[Slice]
    out_dtype: str | None
    tokenizer_source: str | None
    #: One line per parameter of the config that the method does not use (dropped, as mergekit does).
    warnings: list[str]


def _params_of(d: Any, where: str, method: str, ignored: list[str], model: str | None = None) -> dict[str, Any]:
    """The parameters of one level of a config (global, a slice, or the model `model`) in canonical
    form. A known mergekit parameter that `method` does not take is dropped with a warning, as
    mergekit ignores it; any other name is refused (see MERGEKIT_PARAMS)."""
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise InputError(f"parameters in {where} must be a mapping")
    allowed = METHOD_PARAMS[method]
    out = {}
    for k, v in d.items():
        if not isinstance(k, str):
            raise InputError(f"parameter name {_show(k)} in {where} is not a name (merge_method {method} takes: "
                             f"{', '.join(sorted(allowed))})")
        if k in allowed:
            out[k] = _normalize_setting(v, k, where)
        elif k in MERGEKIT_PARAMS:
            of = f"of model {model} ({where})" if model is not None else f"in {where}"
            ignored.append(f"parameter {k} {of} is not used by merge_method {method}: ignored, as mergekit does")
        else:
            raise InputError(f"merge_method {method} has no parameter {_show(k)} in mergekit "
                             f"(it takes: {', '.join(sorted(allowed))})")
    return out


def translate(config: Mapping[str, Any], where: str = "config") -> Translation:
    """Checks a config and collects its models, settings and options (no file access)."""
    if not isinstance(config, Mapping):
        raise InputError(f"a mergekit config must be a mapping of keys, got {_show(config)} ({where})")
    for k in config:
        if k in UNSUPPORTED_TOP and config[k] is not None:
            raise InputError(f"unsupported key {k!r} in {where}: umerge runs models: or slices: configs "
                             "with tokenizer_source base or a model")
    _check_keys({k: v for k, v in config.items() if not (k in UNSUPPORTED_TOP and v is None)}, TOP_KEYS, where)
    method = config.get("merge_method")
    if not isinstance(method, str):
        raise InputError(f"merge_method is missing in {where}")
    if method not in METHOD_PARAMS:
        known = ", ".join(sorted(METHOD_PARAMS))
        raise InputError(f"merge_method {_show(method)} is not supported by umerge run (supported: {known})")
    ignored: list[str] = []  # warnings: parameters the method does not use
    base = _model_ref(config["base_model"], "base_model") if config.get("base_model") is not None else None
    global_params = _params_of(config.get("parameters"), "parameters", method, ignored)

    has_models, has_slices = config.get("models") is not None, config.get("slices") is not None
    if has_models == has_slices:
        raise InputError(f"{where} must have exactly one of models: or slices:")
    slices: list[Any] = []
    models: list[Source] = []
    if has_models:
        if not isinstance(config["models"], list) or not config["models"]:
            raise InputError("models: must be a non-empty list")
        _check_count(len(config["models"]), "models:")
        for i, m in enumerate(config["models"]):
            w = f"models[{i}]"
            if not isinstance(m, dict):
                raise InputError(f"{w} must be a mapping with a model key")
            _check_keys(m, {"model", "parameters"}, w)
            path = _model_ref(m.get("model"), w)
            models.append(Source(path, (_params_of(m.get("parameters"), w, method, ignored, path),)))
    else:
        models, slices = _translate_slices(config["slices"], base, method, ignored)

    out = config.get("out_dtype") or config.get("dtype")
    out_dtype = None
    for dtype in (out, config.get("dtype")):
        if dtype is not None and not (isinstance(dtype, str) and dtype in DTYPE_NAMES):
            raise InputError(f"unsupported dtype {_show(dtype)} (use float32, bfloat16 or float16)")
    if out is not None:
        out_dtype = DTYPE_NAMES[out]
    tok = config.get("tokenizer_source")
    if tok is not None:
        if tok == "union":
            raise InputError("tokenizer_source: union is not supported (use base or a model path)")
        tok = "base" if tok == "base" else _model_ref(tok, "tokenizer_source")
    return Translation(method, base, models, global_params, slices, out_dtype, tok, ignored)


def _check_count(n: int, what: str) -> None:
    if n > MAX_MODELS:
        raise InputError(f"{what} lists {n} models; umerge run takes at most {MAX_MODELS} "
                         "(a merge of more is almost certainly a generated config gone wrong)")


def _translate_slices(slices: Any, base: str | None, method: str,
                      ignored: list[str]) -> tuple[list[Source], list[Slice]]:
    """The slices of a config (mergekit's output slices) and every model they name, in order of
    first appearance. Checked here without reading files: each source a model and a
    ``layer_range`` [start, end) with 0 <= start < end, every source of a slice the same number
    of layers and a different model, one source per slice for passthrough (mergekit's passthrough
    merges a single input per tensor). Whether the ranges fit the models is `to_spec`'s check."""
    if not isinstance(slices, list) or not slices:
        raise InputError("slices: must be a non-empty list")
    out: list[Slice] = []
    order: dict[str, str] = {}  # model key -> path, in order of first appearance
    for si, s in enumerate(slices):
        w = f"slices[{si}]"
        if not isinstance(s, dict):
            raise InputError(f"{w} must be a mapping with sources")
        _check_keys(s, {"sources", "parameters", "base_model"}, w)
        if s.get("base_model") is not None and _model_ref(s["base_model"], f"{w}.base_model") != base:
            raise InputError(f"{w}.base_model differs from base_model: per-slice bases are not supported")
        srcs = s.get("sources")
        if not isinstance(srcs, list) or not srcs:
            raise InputError(f"{w}.sources must be a non-empty list")
        _check_count(len(srcs), f"{w}.sources")
        if method == "passthrough" and len(srcs) != 1:
            raise InputError(f"{w} has {len(srcs)} sources: passthrough copies each tensor from one model, so a "
                             "slice takes one source (mergekit's passthrough takes a single input)")
        sources = []
        for j, src in enumerate(srcs):
            ws = f"{w}.sources[{j}]"
            if not isinstance(src, dict):
                raise InputError(f"{ws} must be a mapping")
            _check_keys(src, {"model", "layer_range", "parameters"}, ws)
            path = _model_ref(src.get("model"), ws)
            lr = src.get("layer_range")
            if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                  for x in lr)):
                raise InputError(f"{ws}.layer_range must be [start, end), two layer numbers, got {_show(lr)}")
            if lr[0] < 0 or lr[0] >= lr[1]:
                raise InputError(f"{ws}.layer_range {_show(lr)} is reversed or empty: give [start, end) with "
                                 "0 <= start < end (layers start to end - 1)")
            settings = (_params_of(src.get("parameters"), ws, method, ignored, path),)
            sources.append(SliceSource(path, lr[0], lr[1], settings))
            order.setdefault(_key(path), path)
        keys = [_key(x.path) for x in sources]
        if len(set(keys)) != len(keys):
            raise InputError(f"{w}: a model appears twice in one slice (each slice takes each model once)")
        lengths = {x.end - x.start for x in sources}
        if len(lengths) != 1:
            raise InputError(f"{w}: its sources take {' and '.join(str(n) for n in sorted(lengths))} layers: every "
                             "source of a slice must take the same number of layers (as mergekit requires)")
        out.append(Slice(tuple(sources), (_params_of(s.get("parameters"), w, method, ignored),)))
    return [Source(p, ()) for p in order.values()], out


@dataclass(frozen=True)
class _Route:
    """Where one output tensor of a sliced merge comes from: its slice (whose parameters apply),
    its position t there (mergekit's: layer i of a slice of L layers at i / (L - 1), 1 for a
    slice of one layer, 0 outside the layers), and the name each model taking part (by index)
    holds it under."""

    slice: int
    t: float
    sources: dict[int, str]


def _tensor_order(path: str) -> list[str]:
    """The tensor names of a checkpoint (its header only)."""
    from umerge.merge import inspect

    path = split_lora(path)[0]
    info = inspect(path)
    if not info.get("valid", False):
        raise InputError(f"cannot read checkpoint: {info.get('error', 'invalid')} ({path})")
    return [t["name"] for t in info["tensors"]]


def _sliced_inputs(tr: Translation) -> tuple[list[Source], str | None, list[dict[str, Any]], dict[str, _Route]]:
    """A sliced config in engine terms: the models (each once, in order of first appearance; the
    base apart when the method uses one), the base, the spec's slices, and every output tensor's
    route, worked out as the engine's planner does (`plan.rs`): output layer j of a slice takes
    layer start + (j - the slice's first output layer) of each source; the tensors outside the
    layers come from the first slice's sources, or from the last's when they sit after the layers."""
    method = tr.method
    base = tr.base if tr.base is not None and method in BASE_REQUIRED | BASE_OPTIONAL else None
    base_key = _key(base) if base is not None else None
    models: list[Source] = []
    index: dict[str, int] = {}
    orders: dict[str, list[str]] = {}
    for sl in tr.slices:
        for x in sl.sources:
            k = _key(x.path)
            if k != base_key and k not in index:
                index[k] = len(models)
                models.append(Source(x.path, ()))
            if k not in orders:
                orders[k] = _tensor_order(x.path)
    by_layer: dict[str, dict[int, list[str]]] = {}
    for k, order in orders.items():
        layers: dict[int, list[str]] = {}
        for n in order:
            i = layer_of(n)
            if i is not None:
                layers.setdefault(i, []).append(n)
        by_layer[k] = layers

    spec_slices: list[dict[str, Any]] = []
    for si, sl in enumerate(tr.slices):
        if base_key is not None and base_key not in [_key(x.path) for x in sl.sources]:
            why = "merges task vectors from the base" if method in BASE_REQUIRED else "uses the base_model given"
            raise InputError(f"slices[{si}] does not list base_model {base} among its sources: {method} {why}, so "
                             "the base must be in every slice (as mergekit requires)")
        entry: dict[str, Any] = {"sources": []}
        for j, x in enumerate(sl.sources):
            have = max(by_layer[_key(x.path)], default=-1) + 1
            if x.end > have:
                raise InputError(f"slices[{si}].sources[{j}].layer_range [{x.start}, {x.end}] goes past the {have} "
                                 f"layers of {x.path} (layers 0 to {have - 1})")
            if _key(x.path) == base_key:
                entry["base_layer_range"] = [x.start, x.end]
            else:
                entry["sources"].append({"model": index[_key(x.path)], "layer_range": [x.start, x.end]})
        if not entry["sources"]:
            raise InputError(f"slices[{si}] takes only the base: give it at least one other model")
        spec_slices.append(entry)

    routes: dict[str, _Route] = {}

    def taking_part(sl: Slice) -> list[tuple[SliceSource, int | None]]:
        """The slice's sources with their model index (None for the base)."""
        return [(x, None if _key(x.path) == base_key else index[_key(x.path)]) for x in sl.sources]

    def outside(si: int, after: bool) -> None:
        ins = taking_part(tr.slices[si])
        for x, _ in ins:
            for n in orders[_key(x.path)]:
                if layer_of(n) is None and _after_layers(n) == after and n not in routes:
                    routes[n] = _Route(si, 0.0, {m: n for _, m in ins if m is not None})

    outside(0, False)
    out_layer = 0
    for si, sl in enumerate(tr.slices):
        ins = taking_part(sl)
        for offset in range(sl.length):
            t = offset / (sl.length - 1) if sl.length > 1 else 1.0
            for x, _ in ins:
                for n in by_layer[_key(x.path)].get(x.start + offset, []):
                    out = with_layer(n, out_layer)
                    if out not in routes:
                        routes[out] = _Route(si, t, {m: with_layer(out, y.start + offset) for y, m in ins
                                                     if m is not None})
            out_layer += 1
    outside(len(tr.slices) - 1, True)
    return models, base, spec_slices, routes


def _method_and_params(tr: Translation) -> tuple[str, dict[str, Any]]:
    """The umerge method and the mergekit defaults that must be made explicit."""
    method = tr.method
    defaults: dict[str, Any] = {}
    if method in TASK_VECTOR:
        defaults["density"] = 1.0
    if method.startswith("breadcrumbs"):
        defaults["gamma"] = 0.01
    if method.startswith("della"):
        defaults["epsilon"] = 0.15
    return method, defaults


def _all_settings(tr: Translation) -> list[Mapping[str, Any]]:
    out: list[Mapping[str, Any]] = [tr.global_params]
    for m in tr.models:
        out.extend(m.settings)
    for sl in tr.slices:
        out.extend(sl.settings)
        for src in sl.sources:
            out.extend(src.settings)
    return out


def to_spec(config: Mapping[str, Any], out: str | os.PathLike[str], *, where: str = "config",
            seed: int | None = None, random_seed: int | None = None, out_shard_params: int | None = None,
            warn: Callable[[str], None] | None = None, **options: Any) -> tuple[dict[str, Any], str | None]:
    """The engine spec for a config, and the tokenizer source model to copy from (or None).

    `seed` seeds the random methods and is an error for the others; `random_seed` is mergekit's
    `--random-seed`: the same seed, unused by methods that draw nothing (as in mergekit).
    `out_shard_params` is mergekit's `--out-shard-size`, parameters per shard (see `shard_bytes`).
    `warn` receives one line per parameter the method does not use (default: a `ConfigWarning`).
    `options` go to `umerge.merge.build_spec` (threads, memory_budget, overwrite, ...).
    """
    from umerge.merge import build_spec, require_local

    tr = translate(config, where)
    for line in tr.warnings:
        if warn is not None:
            warn(line)
        else:
            warnings.warn(line, ConfigWarning, stacklevel=2)
    # umerge reads local checkpoints only; a Hub id gets told how to download it. Each distinct
    # path is checked once, and a long list of missing models is one short line (_problems).
    point = "point the config at DIR"
    refs = [(tr.base, "base_model")] if tr.base is not None else []
    refs += [(m.path, "model") for m in tr.models]
    refs = [(part, what if i == 0 else "LoRA adapter") for ref, what in refs
            for i, part in enumerate(split_lora(ref)) if part is not None]
    if tr.tokenizer_source not in (None, "base"):
        refs.append((str(tr.tokenizer_source), "tokenizer_source"))
    first_label: dict[str, str] = {}
    for path, what in refs:
        first_label.setdefault(path, what)
    missing = []
    for path, what in first_label.items():
        try:
            require_local(path, what, point)
        except InputError as exc:
            missing.append(str(exc))
    _problems(missing, "paths in the config do not exist")
    if out_shard_params is not None and options.get("max_shard_size") is not None:
        raise InputError("--out-shard-size (parameters per shard) and --max-shard-size (bytes) both given: give one")
    keys = {k for s in _all_settings(tr) for k in s}  # translate kept only the method's parameters

    method = tr.method
    if method in BASE_REQUIRED and tr.base is None:
        raise InputError(f"{method} needs base_model in the config")
    # Per tensor: who takes part (model index -> the name it holds the tensor under), which slice
    # gives its parameters and its position t (see `_Route`).
    routes: dict[str, _Route] = {}
    spec_slices: list[dict[str, Any]] = []
    if tr.slices:
        models, base, spec_slices, routes = _sliced_inputs(tr)
        groups = [[x for x in sl.sources if base is None or _key(x.path) != _key(base)] for sl in tr.slices]
        counts = [len(g) for g in groups]
    else:
        models = list(tr.models)
        base = tr.base
        # linear, karcher: mergekit merges the base as one more input when it is not listed.
        if method in BASE_AS_INPUT and base is not None:
            if _key(base) not in [_key(m.path) for m in models]:
                models.append(Source(base, ()))
            base = None
        elif method == "passthrough" and base is not None:
            # mergekit adds a base that is not listed as one more input, which passthrough refuses.
            if _key(base) not in [_key(m.path) for m in models]:
                raise InputError(f"passthrough copies one model, but base_model {base} is not it: mergekit would "
                                 "merge it as a second input (drop base_model, or make it the model)")
            base = None
        elif base is not None:
            models = [m for m in models if _key(m.path) != _key(base)]  # the base listed among models is the base
        counts = [len(models)]
    if method == "passthrough" and not tr.slices and len(models) != 1:
        raise InputError(f"passthrough copies one model, got {len(models)} in models: (use slices: with one source "
                         "each to stack the layers of several)")
    for n in counts:
        if method in ("slerp", "nearswap", "arcee_fusion") and n != 1:
            raise InputError(f"{method} takes base_model and exactly one other model, got {n} others"
                             + (" in a slice" if tr.slices else ""))
        if method == "nuslerp" and n != 2:
            raise InputError(f"nuslerp takes exactly two models besides base_model, got {n}"
                             + (" in a slice" if tr.slices else ""))

    per_tensor = bool(tr.slices) or any(_has_gradient(v) for s in _all_settings(tr) for v in s.values())
    names: list[str] = list(routes)
    n_layers = 0
    if per_tensor and not tr.slices:
        names = tensor_names([p for p in ([tr.base] if tr.base else []) + [m.path for m in models]])
        idx = [layer_of(n) for n in names]
        n_layers = max((i for i in idx if i is not None), default=-1) + 1

    # Settings in precedence order for a model (or None = shared) and a tensor, the tensor's
    # position t, and the name a filter is matched against: mergekit matches the parameters of
    # an input against the input's own tensor name (its layer before renumbering), the shared
    # ones against the output's. None when the model takes no part in the tensor.
    def chain(model: int | None, name: str) -> tuple[tuple[Mapping[str, Any], ...], float, str] | None:
        if tr.slices:
            route = routes[name]
            sl = tr.slices[route.slice]
            if model is None:
                return (*sl.settings, tr.global_params), route.t, name
            at = route.sources.get(model)
            if at is None:
                return None
            key = _key(models[model].path)
            mine = next((x.settings for x in sl.sources if _key(x.path) == key), ())
            return (*mine, *sl.settings, tr.global_params), route.t, at
        layer = layer_of(name)
        t = 0.0 if layer is None else (layer / (n_layers - 1) if n_layers > 1 else 1.0)
        mine = models[model].settings if model is not None else ()
        return (*mine, tr.global_params), t, name

    def resolve(key: str, model: int | None) -> Any:
        """The engine value of `key` for a model (or shared), or None when nothing sets it."""
        if per_tensor:
            pairs = []
            taking_part = 0
            for n in names:
                link = chain(model, n)
                if link is None:
                    continue
                taking_part += 1
                settings, t, at = link
                for s in settings:
                    if key in s:
                        v = evaluate(s[key], at, t)
                        if v is not None:
                            pairs.append((n, v))
                            break
            if not pairs:
                return None
            # One value wherever the model takes part (the engine applies a model's parameters
            # only to the tensors it takes part in): a scalar.
            if len({json.dumps(v) for _, v in pairs}) == 1 and len(pairs) == taking_part:
                return pairs[0][1]
            pairs.sort(key=lambda p: -len(p[0]))
            return [{"filter": n, "value": v} for n, v in pairs]
        settings = (*(models[model].settings if model is not None else ()), tr.global_params)
        found = [s[key] for s in settings if key in s]
        if not found:
            return None
        v = found[0]
        # A rule list that may match nothing falls through to the next level, as in mergekit.
        if _is_rules(v) and all(r["filter"] is not None for r in v) and len(found) > 1:
            rest = found[1]
            v = v + (rest if _is_rules(rest) else [{"filter": None, "value": rest}])
        return _to_engine(v)

    method, defaults = _method_and_params(tr)
    per_model_keys = PER_MODEL_KEYS
    global_params: dict[str, Any] = {}
    for k in sorted(keys - per_model_keys):
        v = resolve(k, None)
        if v is not None:
            global_params[k] = v
    model_params: list[dict[str, Any]] = []
    for i in range(len(models)):
        mp: dict[str, Any] = {}
        for k in sorted(keys & per_model_keys):
            v = resolve(k, i) if i < len(models) and (models[i].settings or tr.slices) else None
            if v is None and not tr.slices:
                # (a sliced model's chain already holds the slice's and the global settings, at the
                # model's own tensor names; the shared ones would only add tensors it is not part of)
                v = resolve(k, None)
            if v is not None:
                mp[k] = v
        model_params.append(mp)
    # Per-model values equal for every model become global (a shorter recipe).
    for k in sorted(keys & per_model_keys):
        vals = [json.dumps(mp.get(k)) for mp in model_params]
        if len(set(vals)) == 1 and model_params and k in model_params[0]:
            global_params[k] = model_params[0][k]
            for mp in model_params:
                mp.pop(k, None)
    for k, v in defaults.items():
        if k in global_params:
            continue
        if any(k in mp for mp in model_params):
            for mp in model_params:
                mp.setdefault(k, v)
        else:
            global_params[k] = v

    method, global_params, model_params = _map_method(method, global_params, model_params)
    if random_seed is not None:
        if seed is not None and seed != random_seed:
            raise InputError(f"--seed {seed} and --random-seed {random_seed} disagree (give one)")
        seed = random_seed if method in RANDOM_METHODS else seed
    if seed is not None:
        if method not in RANDOM_METHODS:
            raise InputError(f"--seed applies to random methods ({', '.join(RANDOM_METHODS)}), not {method}")
        global_params["seed"] = int(seed)
    out_dtype = options.pop("out_dtype", None) or tr.out_dtype  # the command line wins over the config
    spec_base = base if method not in BASE_AS_INPUT else None
    spec = build_spec(method, [split_lora(m.path)[0] for m in models],
                      base=split_lora(spec_base)[0] if spec_base is not None else None,
                      params=global_params, model_params=model_params, out=out, out_dtype=out_dtype, **options)
    if spec_slices:
        spec["slices"] = spec_slices
    _add_lora_refs(spec, [m.path for m in models], spec_base)
    if out_shard_params is not None:
        spec["max_shard_size"] = shard_bytes(out_shard_params, spec)
    tok = tr.tokenizer_source if tr.tokenizer_source not in (None, "base") else None
    if tr.tokenizer_source == "base" and tr.base is None:
        raise InputError("tokenizer_source: base needs base_model")
    return spec, tok


#: Bytes per element of the dtypes the engine reads and writes (safetensors and `--out-dtype` names).
_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "f32": 4, "bf16": 2, "f16": 2}


def shard_bytes(n_params: int, spec: Mapping[str, Any]) -> int:
    """mergekit's `out_shard_size` (parameters per shard) as umerge's `max_shard_size` (bytes per
    shard): `n_params` times the bytes per element of the output dtype (the spec's `out_dtype`, else
    the widest dtype of the base, or of the first model, whose dtypes the output keeps)."""
    from umerge.merge import inspect

    if n_params < 1:
        raise InputError(f"--out-shard-size must be at least 1 parameter, got {n_params}")
    if spec.get("out_dtype"):
        return n_params * _DTYPE_BYTES[spec["out_dtype"]]
    ref = spec.get("base") or spec["models"][0]["path"]
    info = inspect(ref)
    if not info.get("valid", False):
        raise InputError(f"cannot read checkpoint: {info.get('error', 'invalid')} ({ref})")
    return n_params * max((_DTYPE_BYTES.get(d, 4) for d in info["elements_by_dtype"]), default=4)


#: Name parts of the tensors outside the layers that sit after them (the engine's `params::after_layers`).
AFTER_LAYERS = ("lm_head", "embed_out", "ln_f", "final_layer_norm", "model.norm", "norm.weight", "norm.bias")


def _after_layers(name: str) -> bool:
    """True for a tensor after the layers (final norm, lm_head): in slices it comes from the last
    slice, as mergekit's post-weights do; the other tensors outside the layers from the first."""
    return layer_of(name) is None and any(p in name for p in AFTER_LAYERS)


def _map_method(method: str, g: dict[str, Any], mps: list[dict[str, Any]]) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """mergekit method + parameters -> umerge method + parameters."""
    g = dict(g)
    g.pop("int8_mask", None)  # storage type of mergekit's sign mask only: no effect on the result

    def flag(key: str, default: bool) -> bool:
        v = g.pop(key, default)
        if not isinstance(v, bool):
            raise InputError(f"parameter {key} of {method} must be true or false (one value for the whole model), got {v!r}")
        return v

    if method == "ties":
        if not flag("normalize", True):
            g["normalize"] = False  # the agreeing sum, not divided by the agreeing weights
        if flag("rescale", False):
            raise InputError("ties with rescale: true is not supported")
        g["preset"] = "mergekit"
        return "ties", g, mps
    if method in RANDOM_METHODS:
        g["rescale"] = "l1" if flag("rescale", True) else "none"
        g["normalize"] = flag("normalize", method == "della")
        return method, g, mps
    if method == "task_arithmetic":
        g["normalize"] = flag("normalize", False)
        if flag("rescale", False):
            raise InputError("task_arithmetic with rescale: true is not supported")
        for mp in [g, *mps]:
            d = mp.pop("density", 1.0)
            if d != 1.0:
                raise InputError("task_arithmetic with density < 1 is not supported in umerge run (use ties or magnitude_prune)")
        return "task_arithmetic", g, mps
    if method in ("breadcrumbs", "breadcrumbs_ties"):
        g["normalize"] = flag("normalize", False)
        if flag("rescale", False):
            raise InputError(f"{method} with rescale: true is not supported (umerge rescales only random masks)")
        return method, g, mps
    if method == "linear":
        g["normalize"] = flag("normalize", True)
        return "linear", g, mps
    # Flags for the whole model, passed on under mergekit's names once checked to be flags.
    for key in FLAGS.get(method, ()):
        if key in g:
            g[key] = flag(key, False)
    return method, g, mps


def copy_tokenizer(src: str | os.PathLike[str], out: str | os.PathLike[str]) -> list[str]:
    """Copies the tokenizer files of `src` over those in `out`; returns the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        p = Path(src) / name
        if p.is_file():
            shutil.copyfile(p, Path(out) / name)
            copied.append(name)
    if not copied:
        raise InputError(f"tokenizer_source has no tokenizer files ({src})")
    return copied


def run(config_path: str | os.PathLike[str], out: str | os.PathLike[str], *, seed: int | None = None,
        progress: Any = True, **options: Any) -> Any:
    """Runs a mergekit YAML config with the umerge engine; returns the `MergeReport`, whose
    warnings start with the config's (parameters the method does not use).

    `options` go to `to_spec` (random_seed, out_shard_params) and `umerge.merge.build_spec`."""
    return run_config(load_config(config_path), out, where=str(config_path), seed=seed, progress=progress, **options)


def run_config(config: Mapping[str, Any], out: str | os.PathLike[str], *, where: str = "config",
               seed: int | None = None, progress: Any = True, **options: Any) -> Any:
    """Runs one mergekit config (a dict, see `run`); `where` names it in error messages."""
    from umerge.adapters.recipe import is_adapter_config, run_recipe
    from umerge.merge import MergeReport, run_spec

    if is_adapter_config(config):  # models: that are all LoRA adapters: merged factor-wise, not by the engine
        return run_recipe(config, out, where=where, seed=seed, progress=progress, **options)
    config_warnings: list[str] = []
    spec, tok = to_spec(config, out, where=where, seed=seed, warn=config_warnings.append, **options)
    if tok is not None and not Path(tok).is_dir():
        raise InputError(f"tokenizer_source is not a directory ({tok})")
    _check_readable([p for p in [spec.get("base"), *(m["path"] for m in spec["models"])] if p is not None])
    report = run_spec(spec, progress)
    if tok is not None:
        copy_tokenizer(tok, out)
    if config_warnings and isinstance(report, MergeReport):
        report = dataclasses.replace(report, warnings=(*config_warnings, *report.warnings))
    return report


def _check_readable(paths: Sequence[str]) -> None:
    """Refuses inputs that are not checkpoints, reading headers only, each distinct path once.

    The engine would find the same problems, but it lists every one of them in its error, and a
    config may name hundreds of models (or the same broken one hundreds of times): here the line
    says the first few and how many more."""
    from umerge.merge import inspect

    problems = []
    for p in dict.fromkeys(paths):
        info = inspect(p)
        if not info.get("valid", False):
            problems.append(str(info.get("error", f"not a checkpoint ({p})")))
    _problems(problems, "models cannot be read")


def _problems(problems: Sequence[str], what: str) -> None:
    """One InputError for a list of problems: the problem itself when there is one, else the first
    SHOWN_PROBLEMS and how many more (so the line stays short whatever the config's length)."""
    if not problems:
        return
    if len(problems) == 1:
        raise InputError(problems[0])
    shown = "; ".join(problems[:SHOWN_PROBLEMS])
    more = f"; and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
    raise InputError(f"{len(problems)} {what}: {shown}{more}")


__all__ = ["ConfigWarning", "load_config", "load_documents", "parse_config", "parse_documents", "translate", "to_spec",
           "run", "run_config", "evaluate", "tensor_names", "copy_tokenizer", "shard_bytes", "layer_of", "with_layer"]
