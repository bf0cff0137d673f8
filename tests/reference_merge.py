"""Independent float64 numpy references for TIES and the spherical methods, written from the
published descriptions and mergekit 0.1.5's source (the spherical ones at the end of this file).

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
                  weights: Sequence[float] | None = None, lambda_: float = 1.0, normalize: bool = True) -> Array:
    """One tensor merged as mergekit's `ties` does (see the module docstring), in float64.

    `normalize=False` is mergekit's `normalize: false`: the agreeing sum is not divided by D."""
    base = np.asarray(base, dtype=np.float64)
    weights = [1.0] * len(deltas) if weights is None else list(weights)
    densities = [density] * len(deltas) if np.isscalar(density) else list(density)  # type: ignore[arg-type]
    t = np.stack([w * trim(d, rho) for d, w, rho in zip(deltas, weights, densities)])
    w = np.asarray(weights, dtype=np.float64).reshape((-1,) + (1,) * base.ndim)
    gamma = np.where(t.sum(axis=0) >= 0, 1.0, -1.0)
    agree = np.sign(t) == gamma
    divisor = (w * agree).sum(axis=0)
    divisor = np.where(divisor == 0, 1.0, divisor) if normalize else 1.0
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


# -- the spherical methods and nearswap (mergekit 0.1.5, merge_methods/*.py), step by step ---------
#
# Each follows mergekit's steps literally, in float64 on whole arrays (mergekit computes in the
# inputs' dtype, float32 here): the tangent-space step of multislerp and the iteration of karcher
# are carried out on the vectors themselves, not on coefficients as umerge does.


def _f64(x: Array) -> Array:
    return np.asarray(x, dtype=np.float64)


def model_stock(base: Array, models: Sequence[Array], filter_wise: bool = False) -> Array:
    """mergekit `model_stock`: t = N cos / (1 + (N-1) cos) from the mean pairwise cosine of the
    offsets (per tensor, or per row of the last dimension with `filter_wise`; 1-D is one row);
    t = 0 where |1 + (N-1) cos| < 1e-6; out = t * mean(models) + (1 - t) * base."""
    w0 = _f64(base)
    shape = w0.shape
    ws = [_f64(m) for m in models]
    if filter_wise:
        if w0.ndim == 1:
            w0, ws = w0[None, :], [w[None, :] for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offs = [w - w0 for w in ws]
    cos = []
    for i, a in enumerate(offs):
        for b in offs[i + 1:]:
            norm = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
            cos.append(np.clip((a * b).sum(axis=-1) / np.maximum(norm, 1e-6), -1, 1))
    c = np.mean(cos, axis=0)[..., None]
    n = len(ws)
    den = 1 + (n - 1) * c
    t = np.where(np.abs(den) < 1e-6, 0.0, n * c / np.where(np.abs(den) < 1e-6, 1.0, den))
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(shape)


def _slerp_rows(t: float, v0: Array, v1: Array, eps: float = 1e-8) -> Array:
    """mergekit `nuslerp`'s kernel along the last axis: normalise (norm clamped to 1e-7), cos,
    collinear when 1 - cos^2 <= eps^2 (then linear), else sin-weighted on the raw vectors.

    The collinearity test is made in float32, as mergekit makes it on float32 inputs: there it
    holds exactly when cos^2 rounds to 1. In float64 it would hold only for vectors collinear to
    1e-8, and nearly (anti)parallel ones would take the sin branch, where 1/sin(theta) of about
    1e8 turns the last bits of the sums into the result."""
    n0 = np.maximum(np.linalg.norm(v0, axis=-1, keepdims=True), 1e-7)
    n1 = np.maximum(np.linalg.norm(v1, axis=-1, keepdims=True), 1e-7)
    cos = np.clip(((v0 / n0) * (v1 / n1)).sum(axis=-1, keepdims=True), -1, 1)
    c32 = cos.astype(np.float32)
    colinear = (np.float32(1) - c32 * c32) <= np.float32(eps ** 2)
    theta = np.arccos(np.where(colinear, 0.0, cos))
    with np.errstate(divide="ignore", invalid="ignore"):
        res = (np.sin((1 - t) * theta) * v0 + np.sin(t * theta) * v1) / np.sin(theta)
    return np.where(colinear, (1 - t) * v0 + t * v1, res)


def nuslerp(x0: Array, x1: Array, weights: Sequence[float] = (1.0, 1.0), base: Array | None = None,
            flatten: bool = True, row_wise: bool = False) -> Array:
    """mergekit `nuslerp`: t = w1 / (w0 + w1) (0.5 when |sum| < 1e-6); on task vectors when a base
    is given; vectors are the flattened tensor, its last-axis rows, or (row_wise) vectors along
    axis 0 (mergekit transposes axes 0 and -1)."""
    total = weights[0] + weights[1]
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    v0, v1 = _f64(x0), _f64(x1)
    if base is not None:
        v0, v1 = v0 - _f64(base), v1 - _f64(base)
    shape = v0.shape
    if flatten:
        r = _slerp_rows(t, v0.reshape(-1), v1.reshape(-1)).reshape(shape)
    elif row_wise:
        r = np.swapaxes(_slerp_rows(t, np.swapaxes(v0, 0, -1), np.swapaxes(v1, 0, -1)), 0, -1)
    else:
        r = _slerp_rows(t, v0, v1)
    return r if base is None else r + _f64(base)


def multislerp(models: Sequence[Array], weights: Sequence[float], base: Array | None = None,
               normalize_weights: bool = True, eps: float = 1e-8) -> Array:
    """mergekit `multislerp`, every step: unit vectors x / (|x| + eps), their weighted mean M, the
    tangent vectors at M/|M| and their weighted sum T, the exponential map cos|T| M/|M| +
    sin|T| T/|T| (|T| + eps), scaled by the weighted mean norm; base added back. One model: itself."""
    if len(models) == 1:
        return _f64(models[0])
    xs = np.stack([_f64(m).reshape(-1) for m in models])
    if base is not None:
        xs = xs - _f64(base).reshape(-1)
    w = np.asarray(weights, dtype=np.float64)
    if normalize_weights:
        w = w / w.sum()
    norms = np.linalg.norm(xs, axis=-1, keepdims=True)
    units = xs / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean_norm = np.linalg.norm(mean)
    if mean_norm < eps:
        if len(models) != 2:
            raise ValueError("the weighted mean of the unit vectors is zero")
        res = xs[0] * w[0] + xs[1] * w[1]
    else:
        mean = mean / mean_norm
        dots = (units * mean).sum(-1, keepdims=True)
        tangent = ((units - dots * mean) * w[:, None]).sum(0)
        tn = np.linalg.norm(tangent) + eps
        res = (mean * np.cos(tn) + tangent * (np.sin(tn) / tn)) * (norms[:, 0] * w).sum()
    res = res.reshape(np.shape(models[0]))
    return res if base is None else res + _f64(base)


def karcher(models: Sequence[Array], max_iter: int = 10, tol: float = 1e-5) -> Array:
    """mergekit `karcher`: equal weights; inputs with norm <= tol left out of the direction; start at
    the normalised mean of the unit vectors (the first one when that mean is shorter than tol);
    Riemannian gradient steps by the exponential map until the step is shorter than tol; times
    the mean norm of all inputs."""
    if len(models) == 1:
        return _f64(models[0])
    xs = [_f64(m).reshape(-1) for m in models]
    alphas = [1.0 / len(xs)] * len(xs)
    norms = [float(np.linalg.norm(x)) for x in xs]
    units = [x / n if n else np.zeros_like(x) for x, n in zip(xs, norms)]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return np.zeros(np.shape(models[0]))
    a = [alphas[i] / sum(alphas[j] for j in valid) for i in valid]
    us = [units[i] for i in valid]
    mean = sum(ai * u for ai, u in zip(a, us))
    mn = np.linalg.norm(mean)
    mean = us[0].copy() if mn < tol else mean / mn
    for _ in range(max_iter):
        tangent = np.zeros_like(mean)
        for ai, u in zip(a, us):
            dot = np.clip(mean @ u, -1.0, 1.0)
            theta = np.arccos(dot)
            if theta < tol:
                continue
            tangent += ai * (theta / np.sin(theta)) * (u - dot * mean)
        tn = np.linalg.norm(tangent)
        if tn < tol:
            break
        mean = np.cos(tn) * mean + np.sin(tn) * (tangent / tn)
        un = np.linalg.norm(mean)
        if un > tol:
            mean = mean / un
    scale = sum(al * n for al, n in zip(alphas, norms))
    return (scale * mean).reshape(np.shape(models[0]))


def nearswap(base: Array, model: Array, t: float) -> Array:
    """mergekit `nearswap`: w = clip(t / max(|base - model|, 1e-6), 0, 1); w model + (1 - w) base."""
    a, b = _f64(base), _f64(model)
    w = np.clip(t / np.maximum(np.abs(a - b), 1e-6), 0.0, 1.0)
    return w * b + (1 - w) * a


# -- SCE, Arcee Fusion, RAM ---------------------------------------------------------------------------
#
# mergekit 0.1.5 `merge_methods/sce.py` (Wan et al., 2024, FuseChat, arXiv:2408.07990),
# `arcee_fusion.py` and `ram.py` (Yuan et al., 2026, arXiv:2601.13572), one line per step, float64.


def sce(base: Array, models: Sequence[Array], select_topk: float = 1.0) -> Array:
    """mergekit `sce`: select the elements of largest variance across the task vectors, weight the
    models by their task vectors' mean squares, erase the entries against the elected sign.

    select (select_topk < 1): var = population variance over the models; k = the number of
    non-zero variances times select_topk, truncated (torch computes the product in float32, so it
    is taken here in float32 too); the k largest variances are kept (lowest index first among
    equal ones), every task vector zeroed elsewhere. calculate: s_i = mean(d_i^2), w_i = s_i / sum s
    (1 / N each when sum s < 1e-6). erase: gamma = sign of sum_i d_i (+ at 0), a_i = w_i where
    sign(d_i) = gamma; out = b + sum_i a_i d_i / max(sum_i a_i, 1e-6)."""
    b = _f64(base).reshape(-1)
    d = np.stack([_f64(m).reshape(-1) - b for m in models])
    if select_topk < 1:
        var = d.var(axis=0)
        k = int(np.float32(np.count_nonzero(var)) * np.float32(select_topk))
        keep = np.zeros(b.size, dtype=bool)
        keep[np.argsort(-var, kind="stable")[:k]] = True
        d = d * keep
    s = (d**2).mean(axis=1)
    w = np.full(len(models), 1.0 / len(models)) if abs(s.sum()) < 1e-6 else s / s.sum()
    gamma = np.where(d.sum(axis=0) >= 0, 1.0, -1.0)
    a = np.where(np.sign(d) == gamma, w[:, None], 0.0)
    out = b + (a * d).sum(axis=0) / np.maximum(a.sum(axis=0), 1e-6)
    return out.reshape(np.shape(base))


def arcee_importance(base: Array, model: Array) -> Array:
    """|model - base| times the KL divergence of softmax(model) + 1e-8 from softmax(base) + 1e-8,
    per row of the last dimension (one number per row)."""
    a, x = _f64(base), _f64(model)

    def softmax(v: Array) -> Array:
        e = np.exp(v - v.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p, q = softmax(x) + 1e-8, softmax(a) + 1e-8
    kl = (p * np.log(p / q)).sum(axis=-1, keepdims=True)
    return np.abs(x - a) * kl


def arcee_fusion(base: Array, model: Array) -> tuple[Array, Array]:
    """mergekit `arcee_fusion` (with its exact sort, as it takes for tensors of at most 10^6
    elements): the quartiles q1, median, q3 of the importances at sorted positions floor(q (n - 1)),
    threshold = median + 1.5 (q3 - q1), out = model where importance >= threshold, else base.
    Returns (out, the mask)."""
    imp = arcee_importance(base, model)
    s = np.sort(imp.reshape(-1))
    n = s.size
    q1, median, q3 = s[(n - 1) // 4], s[(n - 1) // 2], s[3 * (n - 1) // 4]
    mask = imp >= median + 1.5 * (q3 - q1)
    return np.where(mask, _f64(model), _f64(base)), mask


def ram(base: Array, models: Sequence[Array], epsilon: float = 1e-5, plus: bool = False, r: float = 0.1,
        alpha: float = 0.2) -> Array:
    """mergekit `ram` / `ramplus_tl`: entries with |d_i| > epsilon contribute; c = their number per
    element; unique elements (c = 1) take the update whole (times lambda_i for RAM+), shared ones
    (c > 1) its mean. RAM+: lambda_i = 1 + r clip(S_i / max(U_i, epsilon), 0, alpha) with S_i, U_i
    model i's contributing entries in shared and unique elements of the tensor."""
    b = _f64(base).reshape(-1)
    d = np.stack([_f64(m).reshape(-1) - b for m in models])
    on = np.abs(d) > epsilon
    c = on.sum(axis=0)
    unique, shared = c == 1, c > 1
    lam = np.ones(len(models))
    if plus:
        s_i, u_i = (on & shared).sum(axis=1), (on & unique).sum(axis=1)
        lam = 1 + r * np.clip(s_i / np.maximum(u_i, epsilon), 0, alpha)
    z = d * on
    merged = (z * unique * lam[:, None] + z * shared / np.maximum(c, 1)).sum(axis=0)
    return (b + merged).reshape(np.shape(base))
