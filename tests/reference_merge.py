"""Independent float64 numpy references for TIES, written from the published descriptions.

These are the yardsticks the engine is measured against, so they are deliberately naive: whole
arrays, float64, a full sort for trimming, one line per formula. Nothing here imports umerge.

Notation: base tensor b, task vectors (deltas) d_i = m_i - b for models i = 1..N, weights w_i,
density rho, scaling lambda.

Trim (all three): keep the k = floor(rho * n) entries of largest |d_i| and zero the rest. mergekit
and PEFT trim each tensor of each model separately (n = tensor size); the TIES paper trims each
model's whole flattened task vector at once (n = all parameters). Ties at the k-th magnitude are
broken by the lowest flat index, the rule umerge documents; `threshold_ties` returns the positions
where another tie-break could legitimately choose differently, so tests can exclude exactly those.

mergekit `ties` (merge_methods/generalized_task_arithmetic.py, sparsify.magnitude):
    t_i = w_i * trim(d_i)
    gamma = +1 where sum_i t_i >= 0 else -1                 (elected on the weighted deltas)
    a_i = [sign(t_i) == gamma]                              (zeros never agree)
    out = b + lambda * sum_i(a_i t_i) / D,  D = sum_i(a_i w_i), with D = 0 replaced by 1

PEFT `ties` (peft.utils.merge_utils.ties; the caller adds the result to the base):
    t_i = trim(d_i)
    gamma = +1 where sum_i t_i >= 0 else -1                 (elected on the unweighted deltas)
    a_i = [sign(t_i) == gamma]
    out = b + lambda * sum_i(a_i w_i t_i) / max(1, sum_i a_i)

TIES paper (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS
2023, Algorithm 1 and the authors' reference code, github.com/prateeky2806/ties-merging):
    t_i = trim over the whole model(d_i); the authors' code (topk_values_mask) keeps every entry
          with |d| >= the (n - k)-th smallest magnitude (torch.kthvalue), k = int(rho * n): ties
          are all kept, so k + 1 entries or more survive; density >= 1 keeps everything
    gamma = sign(sum_i t_i); where gamma == 0 it is set to the majority sign, sign(sum over all
            parameters of gamma)
    a_i = [t_i > 0] where gamma > 0, else [t_i < 0]
    out = b + lambda * sum_i(a_i t_i) / max(1, sum_i a_i)
    (umerge also accepts weights here: they multiply t_i in the sum, and only nonzero weighted
    entries are counted, as the authors' `(selected_entries != 0).sum()` does)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Array = np.ndarray


def keep_count(density: float, n: int) -> int:
    """k = floor(density * n), computed as mergekit and PEFT do: `int(density * n)` in float64."""
    if density >= 1:
        return n
    return int(density * n)


def topk_mask(x: Array, k: int) -> Array:
    """Boolean mask of the k largest |x| (flat order), ties broken by the lowest index."""
    flat = np.abs(np.asarray(x, dtype=np.float64)).ravel()
    order = np.argsort(-flat, kind="stable")  # stable: equal magnitudes stay in index order
    mask = np.zeros(flat.size, dtype=bool)
    mask[order[:k]] = True
    return mask.reshape(np.shape(x))


def threshold_ties(x: Array, k: int) -> Array:
    """Mask of the entries whose keep/drop decision depends on the tie-break rule.

    Those are the entries whose |x| equals the k-th largest magnitude when that value is shared
    by entries on both sides of the cut. Empty when k is 0 or n or the cut falls between
    distinct magnitudes.
    """
    flat = np.abs(np.asarray(x, dtype=np.float64)).ravel()
    out = np.zeros(flat.size, dtype=bool)
    if 0 < k < flat.size:
        t = np.sort(flat)[::-1][k - 1]
        if np.count_nonzero(flat >= t) > k:
            out = flat == t
    return out.reshape(np.shape(x))


def trim(delta: Array, density: float) -> Array:
    """Zero all but the k = floor(density * n) largest-magnitude entries of one tensor."""
    delta = np.asarray(delta, dtype=np.float64)
    return np.where(topk_mask(delta, keep_count(density, delta.size)), delta, 0.0)


def mergekit_ties(base: Array, deltas: Sequence[Array], density: float | Sequence[float],
                  weights: Sequence[float] | None = None, lambda_: float = 1.0) -> Array:
    """One tensor merged as mergekit's `ties` does (see the module docstring), in float64."""
    base = np.asarray(base, dtype=np.float64)
    weights = [1.0] * len(deltas) if weights is None else list(weights)
    densities = [density] * len(deltas) if np.isscalar(density) else list(density)  # type: ignore[arg-type]
    t = np.stack([w * trim(d, rho) for d, w, rho in zip(deltas, weights, densities)])
    w = np.asarray(weights, dtype=np.float64).reshape((-1,) + (1,) * base.ndim)
    gamma = np.where(t.sum(axis=0) >= 0, 1.0, -1.0)
    agree = np.sign(t) == gamma
    divisor = (w * agree).sum(axis=0)
    divisor = np.where(divisor == 0, 1.0, divisor)
    return base + lambda_ * (t * agree).sum(axis=0) / divisor


def peft_ties(base: Array, deltas: Sequence[Array], density: float,
              weights: Sequence[float] | None = None, lambda_: float = 1.0) -> Array:
    """One tensor merged as `base + lambda * peft.utils.merge_utils.ties(deltas, weights, density)`."""
    base = np.asarray(base, dtype=np.float64)
    weights = [1.0] * len(deltas) if weights is None else list(weights)
    t = np.stack([trim(d, density) for d in deltas])
    w = np.asarray(weights, dtype=np.float64).reshape((-1,) + (1,) * base.ndim)
    gamma = np.where(t.sum(axis=0) >= 0, 1.0, -1.0)
    agree = np.sign(t) == gamma
    count = np.maximum(agree.sum(axis=0), 1)
    return base + lambda_ * (w * t * agree).sum(axis=0) / count


def paper_trim_mask(x: Array, density: float) -> Array:
    """The authors' trim: keep |x| >= the (n - int(density * n))-th smallest |x|; all if density >= 1.

    With k = int(density * n) = 0 the threshold is the largest magnitude, so its entries survive.
    """
    flat = np.abs(np.asarray(x, dtype=np.float64)).ravel()
    if density >= 1:
        return np.ones(np.shape(x), dtype=bool)
    k = int(density * flat.size)
    kth = np.sort(flat)[flat.size - k - 1]  # (n - k)-th smallest, 1-based
    return (flat >= kth).reshape(np.shape(x))


def paper_ties(base: Mapping[str, Array], deltas: Sequence[Mapping[str, Array]], density: float,
               lambda_: float = 1.0, weights: Sequence[float] | None = None, trim_rule: str = "kthvalue",
               order: Sequence[str] | None = None, majority: float | None = None) -> dict[str, Array]:
    """Whole-model TIES as in the paper: global trim per model, zero signs -> majority sign.

    `trim_rule` is "kthvalue" (the authors' code, ties kept) or "exact" (exactly k, lowest index
    first). `order` is the order in which tensors are concatenated into one vector (it matters
    only for "exact" ties at the global threshold); by default sorted names. `majority` forces the
    sign given to zero sums instead of computing it (for tests where float32 rounding of near-zero
    sums could change the count).
    """
    names = list(order) if order is not None else sorted(base)
    weights = [1.0] * len(deltas) if weights is None else list(weights)
    sizes = [np.asarray(base[n]).size for n in names]
    flat_base = np.concatenate([np.asarray(base[n], dtype=np.float64).ravel() for n in names])
    flat_d = [np.concatenate([np.asarray(d[n], dtype=np.float64).ravel() for n in names]) for d in deltas]
    if trim_rule == "kthvalue":
        t = np.stack([np.where(paper_trim_mask(d, density), d, 0.0) for d in flat_d])
    elif trim_rule == "exact":
        k = keep_count(density, flat_base.size)
        t = np.stack([np.where(topk_mask(d, k), d, 0.0) for d in flat_d])
    else:
        raise ValueError(trim_rule)
    gamma = np.sign(t.sum(axis=0))
    if majority is None:
        majority = float(np.sign(gamma.sum()))
    gamma = np.where(gamma == 0, majority, gamma)
    agree = np.where(gamma > 0, t > 0, t < 0)
    selected = np.asarray(weights, dtype=np.float64)[:, None] * t * agree
    merged = flat_base + lambda_ * selected.sum(axis=0) / np.maximum((selected != 0).sum(axis=0), 1)
    out: dict[str, Array] = {}
    start = 0
    for n, size in zip(names, sizes):
        out[n] = merged[start:start + size].reshape(np.shape(base[n]))
        start += size
    return out


def paper_threshold_ties(deltas: Sequence[Mapping[str, Array]], density: float,
                         order: Sequence[str]) -> list[dict[str, Array]]:
    """Per model, per tensor: entries whose global-trim decision depends on the tie-break."""
    out = []
    for d in deltas:
        flat = np.concatenate([np.asarray(d[n], dtype=np.float64).ravel() for n in order])
        ties = threshold_ties(flat, keep_count(density, flat.size))
        parts, start = {}, 0
        for n in order:
            size = np.asarray(d[n]).size
            parts[n] = ties[start:start + size].reshape(np.shape(d[n]))
            start += size
        out.append(parts)
    return out


def near_zero_sum(t: Array, rel: float = 2.0 ** -20) -> Array:
    """Where the sign election sum_i t_i is within float32 rounding of 0 (but not all-zero).

    The engine (and mergekit, and PEFT) add float32 values; when the exact sum is 0 or a few ulps
    from it, float32 rounding may elect the other sign than float64 does. Such elements are sign
    ties, ambiguous in the same way as magnitude ties at the trim threshold.
    """
    t = np.asarray(t, dtype=np.float64)
    mag = np.abs(t).sum(axis=0)
    return (np.abs(t.sum(axis=0)) <= rel * mag) & (mag > 0)


def ambiguous(deltas: Sequence[Array], density: float, weights: Sequence[float] | None = None,
              weighted_sign: bool = True, trim_ties: bool = True) -> Array:
    """Elements of one tensor where per-tensor TIES depends on tie-breaking or float32 rounding.

    Magnitude ties at the trim threshold of any model (unless `trim_ties` is False: then the
    lowest-index rule is taken as part of the contract), or (after trimming) a sign-election sum
    that float32 cannot resolve; `weighted_sign` elects on w_i * t_i (mergekit) or on t_i (PEFT).
    """
    weights = [1.0] * len(deltas) if weights is None else list(weights)
    out = np.zeros(np.shape(deltas[0]), dtype=bool)
    trimmed = []
    for d, w in zip(deltas, weights):
        k = keep_count(density, np.size(d))
        if trim_ties:
            out |= threshold_ties(d, k)
        trimmed.append((w if weighted_sign else 1.0) * np.where(topk_mask(d, k), d, 0.0))
    return out | near_zero_sum(np.stack(trimmed))


def breadcrumbs_mask(x: Array, density: float, gamma: float) -> Array:
    """Model Breadcrumbs (Davari and Belilovsky, 2024, arXiv:2312.06795) with mergekit's counts.

    kept = floor(density * n), dropped = min(floor(gamma * n), n - kept): the `dropped` largest
    |x| go as outliers and the next `kept` stay (ranks by magnitude, lowest index first); density
    1 keeps everything.
    """
    n = np.size(x)
    if density >= 1:
        return np.ones(np.shape(x), dtype=bool)
    kept = keep_count(density, n)
    dropped = min(int(gamma * n), n - kept)
    return topk_mask(x, dropped + kept) & ~topk_mask(x, dropped)


def breadcrumbs(base: Array, deltas: Sequence[Array], density: float, gamma: float,
                weights: Sequence[float], consensus: bool, lambda_: float = 1.0) -> Array:
    """mergekit `breadcrumbs` (consensus False) / `breadcrumbs_ties` (True), normalize off, float64."""
    base = np.asarray(base, dtype=np.float64)
    t = np.stack([w * np.where(breadcrumbs_mask(d, density, gamma), np.asarray(d, np.float64), 0.0)
                  for d, w in zip(deltas, weights)])
    if consensus:
        gamma_sign = np.where(t.sum(axis=0) >= 0, 1.0, -1.0)
        t = np.where(np.sign(t) == gamma_sign, t, 0.0)
    return base + lambda_ * t.sum(axis=0)
