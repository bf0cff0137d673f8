"""The merge methods as Python functions: `umerge.linear(...)`, `umerge.dare_ties(...)`, ...

Each is a thin wrapper over `umerge.merge.merge(method=...)`: it builds the method's parameters
and runs the engine, which checks them (a missing base, density outside (0, 1], an unknown
rescale, ...: one place per rule, with the engine's message) (TIES is `umerge.ties`, in `umerge.merge`). Common
keyword options, passed through unchanged: ``out`` (default ``merged``), ``out_dtype``,
``threads``, ``memory_budget``, ``max_shard_size``, ``strict``, ``overwrite``,
``allow_nonfinite``, ``progress``. Every function returns a `MergeReport`.

Parameter values (``weights`` entries, ``density``, ``t``, ...) may be numbers, gradients (lists
interpolated over the layer index) or mergekit-style filter rules, as in `umerge.merge`.
Task vectors are d_i = model_i - base. Formulas and sources are in each docstring; the engine's
`methods/*.rs` files state the same formulas next to the kernels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from umerge.merge import MergeReport, ParamValue, PathLike, merge, weight_params

DEFAULT_SEED = 0


def _models(models: Sequence[PathLike] | PathLike) -> list[PathLike]:
    if isinstance(models, (str, os.PathLike)):
        return [models]
    return list(models)


def linear(models: Sequence[PathLike], *, weights: Sequence[ParamValue] | None = None, normalize: bool = True,
           **options: Any) -> MergeReport:
    """Weighted average of models (model soups; Wortsman et al., 2022, arXiv:2203.05482; mergekit `linear`).

    out = sum_i w_i x_i / sum_i w_i (without `normalize`: the plain weighted sum). Weights default
    to 1.0; weights summing to 0 with `normalize` are an error. No base is involved.
    """
    ms = _models(models)
    return merge("linear", ms, params={"normalize": bool(normalize)}, model_params=weight_params(weights, len(ms)),
                 **options)


def task_arithmetic(models: Sequence[PathLike], base: PathLike | None = None, *,
                    weights: Sequence[ParamValue] | None = None, lambda_: float = 1.0, normalize: bool = False,
                    **options: Any) -> MergeReport:
    """Task arithmetic (Ilharco et al., 2023, arXiv:2212.04089; mergekit `task_arithmetic`).

    out = base + lambda * sum_i w_i d_i (with `normalize`: divided by sum_i w_i).
    """
    ms = _models(models)
    return merge("task_arithmetic", ms, base=base, params={"lambda": float(lambda_), "normalize": bool(normalize)},
                 model_params=weight_params(weights, len(ms)), **options)


def magnitude_prune(models: Sequence[PathLike], base: PathLike | None = None, *, density: ParamValue,
                    weights: Sequence[ParamValue] | None = None, lambda_: float = 1.0, normalize: bool = False,
                    **options: Any) -> MergeReport:
    """Magnitude pruning (PEFT `magnitude_prune`; mergekit `breadcrumbs` with gamma 0).

    Keep the k = floor(density * n) largest |d_i| of each tensor (exact, lowest index first at
    equal magnitudes), then out = base + lambda * sum_i w_i trim(d_i) — TIES without the sign
    election (with `normalize`: divided by sum_i w_i).
    """
    ms = _models(models)
    return merge("magnitude_prune", ms, base=base,
                 params={"density": density, "lambda": float(lambda_), "normalize": bool(normalize)},
                 model_params=weight_params(weights, len(ms)), **options)


def _random(method: str, models: Sequence[PathLike], base: PathLike | None, density: ParamValue,
            weights: Sequence[ParamValue] | None, lambda_: float, normalize: bool, rescale: str, seed: int,
            options: dict[str, Any], **extra: ParamValue) -> MergeReport:
    """The random task-vector methods (DARE, DELLA): their parameters, then the engine (which checks them)."""
    ms = _models(models)
    params = {"density": density, "lambda": float(lambda_), "normalize": bool(normalize),
              "rescale": rescale, "seed": seed, **extra}
    return merge(method, ms, base=base, params=params, model_params=weight_params(weights, len(ms)), **options)


def dare_linear(models: Sequence[PathLike], base: PathLike | None = None, *, density: ParamValue,
                weights: Sequence[ParamValue] | None = None, lambda_: float = 1.0, normalize: bool = False,
                rescale: str = "density", seed: int = DEFAULT_SEED, **options: Any) -> MergeReport:
    """DARE, linear (Yu et al., 2024, arXiv:2311.03099; mergekit and PEFT `dare_linear`).

    Keep each entry of d_i with probability `density` (a Bernoulli mask drawn from a counter-based
    generator keyed by seed, tensor name, model and element index: the same bytes for any thread
    count), rescale the kept entries, then out = base + lambda * sum_i w_i d_i (`normalize`:
    / sum_i w_i). `rescale`: ``density`` (default: divide by density, the paper's rescale, which
    keeps each element's expectation and needs no extra pass), ``l1`` (match the tensor's L1 norm,
    as mergekit does) or ``none``. The seed is recorded in the output's recipe.
    """
    return _random("dare_linear", models, base, density, weights, lambda_, normalize, rescale, seed, options)


def dare_ties(models: Sequence[PathLike], base: PathLike | None = None, *, density: ParamValue,
              weights: Sequence[ParamValue] | None = None, lambda_: float = 1.0, normalize: bool = False,
              rescale: str = "density", seed: int = DEFAULT_SEED, **options: Any) -> MergeReport:
    """DARE with TIES sign consensus (Yu et al., 2024, arXiv:2311.03099; mergekit `dare_ties`).

    The DARE mask and rescale as in `dare_linear`, then per element the sign of sum_i w_i d_i is
    elected (+ when >= 0) and only agreeing entries are summed; `normalize` divides by the sum of
    the agreeing weights (mergekit's default for dare_ties: false).
    """
    return _random("dare_ties", models, base, density, weights, lambda_, normalize, rescale, seed, options)


def _breadcrumbs(method: str, models: Sequence[PathLike], base: PathLike | None, density: ParamValue,
                 gamma: ParamValue, weights: Sequence[ParamValue] | None, lambda_: float, normalize: bool,
                 options: dict[str, Any]) -> MergeReport:
    ms = _models(models)
    params = {"density": density, "gamma": gamma, "lambda": float(lambda_), "normalize": bool(normalize)}
    return merge(method, ms, base=base, params=params, model_params=weight_params(weights, len(ms)), **options)


def breadcrumbs(models: Sequence[PathLike], base: PathLike | None = None, *, density: ParamValue,
                gamma: ParamValue = 0.01, weights: Sequence[ParamValue] | None = None, lambda_: float = 1.0,
                normalize: bool = False, **options: Any) -> MergeReport:
    """Model Breadcrumbs (Davari and Belilovsky, 2024, arXiv:2312.06795; mergekit `breadcrumbs`).

    Per tensor of n entries: drop the largest min(floor(gamma * n), n - kept) |d_i| as outliers,
    keep the next kept = floor(density * n), zero the rest (both cuts exact, lowest index first at
    equal magnitudes); then out = base + lambda * sum_i w_i d_i (`normalize`: / sum_i w_i).
    gamma defaults to mergekit's 0.01; gamma 0 is `magnitude_prune`.
    """
    return _breadcrumbs("breadcrumbs", models, base, density, gamma, weights, lambda_, normalize, options)


def breadcrumbs_ties(models: Sequence[PathLike], base: PathLike | None = None, *, density: ParamValue,
                     gamma: ParamValue = 0.01, weights: Sequence[ParamValue] | None = None, lambda_: float = 1.0,
                     normalize: bool = False, **options: Any) -> MergeReport:
    """Model Breadcrumbs masks, then TIES sign election (mergekit `breadcrumbs_ties`).

    The band of `breadcrumbs`, then per element the sign of sum_i w_i d_i is elected (+ when >= 0)
    and only agreeing entries are summed (`normalize`: / sum of the agreeing weights).
    """
    return _breadcrumbs("breadcrumbs_ties", models, base, density, gamma, weights, lambda_, normalize, options)


def della(models: Sequence[PathLike], base: PathLike | None = None, *, density: ParamValue,
          epsilon: ParamValue = 0.15, weights: Sequence[ParamValue] | None = None, lambda_: float = 1.0,
          normalize: bool = True, rescale: str = "density", seed: int = DEFAULT_SEED,
          **options: Any) -> MergeReport:
    """DELLA (Deep et al., 2024, arXiv:2406.11617; mergekit `della`): MagPrune, then TIES sign election.

    In each row of d_i (a 1-D tensor is one row) the entries are ranked by |d| ascending, r = 0..c-1,
    and entry r is kept with probability p_r = (density - epsilon) + 2 epsilon r / (c - 1), so large
    entries survive more often and a row keeps density * c entries on average (density +- epsilon
    must lie in (0, 1)). The mask is drawn from the counter-based generator (seed, tensor, model,
    element): same bytes for any thread count. `rescale`: ``density`` (alias ``probability``;
    default: kept entries divided by their own p_r, the paper's rescale, unbiased per element),
    ``l1`` (match the tensor's L1 norm, as mergekit does) or ``none``. Then the sign of
    sum_i w_i d_i is elected and agreeing entries summed; `normalize` (default on, as mergekit)
    divides by the agreeing weights.
    """
    return _random("della", models, base, density, weights, lambda_, normalize, rescale, seed, options,
                   epsilon=epsilon)


def della_linear(models: Sequence[PathLike], base: PathLike | None = None, *, density: ParamValue,
                 epsilon: ParamValue = 0.15, weights: Sequence[ParamValue] | None = None, lambda_: float = 1.0,
                 normalize: bool = False, rescale: str = "density", seed: int = DEFAULT_SEED,
                 **options: Any) -> MergeReport:
    """DELLA's MagPrune (see `della`), then a weighted sum: out = base + lambda * sum_i w_i d_i (mergekit `della_linear`)."""
    return _random("della_linear", models, base, density, weights, lambda_, normalize, rescale, seed, options,
                   epsilon=epsilon)


def slerp(model: PathLike | Sequence[PathLike], base: PathLike | None = None, *, t: ParamValue,
          **options: Any) -> MergeReport:
    """Spherical interpolation from the base (t = 0) to one other model (t = 1), per tensor (mergekit `slerp`).

    With a = base, b = model flattened, dot = <a/|a|, b/|b|>: out = sin((1-t) theta)/sin(theta) a +
    sin(t theta)/sin(theta) b, theta = acos(dot); linear interpolation when |dot| > 0.9995.
    """
    ms = _models(model)
    return merge("slerp", ms, base=base, params={"t": t}, **options)


def model_stock(models: Sequence[PathLike], base: PathLike | None = None, *, filter_wise: bool = False,
                **options: Any) -> MergeReport:
    """Model Stock (Jang et al., 2024, arXiv:2403.19522; mergekit `model_stock`), at least 2 models.

    Per tensor: cos = mean pairwise cosine of the offsets w_i - base, t = N cos / (1 + (N-1) cos),
    out = t * mean_i(w_i) + (1 - t) * base. With `filter_wise` (mergekit's option) one t per row
    along the last dimension instead (a 1-D tensor is one row).
    """
    ms = _models(models)
    params = {"filter_wise": True} if filter_wise else None
    return merge("model_stock", ms, base=base, params=params, **options)


def nuslerp(models: Sequence[PathLike], base: PathLike | None = None, *, weights: Sequence[ParamValue] | None = None,
            flatten: bool = True, row_wise: bool = False, **options: Any) -> MergeReport:
    """NuSLERP of two models (mergekit `nuslerp`), or of their task vectors when `base` is given.

    t = w_1 / (w_0 + w_1) (0.5 when the weights sum to about 0; default weights 1.0 each). For
    each pair of vectors v_0, v_1 (the models, or model - base): cos = <v_0, v_1> / (|v_0| |v_1|),
    out = (sin((1-t) theta) v_0 + sin(t theta) v_1) / sin(theta), theta = acos(cos), or
    (1-t) v_0 + t v_1 when they are collinear; the base is added back. The vectors are the whole
    tensor (`flatten`, the default), else its rows, or with `row_wise` its columns (vectors along
    the first dimension, mergekit's dim 0).
    """
    ms = _models(models)
    params = {"nuslerp_flatten": bool(flatten), "nuslerp_row_wise": bool(row_wise)}
    return merge("nuslerp", ms, base=base, params=params, model_params=weight_params(weights, len(ms)), **options)


def multislerp(models: Sequence[PathLike], base: PathLike | None = None, *,
               weights: Sequence[ParamValue] | None = None, normalize_weights: bool = True, eps: float = 1e-8,
               **options: Any) -> MergeReport:
    """Multi-SLERP (mergekit `multislerp`): the weighted spherical barycentre of the models (or task vectors).

    Per tensor, v_i = model_i (- base): the direction of M = sum_i w_i v_i / (|v_i| + eps), scaled
    by sum_i w_i |v_i|, plus the base (weights divided by their sum when `normalize_weights`).
    mergekit's tangent-space step is identically zero, so this is its result exactly (see
    `docs/METHODS.md`). When |M| < eps, two models give w_0 v_0 + w_1 v_1; three or more are an error.
    """
    ms = _models(models)
    params = {"normalize_weights": bool(normalize_weights), "eps": float(eps)}
    return merge("multislerp", ms, base=base, params=params, model_params=weight_params(weights, len(ms)), **options)


def karcher(models: Sequence[PathLike], *, max_iter: int = 10, tol: float = 1e-5, **options: Any) -> MergeReport:
    """Karcher mean (mergekit `karcher`): the Riemannian mean of the models' directions, times their mean norm.

    Per tensor, with u_i = x_i / |x_i|, iterate from the normalised mean of the u_i: mu moves along
    T = mean_i theta_i / sin(theta_i) (u_i - <mu, u_i> mu) (theta_i = the angle from mu to u_i) by
    the exponential map, at most `max_iter` times, until |T| < `tol`; out = mean_i |x_i| * mu. No
    base: every model is an input (`umerge run` adds mergekit's base_model as one).
    """
    return merge("karcher", _models(models), params={"max_iter": int(max_iter), "tol": float(tol)}, **options)


def nearswap(model: PathLike | Sequence[PathLike], base: PathLike | None = None, *, t: ParamValue,
             **options: Any) -> MergeReport:
    """NearSwap (mergekit `nearswap`): per element, the model's value where it is within t of the base's.

    w = clamp(t / max(|base - model|, 1e-6), 0, 1), out = w * model + (1 - w) * base: a difference
    of at most t takes the model's value, a larger difference d moves t/d of the way to it.
    """
    return merge("nearswap", _models(model), base=base, params={"t": t}, **options)


def sce(models: Sequence[PathLike], base: PathLike | None = None, *, select_topk: ParamValue = 1.0,
        **options: Any) -> MergeReport:
    """SCE: select, calculate, erase (Wan et al., 2024, FuseChat, arXiv:2408.07990; mergekit `sce`).

    Per tensor: with `select_topk` < 1, keep in every task vector only the elements whose variance
    across the models is among the largest k = floor(select_topk * (elements of non-zero variance))
    (exact; equal variances kept lowest index first); weight each model by the mean square of its
    task vector, w_i = s_i / sum_j s_j (uniform when that sum is below 1e-6); per element elect the
    sign of sum_i d_i and average the agreeing entries: out = base + sum_i a_i d_i / max(sum_i a_i,
    1e-6), a_i = w_i where d_i has the elected sign, else 0.
    """
    return merge("sce", _models(models), base=base, params={"select_topk": select_topk}, **options)


def arcee_fusion(model: PathLike | Sequence[PathLike], base: PathLike | None = None,
                 **options: Any) -> MergeReport:
    """Arcee Fusion (mergekit `arcee_fusion`): the model's values only where they matter most.

    Per row (last dimension) of base a and model x: kl = KL(softmax(x) + 1e-8 || softmax(a) + 1e-8),
    importance = |x - a| kl; over the tensor, threshold = median + 1.5 (q3 - q1) of the importances
    (exact quartiles); out = x where importance >= threshold, else a.
    """
    return merge("arcee_fusion", _models(model), base=base, **options)


def ram(models: Sequence[PathLike], base: PathLike | None = None, *, epsilon: ParamValue = 1e-5,
        **options: Any) -> MergeReport:
    """RAM, Reinforced Agent Merging (Yuan et al., 2026, arXiv:2601.13572; mergekit `ram`).

    Per element, the task-vector entries with |d_i| > epsilon contribute: one contributor's update
    is kept whole, several contributors' updates are averaged, none leaves the base.
    """
    return merge("ram", _models(models), base=base, params={"epsilon": epsilon}, **options)


def ramplus_tl(models: Sequence[PathLike], base: PathLike | None = None, *, r: ParamValue = 0.1,
               alpha: ParamValue = 0.2, epsilon: ParamValue = 1e-5, **options: Any) -> MergeReport:
    """RAM+ tensor-local (mergekit `ramplus_tl`): `ram` with each model's unique updates scaled up.

    Per tensor and model i, with S_i and U_i its contributing entries in shared and in unique
    elements: lambda_i = 1 + r * clamp(S_i / max(U_i, epsilon), 0, alpha) multiplies model i's
    unique updates; shared ones are averaged as in `ram`.
    """
    params = {"r": r, "alpha": alpha, "epsilon": epsilon}
    return merge("ramplus_tl", _models(models), base=base, params=params, **options)


__all__ = ["linear", "task_arithmetic", "magnitude_prune", "dare_linear", "dare_ties", "slerp", "model_stock",
           "nuslerp", "multislerp", "karcher", "nearswap", "sce", "arcee_fusion", "ram", "ramplus_tl"]
