"""The demo's merge steps, each behind one function so its backend can change in one place.

Two ways of merging two LoRA unlearning adapters trained on one base model:

* ``merge_adapters``: factor-wise, as the ZJUKLAB system did with PEFT's
  ``add_weighted_adapter(combination_type=..., density=0.8, weights=[1, 1])``: each method is applied
  to the stacked ``lora_A`` factors and, separately, to the stacked ``lora_B`` factors, with adapter
  i's factors scaled by sqrt(|w_i * scaling_i|) (the sign of w_i on A only); the merged adapter is
  then folded into the base. Both steps are umerge's own (`umerge.adapters.merge_adapters`,
  `umerge.fold`), which the adapter tests check against PEFT.
* ``merge_full``: on the full updates. Each adapter is first folded into the base
  (``fold_adapter``: W + scaling * B A, `umerge.fold`), and the folded models are merged
  with the umerge engine against the base (task vectors W_i - W_base), e.g. ``umerge.ties``.

Every function writes a complete model directory (safetensors, config, tokenizer) that
`umerge.evaluate.evaluate` and the engine read.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from umerge.errors import InputError

#: PEFT combination types the factor-wise path supports (names as in add_weighted_adapter).
ADAPTER_METHODS = ("linear", "dare_linear", "dare_ties", "magnitude_prune", "ties")
#: Methods whose merge uses a density.
DENSITY_METHODS = ("dare_linear", "dare_ties", "magnitude_prune", "ties")


def fold_adapter(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """W + scaling * B A for every adapted module, saved as a full model (`umerge.fold`, which
    equals PEFT's ``merge_and_unload`` + ``save_pretrained``; config and tokenizer come from the base)."""
    import umerge

    Path(out_dir).parent.mkdir(parents=True, exist_ok=True)
    umerge.fold(str(adapter_dir), base=str(base_dir), out=str(out_dir), overwrite=True, progress=False)
    return Path(out_dir)


def merge_adapters(
    base_dir: str | Path,
    adapters: Sequence[str | Path],
    out_dir: str | Path,
    *,
    method: str = "ties",
    density: float = 0.8,
    weights: Sequence[float] | None = None,
    seed: int = 0,
    adapter_out: str | Path | None = None,
) -> Path:
    """Merge LoRA adapters factor-wise (PEFT ``add_weighted_adapter`` semantics), fold into the base.

    ``method`` is a PEFT combination type from `ADAPTER_METHODS`; ``density`` is used by the pruning
    methods; ``weights`` default to 1 for every adapter (the paper's [1, 1]). The merge is umerge's
    own (`umerge.adapters.merge_adapters`, tested equal to PEFT; DARE draws its masks from umerge's
    counter-based generator keyed by ``seed``), then `umerge.fold` writes the full model. The merged
    adapter is kept at ``adapter_out`` when given. Returns the full model directory ``out_dir``.
    """
    from umerge.adapters import merge_adapters as umerge_merge_adapters

    if method not in ADAPTER_METHODS:
        raise InputError(f"unknown adapter merge method {method!r} (expected one of {', '.join(ADAPTER_METHODS)})")
    if not 0.0 < density <= 1.0:
        raise InputError(f"density must be in (0, 1] (got {density})")
    if len(adapters) < 2:
        raise InputError(f"merging needs at least two adapters (got {len(adapters)})")
    w = list(weights) if weights is not None else [1.0] * len(adapters)
    if len(w) != len(adapters):
        raise InputError(f"{len(w)} weights for {len(adapters)} adapters")
    out = Path(out_dir)
    a_out = Path(adapter_out) if adapter_out is not None else out.with_name(out.name + "-adapter")
    for d in (out, a_out):
        d.parent.mkdir(parents=True, exist_ok=True)  # umerge refuses a missing parent (a typo guard)
    umerge_merge_adapters(
        [str(a) for a in adapters], str(a_out), method=method, weights=w,
        density=density if method in DENSITY_METHODS else None, seed=seed, overwrite=True,
    )
    fold_adapter(base_dir, a_out, out)
    if adapter_out is None:
        shutil.rmtree(a_out)
    return out


def merge_full(
    models: Sequence[str | Path],
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    method: str = "ties",
    density: float = 0.8,
    weights: Sequence[float] | None = None,
    seed: int = 0,
) -> Path:
    """Merge full fine-tuned models against ``base_dir`` with the umerge engine; returns ``out_dir``.

    ``method`` is one of `ADAPTER_METHODS`, each with the engine's defaults (mergekit semantics):
    ``ties`` through ``umerge.ties`` (mergekit preset; with equal weights its sign election and
    disjoint mean are PEFT's), ``linear`` the weighted average of the models,
    ``magnitude_prune``/``dare_linear``/``dare_ties`` the weighted sum of the pruned task vectors
    added to the base (``umerge.methods``).
    """
    import umerge

    if method not in ADAPTER_METHODS:
        raise InputError(f"unknown full-update merge method {method!r} (expected one of {', '.join(ADAPTER_METHODS)})")
    out = Path(out_dir)
    ms = [str(m) for m in models]
    w = list(weights) if weights is not None else [1.0] * len(ms)
    common: dict[str, Any] = {"out": str(out), "overwrite": True, "progress": False}
    if method == "ties":
        umerge.ties(ms, base=str(base_dir), density=density, weights=w, **common)
    elif method == "linear":
        umerge.linear(ms, weights=w, **common)
    elif method == "magnitude_prune":
        umerge.magnitude_prune(ms, str(base_dir), density=density, weights=w, **common)
    else:
        dare = umerge.dare_linear if method == "dare_linear" else umerge.dare_ties
        dare(ms, str(base_dir), density=density, weights=w, seed=seed, **common)
    return out


def update_geometry(adapters: Sequence[str | Path], merged_adapter: str | Path) -> dict[str, float]:
    """How the factor-wise merge's update relates to its parents' updates (whole model, float64).

    With Δ_i = scaling_i * B_i A_i of every adapted module (concatenated over modules) and Δ_m the
    same for the merged adapter: the norms |Δ_1|, |Δ_2|, |Δ_m|, |(Δ_1 + Δ_2)/2|, and the cosines
    cos(Δ_m, Δ_1), cos(Δ_m, Δ_2), cos(Δ_m, (Δ_1 + Δ_2)/2), cos(Δ_1, Δ_2). Factor-wise TIES merges
    A and B separately, so Δ_m also holds the cross products B_i A_j (i != j): these numbers show how
    far that is from the mean of the parents' updates. Two adapters only.
    """
    import json

    import numpy as np
    from safetensors.numpy import load_file

    def deltas(d: str | Path) -> dict[str, np.ndarray]:
        p = Path(d)
        cfg = json.loads((p / "adapter_config.json").read_text(encoding="utf-8"))
        w = load_file(str(p / "adapter_model.safetensors"))
        out = {}
        for k, a in w.items():
            if ".lora_A." in k:
                b = w[k.replace(".lora_A.", ".lora_B.")]
                r = a.shape[0]
                scale = cfg["lora_alpha"] / (r ** 0.5 if cfg.get("use_rslora") else r)
                out[k.replace(".lora_A.weight", "")] = scale * (b.astype(np.float64) @ a.astype(np.float64))
        return out

    if len(adapters) != 2:
        raise InputError(f"update_geometry takes two adapters (got {len(adapters)})")
    d1, d2, dm = deltas(adapters[0]), deltas(adapters[1]), deltas(merged_adapter)
    if set(d1) != set(d2) or set(d1) != set(dm):
        raise InputError("the adapters adapt different modules")
    acc: dict[str, float] = {}
    for name in sorted(d1):
        vecs = {"1": d1[name], "2": d2[name], "m": dm[name], "mean": (d1[name] + d2[name]) / 2}
        for x, y in (("1", "1"), ("2", "2"), ("m", "m"), ("mean", "mean"), ("m", "1"), ("m", "2"), ("m", "mean"), ("1", "2")):
            acc[x + "." + y] = acc.get(x + "." + y, 0.0) + float(np.vdot(vecs[x], vecs[y]))
    n = {k: acc[f"{k}.{k}"] ** 0.5 for k in ("1", "2", "m", "mean")}

    def cos(x: str, y: str) -> float:
        return acc[f"{x}.{y}"] / (n[x] * n[y]) if n[x] and n[y] else float("nan")

    return {"norm_model1": n["1"], "norm_model2": n["2"], "norm_merged": n["m"], "norm_mean": n["mean"],
            "cos_merged_model1": cos("m", "1"), "cos_merged_model2": cos("m", "2"),
            "cos_merged_mean": cos("m", "mean"), "cos_model1_model2": cos("1", "2")}
