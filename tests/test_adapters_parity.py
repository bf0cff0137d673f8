"""Parity of `umerge.adapters.merge_adapters` with PEFT's `add_weighted_adapter`, tensor by tensor.

Tiny Llama and OLMo bases built from configs, random LoRA adapters on all linear layers with
r != lora_alpha (one with rslora). Every exact combination type must match PEFT to 1e-5
relative in float32; SVD types through what an SVD defines (singular values, the singular pairs
whose gap makes them well defined, the product B @ A), with tolerances from perturbation theory;
DARE types statistically.
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


def _adapter_factors(family: dict[str, Path], names: list[str]) -> list[tuple[dict[str, np.ndarray], float]]:
    """Each adapter's saved tensors and its scaling (alpha / r, or alpha / sqrt(r) with rslora)."""
    from safetensors.numpy import load_file

    out = []
    for n in names:
        cfg = json.loads((family[n] / "adapter_config.json").read_text())
        r, alpha = cfg["r"], cfg["lora_alpha"]
        out.append((load_file(str(family[n] / "adapter_model.safetensors")),
                    alpha / (r ** 0.5 if cfg.get("use_rslora") else r)))
    return out


def _exact_merged_deltas(family: dict[str, Path], names: list[str], weights: list[float], combination: str,
                         **kw: object) -> dict[str, np.ndarray]:
    """The merged update each SVD type factorises, in float64, through PEFT's own merge functions.

    PEFT's svd types first combine the adapters' updates scaling * B @ A with the matching merge
    function (task_arithmetic, ties, magnitude_prune), then truncate an SVD of the result. Feeding
    those functions float64 updates gives the exact matrix both implementations approximate.
    """
    from peft.utils import merge_utils

    adapters = _adapter_factors(family, names)
    w = torch.tensor(weights, dtype=torch.float64)
    out = {}
    for m in _pairs(adapters[0][0]):
        deltas = [torch.from_numpy(s * (t[m + ".lora_B.weight"].astype(np.float64) @ t[m + ".lora_A.weight"]))
                  for t, s in adapters]
        if combination == "svd":
            merged = merge_utils.task_arithmetic(deltas, w)
        elif combination == "ties_svd":
            merged = merge_utils.ties(deltas, w, kw["density"], "total")
        else:
            merged = merge_utils.magnitude_prune(deltas, w, kw["density"])
        out[m] = merged.numpy()
    return out


F32_EPS = float(np.finfo(np.float32).eps)


def _sines(ref_rows: np.ndarray, our_rows: np.ndarray) -> np.ndarray:
    """sin of the angle between matching rows, in float64 (1 - cos^2 would lose half the digits)."""
    r = ref_rows.astype(np.float64)
    o = our_rows.astype(np.float64)
    r /= np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-300)
    o /= np.maximum(np.linalg.norm(o, axis=1, keepdims=True), 1e-300)
    return np.linalg.norm(o - np.sum(o * r, axis=1, keepdims=True) * r, axis=1)


@pytest.mark.parametrize(
    "combination, kw",
    [("svd", {}), ("svd", {"svd_rank": 12}), ("ties_svd", {"density": 0.7}), ("magnitude_prune_svd", {"density": 0.5})],
)
def test_svd_types_match_peft(family: dict[str, Path], tmp_path: Path, combination: str, kw: dict) -> None:
    """Compared: what an SVD defines, with tolerances from perturbation theory, not tuned.

    Both sides factorise the same exact update M (computed here in float64 through PEFT's merge
    functions) from a float32 copy of it. Per entry, float32 forms M within gamma * T, where T sums
    the absolute values of the terms (|w_i| scaling_i |B_i| |A_i|) and gamma = k * eps for the k
    products and sums each entry takes (Higham's gamma_k); an SVD in float32 adds a backward error
    of at most max(m, n) * eps * sigma_1. So each side solves M + E with
    ||E||_2 <= delta = gamma * ||T||_F + max(m, n) * eps * sigma_1, and between the two sides:
    - singular values differ by at most 2 delta (Weyl);
    - the i-th singular vectors of each side are within sin(theta) <= 2 delta / gap_i of the exact
      ones (Davis-Kahan, Yu-Wang-Samworth form), gap_i = distance from sigma_i to the rest of the
      exact spectrum, so the two sides within 4 delta / gap_i. Pairs whose gap makes that bound
      vacuous (>= 1: repeated singular values, or beyond the true rank) are not a fixed target in
      any float32 SVD, PEFT's included, and are compared through the product only;
    - the rank-r products B @ A differ by at most 2 delta + sigma_1 * 4 delta / gap_r (the kept
      subspace moves by at most that angle).
    The sign of each singular pair is free; it is matched on B and applied to A."""
    weights = [1.0, 0.8]
    ref = _peft_merge(family, ["a", "c"], weights, combination, **kw)
    ours, cfg = _ours(family, tmp_path, ["a", "c"], method=combination, weights=weights, **kw)
    exact = _exact_merged_deltas(family, ["a", "c"], weights, combination, **kw)
    rank = kw.get("svd_rank", 8)
    assert cfg["r"] == rank and cfg["lora_alpha"] == rank  # max input rank unless given, as PEFT
    factors = _adapter_factors(family, ["a", "c"])
    compared = 0
    for m, (rb, ra) in _pairs(ref).items():
        ob, oa = ours[m + ".lora_B.weight"], ours[m + ".lora_A.weight"]
        assert ob.shape == rb.shape and oa.shape == ra.shape
        sigma = np.linalg.svd(exact[m], compute_uv=False)
        terms = sum(abs(w * sc) * (np.abs(t[m + ".lora_B.weight"]).astype(np.float64) @ np.abs(t[m + ".lora_A.weight"]))
                    for (t, sc), w in zip(factors, weights))
        inner = sum(t[m + ".lora_A.weight"].shape[0] for t, _ in factors) + len(factors)
        delta = inner * F32_EPS * np.linalg.norm(terms) + max(exact[m].shape) * F32_EPS * sigma[0]

        s_ref, s_ours = np.linalg.norm(rb, axis=0), np.linalg.norm(ob, axis=0)  # B = U S: column norms
        assert np.all(np.abs(s_ours - s_ref) <= 2 * delta), (m, np.abs(s_ours - s_ref).max(), delta)
        assert np.all(np.abs(s_ref - sigma[:rank]) <= delta), (m, "PEFT's own singular values", delta)

        padded = np.concatenate([sigma, np.zeros(max(0, rank + 1 - sigma.size))])
        gaps = np.array([np.min(np.abs(np.delete(padded, i) - padded[i])) for i in range(rank)])
        bound = 4 * delta / np.maximum(gaps, 1e-300)
        sign = np.sign(np.sum(ob * rb, axis=0))
        sin_u = _sines(rb.T, (ob * sign).T)
        sin_v = _sines(ra, oa * sign[:, None])
        defined = bound < 1
        assert np.all(sin_u[defined] <= bound[defined]), (m, sin_u[defined], bound[defined])
        assert np.all(sin_v[defined] <= bound[defined]), (m, sin_v[defined], bound[defined])
        compared += int(defined.sum())

        gap_r = padded[rank - 1] - padded[rank]
        product_tol = 2 * delta + sigma[0] * min(1.0, 4 * delta / max(gap_r, 1e-300))
        assert np.linalg.norm(ob @ oa - rb @ ra, 2) <= product_tol, (m, product_tol)
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
