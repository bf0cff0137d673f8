"""Helpers shared by the TIES tests: run a merge, load checkpoints, compare against a reference.

Comparisons are elementwise with a tolerance derived from float32 arithmetic: the engine computes
in float32, so each output element may differ from the float64 reference by a few float32 ulps of
the magnitudes involved (|base| and the weighted deltas), plus one ulp of the output dtype when the
output is narrower than float32. A wrongly kept or dropped delta (about 1e-3 here) is five orders of
magnitude above that tolerance, so selection errors cannot hide in it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from umerge.safetensors_io import checkpoint_dtypes
from umerge.synthetic import load_checkpoint

#: Relative float32 error allowed: 8 float32 epsilons.
F32_REL = 2.0 ** -20
#: One ulp of each output dtype, relative to the value (upper bound), and the ulp of its subnormals.
DTYPE_ULP = {"F32": 2.0 ** -23, "BF16": 2.0 ** -7, "F16": 2.0 ** -10, "F64": 2.0 ** -52}
SUBNORMAL_ULP = {"F32": 2.0 ** -149, "BF16": 2.0 ** -133, "F16": 2.0 ** -24, "F64": 2.0 ** -1074}


def api_ties(models: Sequence[Path], base: Path, out: Path, **kwargs: Any) -> Any:
    """`umerge.ties(...)` without a progress bar; returns its report."""
    import umerge

    kwargs.setdefault("progress", False)
    return umerge.ties([str(m) for m in models], base=str(base), out=str(out), **kwargs)


def load(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint as float32 (float64 stays float64)."""
    return load_checkpoint(path)


def task_vectors(base: Mapping[str, np.ndarray],
                 models: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """d_i = m_i - base, computed in float32 like the engine and mergekit do, then held as float64."""
    return [{n: (m[n].astype(np.float32) - base[n].astype(np.float32)).astype(np.float64) for n in base}
            for m in models]


def tolerance(base: np.ndarray, deltas: Sequence[np.ndarray], weights: Sequence[float] | None,
              lambda_: float, ref: np.ndarray, out_dtype: str = "F32") -> np.ndarray:
    """Allowed |engine - reference| per element (see the module docstring)."""
    weights = [1.0] * len(deltas) if weights is None else weights
    scale = np.abs(base.astype(np.float64)) + abs(lambda_) * sum(abs(w) * np.abs(d) for w, d in zip(weights, deltas))
    tol = F32_REL * scale + 1e-30
    if out_dtype != "F32":
        tol = tol + np.maximum(DTYPE_ULP[out_dtype] * np.abs(ref), SUBNORMAL_ULP[out_dtype])
    return tol


def compare(name: str, got: np.ndarray, ref: np.ndarray, tol: np.ndarray,
            exclude: np.ndarray | None = None) -> list[str]:
    """Mismatch descriptions (empty when every non-excluded element is within tolerance)."""
    if got.shape != ref.shape:
        return [f"{name}: shape {got.shape} != reference {ref.shape}"]
    bad = ~(np.abs(got.astype(np.float64) - ref) <= tol)
    if exclude is not None:
        bad &= ~exclude
    if not bad.any():
        return []
    idx = np.flatnonzero(bad)
    i = idx[0]
    return [f"{name}: {idx.size}/{got.size} elements off, first at flat index {i}: "
            f"got {got.ravel()[i]!r}, reference {ref.ravel()[i]!r}, tolerance {tol.ravel()[i]:.3g}"]


def dtypes_of(path: Path) -> dict[str, str]:
    """Tensor name -> safetensors dtype of a checkpoint."""
    return checkpoint_dtypes(path)


def weight_files(path: Path) -> dict[str, bytes]:
    """Bytes of every weight file and index of an output directory, by file name."""
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir())
            if p.name.endswith(".safetensors") or p.name.endswith(".index.json")}

