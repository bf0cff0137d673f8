"""`umerge.fold`: fold LoRA adapters into their base model, W + scaling * B @ A, as a full checkpoint.

The equivalent of ``PeftModel.from_pretrained(base, adapter).merge_and_unload().save_pretrained(out)``
without loading either into torch: the Rust engine (`umerge_core::fold`) streams the base shard by
shard, adds every targeted module's update (matrix products by row blocks, float32, one rounding
to the output dtype), copies every other tensor, and writes a Hugging Face checkpoint (shards,
index, config and tokenizer files copied from the base) into a temporary directory renamed into
place when complete.

`fold_merged` is `--delta full` with a base: the adapters' updates s_i * B_i @ A_i are merged
with an engine method (TIES with PEFT's semantics by default, the `peft` preset) and the merged
update is added to W, so the model gets TIES on the update the network feels rather than on the
factors. `linear` is W + sum_i w_i s_i B_i A_i (PEFT's `svd` combination before truncation).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from umerge.adapters.combine import MAJORITY, NEEDS_DENSITY
from umerge.adapters.config import PathLike, read_config, weights_path
from umerge.adapters.lora import check_same_modules, load_adapter
from umerge.errors import InputError
from umerge.merge import MergeReport, ProgressArg, output_options, run_engine

# --delta full method -> (engine method, fixed engine parameters). linear needs no engine method.
_ENGINE_METHODS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "linear": (None, {}),
    "ties": ("ties", {"preset": "peft"}),
    "magnitude_prune": ("magnitude_prune", {}),
    "dare_linear": ("dare_linear", {}),
    "dare_ties": ("dare_ties", {}),
}


def fold_entry(path: PathLike, weight: float = 1.0) -> dict[str, Any]:
    """The engine's description of one adapter to fold (its weights file, PEFT's scaling times
    `weight`, its layout), from its adapter_config.json: used by `fold` and by merges of
    `model+lora` references (a spec model's ``lora``)."""
    cfg = read_config(path)
    return {
        "path": os.fspath(weights_path(path)),
        "scaling": float(weight) * cfg.scaling,
        "fan_in_fan_out": cfg.fan_in_fan_out,
    }


def _run(spec: dict[str, Any], progress: ProgressArg) -> MergeReport:
    from umerge import _core

    return run_engine(_core.fold, spec, progress)


def fold(
    adapter: PathLike | Sequence[PathLike],
    base: PathLike,
    out: PathLike = "folded",
    *,
    out_dtype: str | None = None,
    threads: int | None = None,
    memory_budget: str | int | None = None,
    max_shard_size: str | int | None = None,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    progress: ProgressArg = True,
    page_cache: str | None = None,
) -> MergeReport:
    """Folds a PEFT LoRA adapter (or several: their updates add up) into `base`: for every
    targeted module W' = W + scaling * B @ A (transposed with fan_in_fan_out). Output dtype: the
    base's unless `out_dtype`. Example: ``umerge.fold("adapter/", base="base/", out="model/")``."""
    adapters = [adapter] if isinstance(adapter, (str, os.PathLike)) else list(adapter)
    if not adapters:
        raise InputError("no adapter given")
    spec = output_options(out, out_dtype, threads, memory_budget, max_shard_size, overwrite, allow_nonfinite,
                          page_cache)
    spec.update(base=os.fspath(base), adapters=[fold_entry(a) for a in adapters])
    return _run(spec, progress)


def fold_merged(
    adapters: Sequence[PathLike],
    base: PathLike,
    out: PathLike,
    *,
    method: str = "ties",
    weights: Sequence[float] | None = None,
    density: float | None = None,
    majority_sign: str = "total",
    seed: int = 0,
    preset: str = "peft",
    out_dtype: str | None = None,
    threads: int | None = None,
    memory_budget: str | int | None = None,
    max_shard_size: str | int | None = None,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    progress: ProgressArg = True,
    page_cache: str | None = None,
) -> MergeReport:
    """Merges the adapters' full updates s_i * B_i @ A_i with `method` and adds the result to the
    base weights (`--delta full --base`). ties uses PEFT's semantics (sign elected on the
    unweighted updates, mean over the agreeing count); dare_ties uses the engine's (mergekit's)."""
    if method not in _ENGINE_METHODS:
        raise InputError(f"--delta full with --base supports {', '.join(_ENGINE_METHODS)}, not {method!r}")
    if weights is not None and len(weights) != len(adapters):
        raise InputError(f"{len(weights)} weights given for {len(adapters)} adapters (give one per adapter)")
    if majority_sign not in MAJORITY:
        raise InputError(f"majority sign {majority_sign!r} is not one of {', '.join(MAJORITY)}")
    if method in NEEDS_DENSITY and density is None:
        raise InputError(f"{method} needs a density (the fraction of entries kept, 0 < density <= 1)")
    if density is not None and not (0.0 < float(density) <= 1.0):
        raise InputError(f"density {density} is outside (0, 1]: it is the fraction of entries kept")
    check_same_modules([load_adapter(a) for a in adapters])
    w = [float(x) for x in (weights if weights is not None else [1.0] * len(adapters))]
    engine_method, fixed = _ENGINE_METHODS[method]
    spec = output_options(out, out_dtype, threads, memory_budget, max_shard_size, overwrite, allow_nonfinite,
                          page_cache)
    spec["base"] = os.fspath(base)
    if engine_method is None:
        spec["adapters"] = [fold_entry(a, wi) for a, wi in zip(adapters, w)]
    else:
        spec["adapters"] = [fold_entry(a) for a in adapters]
        params: dict[str, Any] = dict(fixed)
        if density is not None:
            params["density"] = float(density)
        if engine_method == "ties":
            params.update(preset=preset, majority_sign=majority_sign)
        if engine_method.startswith("dare"):
            params["seed"] = int(seed)
        spec.update(method=engine_method, params=params, model_params=[{"weight": wi} for wi in w])
    return _run(spec, progress)


__all__ = ["fold", "fold_merged"]
