"""`umerge.adapters.merge_adapters`: merge PEFT LoRA adapters into a new adapter (or a full model).

The default reproduces `PeftModel.add_weighted_adapter(adapters, weights, name,
combination_type=..., density=..., majority_sign_method=...)` (see `combine` for the formulas)
and writes the result as a PEFT adapter directory that `PeftModel.from_pretrained` loads:
`adapter_config.json` is the first adapter's with `r` and `lora_alpha` set as PEFT sets them
(both the new rank), `target_modules` the union, and the rank/alpha patterns cleared.

`delta="full"` merges each module's whole update s_i * B_i @ A_i instead of the factors:
without `base` the result is truncated back to a low-rank adapter by SVD (PEFT's `*_svd`
combination types); with `base` the merged update is added to the base weights and a full
checkpoint is written, streamed through the Rust engine (see `umerge.adapters.folding`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from umerge.adapters.combine import (
    COMBINATIONS,
    FACTORWISE,
    MAJORITY,
    NEEDS_DENSITY,
    SVD,
    base_kind,
    combine,
    split_weights,
    svd_factors,
)
from umerge.adapters.config import PathLike
from umerge.adapters.lora import (
    LoraAdapter,
    check_output,
    check_same_modules,
    factor_names,
    load_adapter,
    write_adapter,
)
from umerge.errors import InputError
from umerge.merge import out_dtype_name
from umerge.safetensors_io import canonical_dtype

DELTAS = ("factors", "full")


@dataclass(frozen=True)
class AdapterMergeReport:
    """What an adapter merge did."""

    combination: str
    output: Path
    modules: int
    rank: int
    lora_alpha: float
    seconds: float
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def summary(self) -> str:
        return (f"merged {self.modules} LoRA modules with {self.combination} -> rank {self.rank}, "
                f"lora_alpha {self.lora_alpha:g} in {self.seconds:.1f} s -> {self.output}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["output"] = str(self.output)
        d["warnings"] = list(self.warnings)
        return d


def peft_combination(method: str, delta: str = "factors") -> str:
    """The PEFT combination_type for a method and delta mode: ("ties", "full") -> "ties_svd"."""
    if method in COMBINATIONS and (delta == "factors" or method in SVD or method == "cat"):
        return method
    if delta == "full" and method in FACTORWISE:
        return "svd" if method == "linear" else method + "_svd"
    raise InputError(f"unknown adapter merge method {method!r} (use one of {', '.join(FACTORWISE + ('cat',))}, "
                     f"or a PEFT combination type: {', '.join(COMBINATIONS)})")


def _union_targets(adapters: Sequence[LoraAdapter]) -> Any:
    tms = [a.config.target_modules for a in adapters]
    if all(isinstance(t, list) for t in tms):
        return sorted(set().union(*tms))  # type: ignore[arg-type]
    if all(isinstance(t, str) for t in tms):
        return "|".join(f"({t})" for t in tms)
    raise InputError("adapters mix list and string target_modules; PEFT cannot combine those either")


def new_config(adapters: Sequence[LoraAdapter], rank: int) -> dict[str, Any]:
    """PEFT's config of the combined adapter: the first's, with r = lora_alpha = rank, the
    union of target_modules, and no rank/alpha patterns."""
    cfg = dict(adapters[0].config.raw)
    cfg.update(r=rank, lora_alpha=rank, target_modules=_union_targets(adapters), rank_pattern={}, alpha_pattern={})
    return cfg


def _check_args(combination: str, n: int, weights: Sequence[float] | None, density: float | None,
                majority_sign: str) -> list[float]:
    if weights is None:
        weights = [1.0] * n
    if len(weights) != n:
        raise InputError(f"{len(weights)} weights given for {n} adapters (give one per adapter)")
    if majority_sign not in MAJORITY:
        raise InputError(f"majority sign {majority_sign!r} is not one of {', '.join(MAJORITY)}")
    if base_kind(combination) in NEEDS_DENSITY:
        if density is None:
            raise InputError(f"{combination} needs a density (the fraction of entries kept, 0 < density <= 1)")
        if not (0.0 < float(density) <= 1.0):
            raise InputError(f"density {density} is outside (0, 1]: it is the fraction of entries kept")
    return [float(w) for w in weights]


def merge_adapters(
    adapters: Sequence[PathLike],
    out: PathLike = "merged",
    *,
    method: str = "ties",
    weights: Sequence[float] | None = None,
    density: float | None = None,
    majority_sign: str = "total",
    delta: str = "factors",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    base: PathLike | None = None,
    seed: int = 0,
    preset: str | None = None,
    out_dtype: str | None = None,
    threads: int | None = None,
    memory_budget: str | int | None = None,
    max_shard_size: str | int | None = None,
    overwrite: bool = False,
    progress: Any = False,
    page_cache: str | None = None,
) -> Any:
    """Merges LoRA adapter directories; returns an `AdapterMergeReport` (or, with `base` and
    `delta="full"`, the fold's `MergeReport`).

    `method` is linear, ties, dare_linear, dare_ties, magnitude_prune or cat, or any PEFT
    combination type (svd, ties_svd, ...). `delta="factors"` (default) merges lora_A and lora_B
    separately, as PEFT does; `delta="full"` merges the updates s_i * B_i @ A_i.
    Example: ``merge_adapters(["a/", "b/"], "ab/", method="ties", density=0.8)``.
    """
    if isinstance(adapters, (str, Path)):
        adapters = [adapters]
    if not adapters:
        raise InputError("no adapters given")
    if delta not in DELTAS:
        raise InputError(f"delta {delta!r} is not one of {', '.join(DELTAS)}")
    out_dtype = out_dtype_name(out_dtype)
    combination = peft_combination(method, delta)
    if base is not None and delta == "full":
        from umerge.adapters.folding import fold_merged

        return fold_merged(
            adapters, base, out, method=base_kind(combination), weights=weights, density=density,
            majority_sign=majority_sign, seed=seed, preset=preset or "peft", out_dtype=out_dtype, threads=threads,
            memory_budget=memory_budget, max_shard_size=max_shard_size, overwrite=overwrite, progress=progress,
            page_cache=page_cache,
        )
    if base is not None:
        return _merge_then_fold(
            adapters, base, out, method=method, weights=weights, density=density, majority_sign=majority_sign,
            svd_rank=svd_rank, svd_clamp=svd_clamp, seed=seed, out_dtype=out_dtype, threads=threads,
            memory_budget=memory_budget, max_shard_size=max_shard_size, overwrite=overwrite, progress=progress,
            page_cache=page_cache,
        )
    if preset not in (None, "peft"):
        raise InputError(f"the {preset} TIES preset has no factor-wise form; adapters follow PEFT's semantics (preset peft)")
    t0 = time.perf_counter()
    loaded = [load_adapter(a) for a in adapters]
    w = _check_args(combination, len(loaded), weights, density, majority_sign)
    check_same_modules(loaded)
    target = check_output(out, adapters, overwrite)
    warnings: list[str] = []
    if len(loaded) == 1 and combination != "linear":
        # PEFT: "if there is only one adapter, we can only use linear merging".
        warnings.append(f"one adapter: {combination} becomes linear, as in PEFT")
        combination = "linear"
    tensors, rank = merged_tensors(loaded, combination, w, density=density, majority_sign=majority_sign,
                                   svd_rank=svd_rank, svd_clamp=svd_clamp, seed=seed, threads=threads)
    cfg = new_config(loaded, rank)
    if cfg.get("use_rslora"):
        warnings.append(
            f"the first adapter uses rsLoRA, so the merged adapter (r = lora_alpha = {rank}, as PEFT sets them) "
            f"is scaled by sqrt({rank}) when loaded, exactly as PEFT's own merged adapter is"
        )
    dtype = canonical_dtype(out_dtype) if out_dtype else loaded[0].dtype
    recipe = {
        "umerge_adapter_merge": {
            "combination": combination, "adapters": [str(Path(a).absolute()) for a in adapters], "weights": w,
            "density": density, "majority_sign": majority_sign, "svd_rank": svd_rank, "seed": seed,
        }
    }
    write_adapter(target, cfg, tensors, dtype, extra_files={"umerge.yml": json.dumps(recipe, indent=2) + "\n"})
    return AdapterMergeReport(
        combination=combination, output=target, modules=len(loaded[0].modules), rank=rank,
        lora_alpha=float(rank), seconds=time.perf_counter() - t0, warnings=tuple(warnings),
    )


def merged_tensors(
    loaded: Sequence[LoraAdapter],
    combination: str,
    weights: Sequence[float],
    *,
    density: float | None,
    majority_sign: str = "total",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    seed: int = 0,
    threads: int | None = None,
) -> tuple[dict[str, np.ndarray], int]:
    """The merged adapter's factors (float32, in file order) and rank, in memory: the arithmetic of
    `merge_adapters` without reading or writing anything, for callers that hold the adapters
    already (`umerge.search` scores many combinations of the same adapters). `combination` is a
    PEFT combination type (see `peft_combination`); arguments are checked by the caller."""
    w = [float(x) for x in weights]
    scalings = [a.config.scaling for a in loaded]
    ranks = [a.config.r for a in loaded]
    tensors: dict[str, np.ndarray] = {}
    if combination in FACTORWISE:
        if len(set(ranks)) != 1:
            listing = ", ".join(f"{a.path} r={a.config.r}" for a in loaded)
            raise InputError(f"{combination} merges factors element-wise, so all adapters need the same rank ({listing}); use --delta full or cat")
        rank = ranks[0]
        wa, wb = split_weights(w, scalings)
        for mod in loaded[0].modules:
            na, nb = factor_names(mod)
            common: dict[str, Any] = dict(density=density, majority_sign=majority_sign, seed=seed, module=mod,
                                          threads=threads)
            tensors[na] = combine(combination, [a.modules[mod].a for a in loaded], wa, part="A", **common)
            tensors[nb] = combine(combination, [a.modules[mod].b for a in loaded], wb, part="B", **common)
    elif combination == "cat":
        rank = sum(ranks)
        for mod in loaded[0].modules:
            na, nb = factor_names(mod)
            tensors[na] = np.concatenate([a.modules[mod].a * np.float32(wi * s) for a, wi, s in zip(loaded, w, scalings)], axis=0)
            tensors[nb] = np.concatenate([a.modules[mod].b for a in loaded], axis=1)
    else:  # *_svd
        rank = int(svd_rank) if svd_rank is not None else max(ranks)
        if rank <= 0:
            raise InputError(f"svd rank must be positive, got {svd_rank}")
        kind = base_kind(combination)
        for mod in loaded[0].modules:
            na, nb = factor_names(mod)
            deltas = [np.float32(s) * (a.modules[mod].b @ a.modules[mod].a) for a, s in zip(loaded, scalings)]
            merged = combine(kind, deltas, w, density=density, majority_sign=majority_sign, seed=seed, module=mod,
                             part="delta", threads=threads)
            try:
                tensors[nb], tensors[na] = svd_factors(merged, rank, svd_clamp)
            except InputError as e:
                raise InputError(f"{e} (module {mod})") from None
    order = [n for mod in loaded[0].modules for n in factor_names(mod)]
    return {n: tensors[n] for n in order}, rank


def _merge_then_fold(adapters: Sequence[PathLike], base: PathLike, out: PathLike, *, out_dtype: str | None,
                     threads: int | None, memory_budget: Any, max_shard_size: Any, overwrite: bool, progress: Any,
                     page_cache: str | None = None, **merge_kw: Any) -> Any:
    """PEFT's add_weighted_adapter followed by merge_and_unload: merge the adapters into a
    temporary adapter beside `out`, fold it into `base`, remove it."""
    import shutil
    import tempfile

    from umerge.adapters.folding import fold

    target = check_output(out, [*adapters, base], overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".umerge-adapter-{target.name}-", dir=target.parent))
    try:
        merge_adapters(adapters, tmp / "adapter", threads=threads, **merge_kw)
        return fold(tmp / "adapter", base, out, out_dtype=out_dtype, threads=threads, memory_budget=memory_budget,
                    max_shard_size=max_shard_size, overwrite=overwrite, progress=progress, page_cache=page_cache)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["AdapterMergeReport", "DELTAS", "merge_adapters", "merged_tensors", "new_config", "peft_combination"]
