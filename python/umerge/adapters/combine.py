"""Combining LoRA adapters the way PEFT's `LoraModel.add_weighted_adapter` does, without torch.

Per targeted module, with adapter i's factors A_i [r, in], B_i [out, r], scaling s_i and
weight w_i:

**Factor-wise** (`linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`; all ranks equal).
PEFT splits each adapter's weight between the two factors, c_i = w_i * s_i,
wA_i = sign(c_i) * sqrt(|c_i|) and wB_i = sqrt(|c_i|) (the sign goes on A only, so that a
negative weight negates the product once), and merges the stacked A_i and, separately, the
stacked B_i with the merge-utility function of that name (`peft.utils.merge_utils`):

- linear: sum_i w_i x_i
- magnitude_prune: sum_i w_i prune_k(x_i), keeping the k = int(density * n) largest |x|
- ties: trim each x_i to its top k, elect the sign per element on the *unweighted* trimmed
  tensors (`total`: sign of the sum; `frequency`: sign of the sum of signs; >= 0 is +), then
  sum of the agreeing w_i x_i divided by the count of agreeing entries (at least 1)
- dare_linear / dare_ties: keep each entry with probability density and divide the kept ones
  by density (Yu et al., 2024, "Language Models are Super Mario", arXiv:2311.03099), then
  linear / ties without trimming.

The result has rank r and PEFT sets lora_alpha = r, so its scaling is 1 (the s_i are inside).
TIES runs on the engine's kernel (`umerge.ops.ties`, preset `peft`); note that it acts on the
factors, not on the update B @ A that the model feels.

**Full update** (`svd`, `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd`):
delta_i = s_i * B_i @ A_i, merged with the same function (linear for `svd`), then the best
rank-k approximation by SVD, delta ~ U S V^T: B = U_k S_k, A = V_k^T, k = svd_rank or the
largest input rank, lora_alpha = k. An SVD fixes each singular pair only up to sign; umerge
makes the largest-magnitude entry of each column of U positive (PEFT keeps whatever LAPACK
returns), so compare B and A with the products, or up to those signs.

**cat**: A = [c_1 A_1; c_2 A_2; ...] (rows), B = [B_1, B_2, ...] (columns): exactly
sum_i c_i B_i A_i with rank sum_i r_i and lora_alpha = that rank.

Random pruning draws from numpy's PCG64 keyed by (seed, module, factor), so results are
reproducible but not PEFT's torch draws: DARE results agree with PEFT in distribution only.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from umerge.errors import InputError

FACTORWISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
EXACT = ("cat",)
COMBINATIONS = FACTORWISE + SVD + EXACT
NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
MAJORITY = ("total", "frequency")


def split_weights(weights: Sequence[float], scalings: Sequence[float]) -> tuple[list[float], list[float]]:
    """PEFT's split of w_i * s_i over the factors: (sign * sqrt|c| for A, sqrt|c| for B)."""
    wa, wb = [], []
    for w, s in zip(weights, scalings):
        c = float(w) * float(s)
        root = float(np.sqrt(abs(c)))
        wa.append(root if c >= 0 else -root)
        wb.append(root)
    return wa, wb


def magnitude_prune_mask(x: np.ndarray, density: float) -> np.ndarray:
    """Keeps the k = int(density * n) largest |x| (equal magnitudes: lowest index first); density >= 1 keeps all."""
    if density >= 1:
        return x
    flat = x.reshape(-1)
    k = int(density * flat.size)
    out = np.zeros_like(flat)
    if k > 0:
        idx = np.argsort(-np.abs(flat), kind="stable")[:k]
        out[idx] = flat[idx]
    return out.reshape(x.shape)


def dare_prune(x: np.ndarray, density: float, rng: np.random.Generator) -> np.ndarray:
    """Keeps each entry with probability `density`, divides the kept ones by density; density >= 1 keeps all."""
    if density >= 1:
        return x
    keep = rng.random(x.shape) < density
    return np.where(keep, x / np.float32(density), np.float32(0)).astype(np.float32)


def _rng(seed: int, module: str, part: str) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(module.encode()), zlib.crc32(part.encode())])


def combine(
    kind: str,
    xs: Sequence[np.ndarray],
    weights: Sequence[float],
    *,
    density: float | None,
    majority_sign: str,
    seed: int,
    module: str,
    part: str,
    threads: int | None = None,
) -> np.ndarray:
    """One PEFT merge-utility step on stacked tensors `xs` (float32), by base name
    (`linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`)."""
    w = np.asarray(weights, dtype=np.float32)
    if kind == "linear":
        return np.tensordot(w, np.stack(xs), axes=1).astype(np.float32)
    if density is None:
        raise InputError(f"{kind} needs a density")
    if kind == "magnitude_prune":
        return np.tensordot(w, np.stack([magnitude_prune_mask(x, density) for x in xs]), axes=1).astype(np.float32)
    if kind == "ties":
        from umerge import ops

        return ops.ties(None, list(xs), density=density, weights=list(map(float, w)), preset="peft",
                        majority_sign=majority_sign, threads=threads)
    if kind in ("dare_linear", "dare_ties"):
        rng = _rng(seed, module, part)
        pruned = [dare_prune(x, density, rng) for x in xs]
        if kind == "dare_linear":
            return np.tensordot(w, np.stack(pruned), axes=1).astype(np.float32)
        from umerge import ops

        return ops.ties(None, pruned, density=1.0, weights=list(map(float, w)), preset="peft",
                        majority_sign=majority_sign, threads=threads)
    raise InputError(f"unknown combination {kind!r}")


def svd_factors(delta: np.ndarray, rank: int, clamp: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Best rank-`rank` factors of `delta` [out, in]: (B = U_k S_k, A = V_k^T), float64 SVD,
    signs fixed so each column of U has its largest-magnitude entry positive; `clamp` clips both
    factors to the clamp-quantile of their entries as PEFT's svd_clamp does."""
    if rank > min(delta.shape):
        raise InputError(f"svd rank {rank} exceeds the module's smaller dimension {min(delta.shape)}")
    u, s, vt = np.linalg.svd(delta.astype(np.float64), full_matrices=False)
    u, s, vt = u[:, :rank], s[:rank], vt[:rank]
    flip = np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(rank)])
    flip[flip == 0] = 1
    u, vt = u * flip, vt * flip[:, None]
    b, a = u * s, vt
    if clamp is not None:
        hi = np.quantile(np.concatenate([b.ravel(), a.ravel()]), clamp)
        b, a = np.clip(b, -hi, hi), np.clip(a, -hi, hi)
    return b.astype(np.float32), a.astype(np.float32)


def base_kind(combination: str) -> str:
    """`ties_svd` -> `ties`, `svd` -> `linear`."""
    if combination == "svd":
        return "linear"
    return combination[: -len("_svd")] if combination.endswith("_svd") else combination


__all__ = ["COMBINATIONS", "EXACT", "FACTORWISE", "MAJORITY", "NEEDS_DENSITY", "SVD", "base_kind", "combine",
           "dare_prune", "magnitude_prune_mask", "split_weights", "svd_factors"]
