"""In-memory merge kernels on numpy arrays, run by the same Rust code as file merges.

Each array set is treated as one tensor: the arrays are flattened (C order), converted to
float32, merged with the GIL released, and the result is returned as float32 in the models'
shape. `base=None` means an all-zero base (the arrays are the task vectors themselves, as for
LoRA factors). With ``preset="paper"`` the "whole model" the trim runs over is this one tensor.

Example::

    out = umerge.ops.ties(base, [a, b], density=0.8)             # mergekit preset
    out = umerge.ops.ties(None, [ta, tb], density=0.8, preset="peft")  # = peft merge_utils.ties
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from umerge.errors import InputError


def _f32_bytes(a: Any, what: str) -> tuple[bytes, tuple[int, ...]]:
    arr = np.ascontiguousarray(np.asarray(a), dtype="<f4")
    return arr.tobytes(), arr.shape


def merge_arrays(
    method: str,
    base: Any | None,
    models: Sequence[Any],
    params: Mapping[str, Any] | None = None,
    model_params: Sequence[Mapping[str, Any]] | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """Merges arrays with any engine method; parameters as in `umerge.merge`."""
    from umerge import _core

    if len(models) == 0:
        raise InputError("no input arrays given")
    blobs = []
    shape: tuple[int, ...] | None = None
    for i, m in enumerate(models):
        b, s = _f32_bytes(m, f"model {i + 1}")
        if shape is None:
            shape = s
        elif s != shape:
            raise InputError(f"array {i + 1} has shape {list(s)} but array 1 has {list(shape)}")
        blobs.append(b)
    assert shape is not None  # models is not empty
    base_b = None
    if base is not None:
        base_b, bs = _f32_bytes(base, "base")
        if bs != shape:
            raise InputError(f"base has shape {list(bs)} but the models have {list(shape)}")
    if model_params is not None and len(model_params) != len(models):
        raise InputError(f"{len(model_params)} per-model parameter sets given for {len(models)} arrays")
    # One (possibly empty) parameter set per array, so that methods which count their models
    # (slerp, nearswap, nuslerp, model_stock) see them all.
    per_model = [dict(p) for p in model_params] if model_params is not None else [{} for _ in models]
    payload = json.dumps({"global": dict(params or {}), "models": per_model})
    out = _core.merge_arrays(method, payload, base_b, blobs, threads)
    return np.frombuffer(out, dtype="<f4").reshape(shape).copy()


def ties(
    base: Any | None,
    models: Sequence[Any],
    density: float,
    weights: Sequence[float] | None = None,
    lambda_: float = 1.0,
    preset: str = "mergekit",
    majority_sign: str | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """TIES on arrays: trim each task vector to its top floor(density * n) magnitudes, elect signs,
    disjoint-mean, out = base + lambda * mean (see `umerge.ties` for the presets)."""
    if not (0.0 < float(density) <= 1.0):
        raise InputError(f"density {density} is outside (0, 1]: it is the fraction of entries kept")
    if weights is not None and len(weights) != len(models):
        raise InputError(f"{len(weights)} weights given for {len(models)} arrays")
    params: dict[str, Any] = {"density": float(density), "lambda": float(lambda_), "preset": preset}
    if majority_sign is not None:
        params["majority_sign"] = majority_sign
    mp = [{"weight": float(w)} for w in weights] if weights is not None else None
    return merge_arrays("ties", base, models, params, mp, threads)


__all__ = ["merge_arrays", "ties"]
