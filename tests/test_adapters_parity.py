"""Parity of `umerge.adapters.merge_adapters` with PEFT's `add_weighted_adapter`, tensor by tensor.

Tiny Llama and OLMo bases built from configs, random LoRA adapters on all linear layers with
r != lora_alpha (one with rslora). Every exact combination type must match PEFT to 1e-5
relative in float32; SVD types are compared up to the sign of each singular pair (which no
SVD fixes) and through the product B @ A; DARE types statistically.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from adapters_support import make_adapter, peft_adapter_state, peft_model, save_base, torch
from umerge.adapters import merge_adapters
from umerge.safetensors_io import load_checkpoint

pytestmark = pytest.mark.peft

RTOL = 1e-5


@pytest.fixture(scope="module", params=["llama", "olmo"])
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp(f"adapters-{request.param}")
    base = save_base(request.param, root / "base")
    return {
        "base": base,
        "a": make_adapter(base, root / "a", r=8, alpha=16, seed=1),
        "b": make_adapter(base, root / "b", r=8, alpha=5, seed=2, use_rslora=True),
        "c": make_adapter(base, root / "c", r=4, alpha=12, seed=3),
    }


def _peft_merge(family: dict[str, Path], names: list[str], weights: list[float], combination: str, **kw: object) -> dict[str, np.ndarray]:
    pm = peft_model(family["base"], {n: family[n] for n in names})
    pm.add_weighted_adapter(names, weights, "merged", combination_type=combination, **kw)
    return {k: v.numpy() for k, v in peft_adapter_state(pm, "merged").items()}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _ours(family: dict[str, Path], tmp: Path, names: list[str], **kw: object) -> tuple[dict[str, np.ndarray], dict]:
    out = tmp / "ours"
    merge_adapters([family[n] for n in names], out, **kw)
    cfg = json.loads((out / "adapter_config.json").read_text())
    return load_checkpoint(out / "adapter_model.safetensors"), cfg


@pytest.mark.parametrize(
    "combination, kw",
    [
        ("ties", {"density": 0.8}),
        ("ties", {"density": 0.3, "majority_sign": "frequency"}),
        ("magnitude_prune", {"density": 0.6}),
        ("linear", {}),
    ],
)
def test_factorwise_matches_peft(family: dict[str, Path], tmp_path: Path, combination: str, kw: dict) -> None:
    weights = [1.0, -0.7]
    peft_kw = {"density": kw.get("density"), "majority_sign_method": kw.get("majority_sign", "total")}
    ref = _peft_merge(family, ["a", "b"], weights, combination, **peft_kw)
    ours, cfg = _ours(family, tmp_path, ["a", "b"], method=combination, weights=weights, **kw)
    assert set(ours) == set(ref) and len(ref) == 2 * 7 * 2
    for k in ref:
        assert ours[k].shape == ref[k].shape, k
        assert _rel(ours[k], ref[k]) <= RTOL, (k, _rel(ours[k], ref[k]))
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 8


def test_cat_matches_peft_and_sums_ranks(family: dict[str, Path], tmp_path: Path) -> None:
    weights = [0.6, 1.3]
    ref = _peft_merge(family, ["a", "c"], weights, "cat")
    ours, cfg = _ours(family, tmp_path, ["a", "c"], method="cat", weights=weights)
    assert cfg["r"] == 12 and cfg["lora_alpha"] == 12
    for k in ref:
        assert ours[k].shape == ref[k].shape
        assert _rel(ours[k], ref[k]) <= RTOL, k


def _pairs(d: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    mods = sorted({k.rsplit(".lora_", 1)[0] for k in d})
    return {m: (d[m + ".lora_B.weight"], d[m + ".lora_A.weight"]) for m in mods}


@pytest.mark.parametrize(
    "combination, kw",
    [("svd", {}), ("svd", {"svd_rank": 12}), ("ties_svd", {"density": 0.7}), ("magnitude_prune_svd", {"density": 0.5})],
)
def test_svd_types_match_peft(family: dict[str, Path], tmp_path: Path, combination: str, kw: dict) -> None:
    """Singular pairs are compared up to sign, and only where they are well defined in float32:
    a pair whose singular value lies within 2% of a neighbour's moves by about
    eps * s_1 / gap in any float32 SVD (PEFT's included), so its vectors are not a fixed target;
    the product B @ A is checked for every module."""
    weights = [1.0, 0.8]
    ref = _peft_merge(family, ["a", "c"], weights, combination, **kw)
    ours, cfg = _ours(family, tmp_path, ["a", "c"], method=combination, weights=weights, **kw)
    rank = kw.get("svd_rank", 8)
    assert cfg["r"] == rank and cfg["lora_alpha"] == rank  # max input rank unless given, as PEFT
    compared = 0
    for m, (rb, ra) in _pairs(ref).items():
        ob, oa = ours[m + ".lora_B.weight"], ours[m + ".lora_A.weight"]
        assert ob.shape == rb.shape and oa.shape == ra.shape
        s = np.sign(np.sum(ob * rb, axis=0))  # one sign per pair, shared by the B column and the A row
        sv = np.linalg.norm(rb, axis=0)  # PEFT's B = U S: column norms are the singular values
        assert np.allclose(np.linalg.norm(ob, axis=0), sv, rtol=RTOL, atol=RTOL * sv[0])
        gaps = np.abs(np.subtract.outer(sv, sv)) + np.eye(len(sv)) * sv[0]
        ok = gaps.min(axis=1) > 0.02 * sv[0]
        if combination == "svd" and rank == 12:
            ok &= sv > 1e-3 * sv[0]  # beyond the true rank the vectors are arbitrary
        keep = np.flatnonzero(ok)
        # tensor by tensor: the error over the well-defined pairs, relative to the whole tensor
        assert np.abs(ob[:, keep] * s[keep] - rb[:, keep]).max() <= RTOL * np.abs(rb).max(), m
        assert np.abs(oa[keep] * s[keep, None] - ra[keep]).max() <= RTOL * np.abs(ra).max(), m
        compared += keep.size
        assert _rel(ob @ oa, rb @ ra) <= RTOL, (m, _rel(ob @ oa, rb @ ra))
    assert compared >= 4 * len(_pairs(ref))


def test_svd_of_linear_reproduces_the_exact_sum(family: dict[str, Path], tmp_path: Path) -> None:
    """With rank >= r_a + r_c, svd loses nothing: B @ A equals sum_i w_i s_i B_i A_i (float64 reference)."""
    from umerge.adapters.lora import load_adapter

    a, c = load_adapter(family["a"]), load_adapter(family["c"])
    ours, _ = _ours(family, tmp_path, ["a", "c"], method="svd", weights=[1.0, -2.0], svd_rank=12)
    for m, (b_, a_) in _pairs(ours).items():
        ref = (a.config.scaling * a.modules[m].b.astype(np.float64) @ a.modules[m].a
               - 2.0 * c.config.scaling * c.modules[m].b.astype(np.float64) @ c.modules[m].a)
        assert _rel(b_.astype(np.float64) @ a_, ref) <= 1e-5


@pytest.mark.parametrize("combination", ["dare_linear", "dare_ties"])
def test_dare_agrees_with_peft_in_distribution(family: dict[str, Path], tmp_path: Path, combination: str) -> None:
    """Different generators, same law: the fraction of zeros and the mean |value| match PEFT's."""
    torch.manual_seed(0)
    density = 0.5
    ref = _peft_merge(family, ["a", "b"], [1.0, 1.0], combination, density=density)
    ours, _ = _ours(family, tmp_path, ["a", "b"], method=combination, weights=[1.0, 1.0], density=density)
    r = np.concatenate([v.ravel() for v in ref.values()])
    o = np.concatenate([ours[k].ravel() for k in ref])
    assert abs(np.mean(o == 0) - np.mean(r == 0)) < 0.02
    assert abs(np.mean(np.abs(o)) / np.mean(np.abs(r)) - 1) < 0.05
    assert not np.array_equal(o, r)  # genuinely random, not a copy


def test_merged_adapter_loads_in_peft_and_acts_like_peft_merge(family: dict[str, Path], tmp_path: Path) -> None:
    import peft
    import transformers

    out = tmp_path / "ties"
    merge_adapters([family["a"], family["b"]], out, method="ties", density=0.8)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(family["base"]), torch_dtype=torch.float32)
    ours = peft.PeftModel.from_pretrained(base, str(out)).eval()
    ref = peft_model(family["base"], {"a": family["a"], "b": family["b"]})
    ref.add_weighted_adapter(["a", "b"], [1.0, 1.0], "m", combination_type="ties", density=0.8)
    ref.set_adapter("m")
    ids = torch.arange(20).reshape(2, 10) % 96
    with torch.no_grad():
        lo, lr = ours(ids).logits, ref(ids).logits
    assert torch.allclose(lo, lr, rtol=1e-4, atol=1e-4 * float(lr.abs().max()))
