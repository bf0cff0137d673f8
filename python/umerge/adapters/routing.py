"""The hook that lets the engine's commands (`umerge ties A/ B/ --density 0.8`, `umerge.ties`,
`umerge.merge`) take PEFT adapter directories: detect them, refuse a mix of adapters and full
models, and translate the engine's method parameters into `merge_adapters` arguments.

For adapters the default semantics are PEFT's (`add_weighted_adapter`): TIES with the `peft`
preset on the factors. The mergekit and paper presets have no factor-wise meaning in PEFT and
are refused unless `delta="full"` with a base, where the engine merges the full updates.
`normalize` (the default of `umerge linear`) divides the adapter weights by their sum; lambda,
per-tensor filter rules and gradients have no PEFT counterpart and are refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from umerge.adapters.config import PathLike, is_adapter_dir
from umerge.errors import InputError

# engine method name -> adapter merge method
_METHODS = {"ties": "ties", "linear": "linear", "task_arithmetic": "linear", "magnitude_prune": "magnitude_prune",
            "dare_linear": "dare_linear", "dare_ties": "dare_ties", "cat": "cat"}


def adapter_inputs(models: Sequence[PathLike], base: PathLike | None = None) -> bool:
    """True when every model is a PEFT adapter directory, False when none is; mixing is an error."""
    flags = [is_adapter_dir(m) for m in models]
    if any(flags) and not all(flags):
        adapters = [str(m) for m, f in zip(models, flags) if f]
        full = [str(m) for m, f in zip(models, flags) if not f]
        raise InputError(
            f"cannot mix LoRA adapters ({adapters[0]}) and full models ({full[0]}) in one merge: "
            "fold the adapters first (umerge fold ADAPTER --base BASE) or merge adapters alone"
        )
    if all(flags) and base is not None and is_adapter_dir(base):
        raise InputError(f"the base {base} is an adapter; --base must be the full model the adapters were trained on")
    return bool(flags) and all(flags)


def merge_adapter_inputs(
    method: str,
    models: Sequence[PathLike],
    *,
    base: PathLike | None,
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]] | None,
    out: PathLike,
    delta: str = "factors",
    svd_rank: int | None = None,
    out_dtype: str | None = None,
    threads: int | None = None,
    memory_budget: Any = None,
    max_shard_size: Any = None,
    overwrite: bool = False,
    progress: Any = False,
    page_cache: str | None = None,
) -> Any:
    """Runs an engine-style merge request (method, params, per-model params) on adapter inputs."""
    from umerge.adapters.merge import merge_adapters

    if method not in _METHODS:
        raise InputError(f"{method} cannot merge LoRA adapters (adapter methods: {', '.join(sorted(_METHODS))})")
    p = dict(params)
    preset = p.pop("preset", None)
    if method == "ties" and preset not in (None, "peft") and not (delta == "full" and base is not None):
        raise InputError(
            f"the {preset} TIES preset has no factor-wise form: adapters are merged with PEFT's semantics "
            "(--preset peft, the default for adapters), or use --delta full --base BASE"
        )
    lam = p.pop("lambda", 1.0)
    if float(lam) != 1.0:
        raise InputError("lambda is not supported for adapter merges (PEFT's add_weighted_adapter has none); scale the weights instead")
    normalize = bool(p.pop("normalize", False))
    if normalize and method not in ("linear", "task_arithmetic", "magnitude_prune", "dare_linear"):
        raise InputError(f"normalize is not supported for {method} on adapters (PEFT's combinations do not normalise)")
    density = p.pop("density", None)
    majority = p.pop("majority_sign", "total")
    seed = p.pop("seed", 0)
    if isinstance(seed, float) and seed.is_integer():
        seed = int(seed)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        # the engine checks the seed of full-model merges; adapter merges draw their masks here
        raise InputError(f"invalid parameter seed: {seed!r} is not a non-negative integer")
    rescale = p.pop("rescale", "density")
    if rescale != "density":
        raise InputError("DARE on adapters rescales kept entries by 1/density, as PEFT does (rescale: density)")
    if p:
        raise InputError(f"parameter(s) {', '.join(sorted(p))} are not supported for adapter merges")
    weights = None
    if model_params:
        extra = sorted({k for mp in model_params for k in mp if k != "weight"})
        if extra:
            raise InputError(f"per-adapter parameter(s) {', '.join(extra)} are not supported (only weight)")
        weights = [float(mp.get("weight", 1.0)) for mp in model_params]
    if normalize:
        # weighted-sum methods: divide the weights by their sum (mergekit's linear default)
        w = weights if weights is not None else [1.0] * len(models)
        total = sum(w)
        if abs(total) < 1e-8:
            raise InputError("normalize: the adapter weights sum to 0")
        weights = [x / total for x in w]
    for name, v in (("density", density),):
        if v is not None and not isinstance(v, (int, float)):
            raise InputError(f"{name} must be one number for adapter merges (filter rules and gradients are not supported)")
    return merge_adapters(
        list(models), out, method=_METHODS[method], weights=weights, density=density, majority_sign=majority,
        delta=delta, svd_rank=svd_rank, base=base, seed=seed, preset=preset, out_dtype=out_dtype, threads=threads,
        memory_budget=memory_budget, max_shard_size=max_shard_size, overwrite=overwrite, progress=progress,
        page_cache=page_cache,
    )


__all__ = ["adapter_inputs", "merge_adapter_inputs"]
