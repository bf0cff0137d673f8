"""The typed Python API of the merge engine: `umerge.ties`, `umerge.merge`, `umerge.inspect`.

A thin layer over the native engine (`umerge._core`): it builds the merge *spec*, a JSON object
the engine validates and runs, and turns the engine's JSON report into a `MergeReport`.

Spec format (what `build_spec` returns; also recorded in `umerge.yml` beside every output)::

    {
      "method": "ties",                        # merge method
      "models": [                              # input checkpoints: a directory (model.safetensors,
        {"path": "ft1/", "params": {"weight": 0.7}},   # a sharded index, or *.safetensors) or a file
        {"path": "ft2/"}
      ],
      "base": "base/",                         # the model the fine-tunes started from (or null)
      "params": {"density": 0.8, "lambda": 1.0, "preset": "mergekit"},   # global parameters
      "out": "merged/",                        # output directory (built beside it, renamed in)
      "out_dtype": "bf16",                     # bf16 | f16 | f32 | null (= the base's dtype)
      "threads": 2,                            # null = all cores
      "memory_budget": 536870912,              # bytes of working memory (null = 512 MiB)
      "max_shard_size": 5000000000,            # bytes per shard file, header included (null = 5 GB)
      "strict": false,                         # tensors missing from a model are errors
      "slices": [                              # optional: layer stacking (mergekit's slices:), the
        {"sources": [{"model": 0, "layer_range": [0, 16]}]},   # output's layers slice by slice:
        {"sources": [{"model": 1, "layer_range": [8, 24]}]}    # 0-15 of model 0, then 8-23 of model 1
      ],                                       # ("base_layer_range": [a, b] where the base is merged)
      "overwrite": false,                      # replace a non-empty output directory
      "allow_nonfinite": false                 # merge inputs holding NaN/Inf instead of refusing
    }

Method ``passthrough`` (mergekit's) merges nothing: each tensor is copied from its one model (one
model, or one source per slice), times the model's ``scale`` parameter where given.

A parameter value (global or per model) is a number, a word (`preset`), a gradient (a list of
numbers interpolated over the layer index, as in mergekit), or mergekit-style filter rules:
``[{"filter": "mlp", "value": 0.5}, {"value": 1.0}]`` — the first rule whose filter is a
substring of the tensor name wins; a rule without filter matches everything (put it last).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from umerge.errors import InputError

PathLike = str | os.PathLike[str]
ParamValue = float | int | str | bool | Sequence[float] | Sequence[Mapping[str, Any]]
ProgressArg = bool | Callable[[int, int, int, int], None] | None

OUT_DTYPES = ("bf16", "f16", "f32")
#: Every accepted spelling of an output dtype (ours, torch's, mergekit's) -> its name in OUT_DTYPES.
DTYPE_NAMES = {
    "float32": "f32", "fp32": "f32", "float": "f32", "f32": "f32",
    "bfloat16": "bf16", "bf16": "bf16",
    "float16": "f16", "fp16": "f16", "half": "f16", "f16": "f16",
}


def out_dtype_name(out_dtype: str | None) -> str | None:
    """`"bfloat16"` -> `"bf16"` (any spelling in DTYPE_NAMES -> its OUT_DTYPES name); None stays None."""
    if out_dtype is None:
        return None
    try:
        return DTYPE_NAMES[out_dtype]
    except KeyError:
        raise InputError(f"unknown output dtype {out_dtype!r} (use one of {', '.join(OUT_DTYPES)}, "
                         "or bfloat16, float16, float32)") from None


@dataclass(frozen=True)
class MergeReport:
    """What a merge did: counts, bytes, time and peak memory (`peak_rss_bytes` is the process's VmHWM)."""

    method: str
    output: Path
    tensors: int
    shards: int
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss_bytes: int
    threads: int
    chunk_elements: int
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_json(cls, text: str) -> "MergeReport":
        d = json.loads(text)
        d["output"] = Path(d["output"])
        d["warnings"] = tuple(d.get("warnings", ()))
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["output"] = str(self.output)
        d["warnings"] = list(self.warnings)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def summary(self) -> str:
        """One line for people: tensors, GB, seconds, peak RSS, output."""
        return (
            f"merged {self.tensors} tensors ({self.bytes_read / 1e9:.2f} GB read, "
            f"{self.bytes_written / 1e9:.2f} GB written) in {self.seconds:.1f} s, "
            f"peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB, {self.threads} threads -> {self.output}"
        )


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")
_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}


def parse_size(value: str | int | None, what: str = "size") -> int | None:
    """Parses a byte size: `1000000`, `512MiB` (binary), `5GB` (decimal, as Hugging Face), `2G` (binary)."""
    if value is None:
        return None
    if isinstance(value, int):
        if value <= 0:
            raise InputError(f"{what} must be positive, got {value}")
        return value
    m = _SIZE.match(str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise InputError(f"{what} {value!r} is not a size (examples: 1000000, 512MiB, 5GB)")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise InputError(f"{what} must be positive, got {value!r}")
    return n


def _progress_fn(progress: ProgressArg) -> tuple[Callable[[int, int, int, int], None] | None, Any]:
    if progress is True:
        from umerge._progress import ProgressBar

        bar = ProgressBar()
        return bar, bar
    if callable(progress):
        return progress, None
    return None, None


def run_engine(entry: Callable[[str, Any], str], spec: Mapping[str, Any], progress: ProgressArg) -> MergeReport:
    """Calls a native entry point (`_core.merge`, `_core.fold`) with the JSON spec and a progress
    callback (a bar for ``True``), closes the bar whatever happens, and parses the JSON report."""
    fn, bar = _progress_fn(progress)
    try:
        text = entry(json.dumps(spec), fn)
    finally:
        if bar is not None:
            bar.close()
    return MergeReport.from_json(text)


#: What a run does with the page cache (the engine's `exec::readahead`): `auto` (default) leaves it as
#: found (cached inputs read from it, others read around it with O_DIRECT; a run larger than half
#: the memory drops its output's pages once written), `keep` reads everything through it and
#: leaves it there, `drop` drops every page used behind the merge.
PAGE_CACHE = ("auto", "keep", "drop")


def output_options(
    out: PathLike,
    out_dtype: str | None = None,
    threads: int | None = None,
    memory_budget: str | int | None = None,
    max_shard_size: str | int | None = None,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    page_cache: str | None = None,
) -> dict[str, Any]:
    """The output options of an engine spec, shared by merges and folds (the engine's
    `OutputOptions`, flat beside the spec's own fields): `out`, `overwrite` and `allow_nonfinite`
    always; `out_dtype` (any spelling in DTYPE_NAMES), `threads` (>= 1), `memory_budget` and
    `max_shard_size` (bytes, see `parse_size`) and `page_cache` (one of PAGE_CACHE) only when
    given, so the engine applies its defaults."""
    out_dtype = out_dtype_name(out_dtype)
    if page_cache is not None and page_cache not in PAGE_CACHE:
        raise InputError(f"page cache policy {page_cache!r} is not one of {', '.join(PAGE_CACHE)}")
    if threads is not None and threads < 1:
        raise InputError(f"threads must be at least 1, got {threads}")
    opts: dict[str, Any] = {"out": os.fspath(out), "overwrite": bool(overwrite), "allow_nonfinite": bool(allow_nonfinite)}
    if out_dtype is not None:
        opts["out_dtype"] = out_dtype
    if threads is not None:
        opts["threads"] = int(threads)
    mb = parse_size(memory_budget, "memory budget")
    if mb is not None:
        opts["memory_budget"] = mb
    ms = parse_size(max_shard_size, "max shard size")
    if ms is not None:
        opts["max_shard_size"] = ms
    if page_cache is not None:
        opts["page_cache"] = page_cache
    return opts


#: `owner/name`, optionally `@revision`: how a Hugging Face Hub model id looks (mergekit configs take them).
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?$")


def require_local(path: PathLike, what: str = "model", instead: str = "pass DIR instead") -> None:
    """An InputError unless `path` exists. umerge reads local checkpoints only: a missing path that
    looks like a Hub id (`owner/name[@revision]`) gets one line saying how to download it with the
    `hf` command of huggingface_hub and then, `instead`, what to do with the directory; any other
    missing path is a plain `no such {what} directory (PATH)`."""
    p = os.fspath(path)
    if os.path.exists(p):
        return
    hub = _HUB_ID.match(p)
    if hub is None:
        raise InputError(f"no such {what} {'file' if p.endswith('.safetensors') else 'directory'} ({p})")
    rev = f" --revision {hub['rev']}" if hub["rev"] else ""
    raise InputError(f"{what} {p} is not a local directory, and umerge reads local directories only: if it is a "
                     f"Hugging Face Hub id, download it first (hf download {hub['repo']}{rev} --local-dir DIR) "
                     f"and {instead}")


def weight_params(weights: Sequence[ParamValue] | None, n: int) -> list[dict[str, ParamValue]] | None:
    """Per-model ``{"weight": w}`` parameter sets from one weight per model (None stays None).

    The count is checked here, not in the engine: the spec attaches each weight to its model, so a
    list of the wrong length has no spec to express it."""
    if weights is None:
        return None
    if len(weights) != n:
        raise InputError(f"{len(weights)} weights given for {n} models (weights=... / --weight: give one per model, in order)")
    return [{"weight": w} for w in weights]


def _check_finite(params: Mapping[str, Any], where: str = "") -> None:
    """NaN and infinities cannot travel in the JSON spec, so they are refused here, by name; every
    other check of a parameter's value is the engine's."""

    def finite(v: Any) -> bool:
        if isinstance(v, float):
            return math.isfinite(v)
        if isinstance(v, Mapping):
            return all(finite(x) for x in v.values())
        if isinstance(v, (list, tuple)):
            return all(finite(x) for x in v)
        return True

    for name, value in params.items():
        if not finite(value):
            raise InputError(f"invalid parameter {name}: {value!r} is not a finite number{where}")


def build_spec(
    method: str,
    models: Sequence[PathLike],
    *,
    base: PathLike | None = None,
    params: Mapping[str, ParamValue] | None = None,
    model_params: Sequence[Mapping[str, ParamValue]] | None = None,
    out: PathLike = "merged",
    out_dtype: str | None = None,
    threads: int | None = None,
    memory_budget: str | int | None = None,
    max_shard_size: str | int | None = None,
    strict: bool = False,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    page_cache: str | None = None,
) -> dict[str, Any]:
    """The engine's spec for a merge (see the module docstring for every field)."""
    if isinstance(models, (str, os.PathLike)):
        models = [models]
    if not models:
        raise InputError("no input models given")
    if model_params is not None and len(model_params) != len(models):
        raise InputError(f"{len(model_params)} per-model parameter sets given for {len(models)} models")
    for m in models:
        require_local(m)
    if base is not None:
        require_local(base, "base")
    _check_finite(params or {})
    for i, mp in enumerate(model_params or ()):
        _check_finite(mp, f" (model {i + 1})")
    opts = output_options(out, out_dtype, threads, memory_budget, max_shard_size, overwrite, allow_nonfinite,
                          page_cache)
    spec: dict[str, Any] = {
        "method": method,
        "models": [
            {"path": os.fspath(m), **({"params": dict(model_params[i])} if model_params and model_params[i] else {})}
            for i, m in enumerate(models)
        ],
        "params": dict(params or {}),
        "strict": bool(strict),
    }
    if base is not None:
        spec["base"] = os.fspath(base)
    spec.update(opts)
    return spec


def run_spec(spec: Mapping[str, Any], progress: ProgressArg = True) -> MergeReport:
    """Runs a spec dict through the engine and returns its report."""
    from umerge import _core

    return run_engine(_core.merge, spec, progress)


def merge(
    method: str,
    models: Sequence[PathLike],
    *,
    base: PathLike | None = None,
    params: Mapping[str, ParamValue] | None = None,
    model_params: Sequence[Mapping[str, ParamValue]] | None = None,
    out: PathLike = "merged",
    out_dtype: str | None = None,
    threads: int | None = None,
    memory_budget: str | int | None = None,
    max_shard_size: str | int | None = None,
    strict: bool = False,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    progress: ProgressArg = True,
    delta: str = "factors",
    svd_rank: int | None = None,
    page_cache: str | None = None,
) -> Any:
    """Merges checkpoints with any engine method; `params` are global, `model_params` per model.

    Example: ``merge("ties", ["a/", "b/"], base="base/", params={"density": 0.8})``.

    PEFT LoRA adapter directories as `models` go to `umerge.adapters` (PEFT's
    add_weighted_adapter semantics; `delta="full"` merges the updates B @ A, `svd_rank` truncates
    them back to an adapter; with `base` the result is folded into a full model) and the result is
    an `AdapterMergeReport` when the output is an adapter. Mixing adapters and full models is an error.
    """
    if isinstance(models, (str, os.PathLike)):
        models = [models]
    from umerge.adapters.routing import adapter_inputs, merge_adapter_inputs

    if adapter_inputs(models, base):
        return merge_adapter_inputs(
            method, models, base=base, params=params or {}, model_params=model_params, out=out, delta=delta,
            svd_rank=svd_rank, out_dtype=out_dtype, threads=threads, memory_budget=memory_budget,
            max_shard_size=max_shard_size, overwrite=overwrite, progress=progress, page_cache=page_cache,
        )
    if delta != "factors" or svd_rank is not None:
        raise InputError("delta and svd_rank (--delta, --svd-rank) apply to LoRA adapter inputs only")
    spec = build_spec(
        method, models, base=base, params=params, model_params=model_params, out=out, out_dtype=out_dtype,
        threads=threads, memory_budget=memory_budget, max_shard_size=max_shard_size, strict=strict,
        overwrite=overwrite, allow_nonfinite=allow_nonfinite, page_cache=page_cache,
    )
    return run_spec(spec, progress)


def ties(
    models: Sequence[PathLike],
    base: PathLike | None = None,
    *,
    density: ParamValue,
    weights: Sequence[ParamValue] | None = None,
    lambda_: float = 1.0,
    preset: str | None = None,
    majority_sign: str | None = None,
    normalize: bool = True,
    out: PathLike = "merged",
    out_dtype: str | None = None,
    threads: int | None = None,
    memory_budget: str | int | None = None,
    max_shard_size: str | int | None = None,
    strict: bool = False,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    progress: ProgressArg = True,
    delta: str = "factors",
    svd_rank: int | None = None,
    page_cache: str | None = None,
) -> Any:
    """TIES-merge fine-tuned checkpoints onto their base (Yadav et al., 2023, arXiv:2306.01708).

    For task vectors d_i = model_i - base: keep the k = floor(density * n) largest |d_i| of each
    tensor (trim), elect a sign per element (sign of the sum), average the entries that agree
    with it (disjoint merge), and add lambda times the average to the base.

    `density` is the fraction of entries kept (0 < density <= 1), a number or mergekit-style
    filter rules; `weights` one per model (default 1.0). `preset` picks the published variant:
    ``mergekit`` (default: sign elected on weighted deltas, mean divided by the sum of agreeing
    weights), ``peft`` (sign on unweighted deltas, mean over the count of agreeing entries;
    `majority_sign` total or frequency) or ``paper`` (trim over the whole model at once, zero
    signs take the model's majority sign, mean over the count). ``normalize=False`` (mergekit
    preset only, mergekit's ``normalize: false``) adds lambda times the agreeing sum, not divided.

    PEFT LoRA adapter directories are merged as PEFT's add_weighted_adapter(combination_type=
    "ties") does, factor-wise, without a base (preset ``peft``, the default for adapters); see
    `merge` for `delta` and `svd_rank`.
    """
    if isinstance(models, (str, os.PathLike)):
        models = [models]
    from umerge.adapters.routing import adapter_inputs

    if preset is None:
        preset = "peft" if adapter_inputs(models, base) else "mergekit"
    # The base, density and preset are checked by the engine (or, for adapters, `umerge.adapters`).
    params: dict[str, ParamValue] = {"density": density, "lambda": float(lambda_), "preset": preset}
    if majority_sign is not None:
        params["majority_sign"] = majority_sign
    if not normalize:
        params["normalize"] = False
    model_params = weight_params(weights, len(models))
    return merge(
        "ties", models, base=base, params=params, model_params=model_params, out=out, out_dtype=out_dtype,
        threads=threads, memory_budget=memory_budget, max_shard_size=max_shard_size, strict=strict,
        overwrite=overwrite, allow_nonfinite=allow_nonfinite, progress=progress, delta=delta, svd_rank=svd_rank,
        page_cache=page_cache,
    )


def inspect(path: PathLike) -> dict[str, Any]:
    """Describes a checkpoint: format, shards, tensors (name, dtype, shape, bytes), totals, validity.

    An invalid checkpoint gives ``{"valid": False, "error": "..."}`` rather than raising.
    """
    from umerge import _core

    return json.loads(_core.inspect(os.fspath(path)))


__all__ = ["PAGE_CACHE", "MergeReport", "build_spec", "inspect", "merge", "output_options", "parse_size", "require_local",
           "run_engine", "run_spec", "ties", "weight_params"]
