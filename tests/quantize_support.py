"""The numpy reference of `umerge.quantize` (see tests/test_quantize.py for why it is bit-exact)."""

from __future__ import annotations

import numpy as np


def rtn_reference(w: np.ndarray, bits: int, group: int | None) -> np.ndarray:
    """Group-wise symmetric round-to-nearest of a float32 matrix, dequantized, as float32."""
    qmax = 2 ** (bits - 1) - 1
    w = np.asarray(w, dtype=np.float32)
    rows, cols = w.shape
    g = cols if group is None else group
    out = np.empty_like(w)
    for c0 in range(0, cols, g):
        blk = w[:, c0:c0 + g].astype(np.float64)
        m = np.abs(blk).max(axis=1, keepdims=True)
        scale = (m / qmax).astype(np.float32).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            x = (blk / scale).astype(np.float32).astype(np.float64)
        q = np.clip(np.round(x), -qmax, qmax)
        wq = (q * scale).astype(np.float32)
        out[:, c0:c0 + g] = np.where(scale == 0, np.float32(0.0), wq)
    return out
