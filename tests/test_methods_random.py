"""The random methods (dare_linear, dare_ties, della, della_linear): masks, rescale, determinism.

- the keep mask of every tensor equals an independent numpy implementation of the documented
  generator (SplitMix64 outputs of the stream keyed by seed, tensor name and model, from the
  published constants, each split into two 32-bit draws in the documented layout), and its kept
  fraction is within 4 standard deviations of density;
- `rescale: density` makes kept entries d / density, so each tensor's sum keeps its expectation
  (checked within 4 standard deviations); `rescale: l1` keeps each tensor's L1 norm;
- DELLA: the keep mask equals a numpy implementation of the documented rule (ranks by |d| within
  each row, p_r = (density - eps) + 2 eps r / (c - 1), the same generator draw compared with p_r),
  the kept count of every tensor is within 4 standard deviations of its expectation sum(p_r) =
  density * n, kept entries are d / p_r (so each tensor's sum keeps its expectation) or, with
  `rescale: l1`, the L1 norm is kept;
- the same seed gives identical output bytes for 1 and 2 threads and two memory budgets;
  different seeds differ.

A zero base makes the merged values the masked task vectors themselves, so "kept" is exact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import umerge
from conftest import tree_digest
from umerge.safetensors_io import load_checkpoint
from umerge.synthetic import TINY_ODD, llama_tensors, write_model

M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
GAMMA = np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Stafford Mix13), on uint64 arrays (numpy wraps mod 2^64)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _fnv1a(s: str) -> int:
    h = 0xCBF29CE484222325
    for b in s.encode():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def _draws(seed: int, tensor: str, model: int, n: int) -> np.ndarray:
    """The 32-bit draw of entry j = 0..n-1 (uint64): in block b = j // 1024, output
    q = 512 b + (j % 512) of SplitMix64, mix(key + (q + 1) * GAMMA), gives its high half to
    the block's first 512 entries and its low half to the last 512."""
    with np.errstate(over="ignore"):
        one = lambda x: _mix(np.array([x], dtype=np.uint64))[0]  # noqa: E731
        key = one(int(one(np.uint64(seed) ^ one(np.uint64(_fnv1a(tensor))))) ^ int(one(np.uint64(model + 1) * GAMMA)))
        j = np.arange(n, dtype=np.uint64)
        q = (j // np.uint64(1024)) * np.uint64(512) + j % np.uint64(512)
        r = _mix(key + (q + np.uint64(1)) * GAMMA)
        first_half = (j % np.uint64(1024)) < np.uint64(512)
        return np.where(first_half, r >> np.uint64(32), r & np.uint64(0xFFFFFFFF))


def reference_mask(seed: int, tensor: str, model: int, n: int, density: float) -> np.ndarray:
    """keep_j = draw_j < ceil(density * 2^32)."""
    cutoff = int(np.ceil(density * 2.0**32))
    return _draws(seed, tensor, model, n) < np.uint64(cutoff)


def della_probabilities(d: np.ndarray, density: float, epsilon: float) -> np.ndarray:
    """DELLA's per-entry keep probability: rank by |d| ascending within each row (last axis; a 1-D
    tensor is one row), ties by index, p_r = (density - eps) + 2 eps r / (c - 1). density and
    epsilon are rounded to float32 first, as the engine's recipe stores them."""
    rows = d.reshape(1, -1) if d.ndim < 2 else d
    c = rows.shape[1]
    ranks = np.argsort(np.argsort(np.abs(rows), axis=1, kind="stable"), axis=1, kind="stable")
    dens, eps = float(np.float32(density)), float(np.float32(epsilon))
    p = (dens - eps) + 2.0 * eps * ranks / (c - 1) if c > 1 else np.full(rows.shape, dens)
    return p.reshape(-1)


def della_reference_mask(seed: int, tensor: str, model: int, d: np.ndarray, density: float,
                         epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """(keep mask, keep probabilities): draw_j < ceil(p_j * 2^32)."""
    p = della_probabilities(d, density, epsilon)
    cut = np.ceil(p * 2.0**32).astype(np.uint64)
    return _draws(seed, tensor, model, p.size) < cut, p


@pytest.fixture(scope="module")
def zero_base_family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A zero base and two models with nonzero float32 values in every entry."""
    root = tmp_path_factory.mktemp("dare")
    rng = np.random.default_rng(5)
    shapes = dict(llama_tensors(TINY_ODD))
    write_model(root / "base", {n: np.zeros(s, np.float32) for n, s in shapes.items()}, "F32", shards=2)
    models = []
    for i in range(2):
        vals = {}
        for n, s in shapes.items():
            v = rng.standard_normal(s).astype(np.float32)
            v[v == 0] = 1.0
            vals[n] = v
        write_model(root / f"m{i}", vals, "F32", shards=2)
        models.append(root / f"m{i}")
    return root / "base", models


def _dare(method: str, fam: tuple[Path, list[Path]], out: Path, models: list[int], **kw) -> dict[str, np.ndarray]:
    base, ms = fam
    umerge.methods.__dict__[method]([ms[i] for i in models], base, out=out, progress=False, **kw)
    return load_checkpoint(out)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_mask_is_the_documented_generator_and_kept_fraction_is_density(zero_base_family, tmp_path: Path,
                                                                       density: float) -> None:
    out = _dare("dare_linear", zero_base_family, tmp_path / "o", [1], density=density, rescale="none", seed=3)
    src = load_checkpoint(zero_base_family[1][1])
    for name, v in out.items():
        n = v.size
        kept = v.reshape(-1) != 0
        # Model index 0 of this merge: the mask is keyed by the model's place in the spec.
        np.testing.assert_array_equal(kept, reference_mask(3, name, 0, n, density), err_msg=name)
        assert abs(kept.sum() - density * n) <= 4 * np.sqrt(n * density * (1 - density)), name
        np.testing.assert_array_equal(v.reshape(-1)[kept], src[name].reshape(-1)[kept])  # kept entries untouched


def test_rescale_density_keeps_expectation_and_l1_keeps_norm(zero_base_family, tmp_path: Path) -> None:
    p = 0.3
    src = load_checkpoint(zero_base_family[1][0])
    dens = _dare("dare_linear", zero_base_family, tmp_path / "d", [0], density=p, seed=11)
    l1 = _dare("dare_linear", zero_base_family, tmp_path / "l", [0], density=p, seed=11, rescale="l1")
    scale = np.float32(1.0 / p)
    for name, d in src.items():
        d = d.reshape(-1).astype(np.float32)
        got = dens[name].reshape(-1)
        kept = got != 0
        np.testing.assert_array_equal(got[kept], d[kept] * scale)  # d / density, in float32
        # E[sum] = sum(d); Var[sum] = sum(d^2) (1 - p) / p
        sd = np.sqrt(float((d.astype(np.float64) ** 2).sum()) * (1 - p) / p)
        assert abs(float(got.astype(np.float64).sum()) - float(d.astype(np.float64).sum())) <= 4 * sd, name
        # the L1 variant: same mask, L1 norm equal to the task vector's
        gl = l1[name].reshape(-1)
        np.testing.assert_array_equal(gl != 0, kept)
        np.testing.assert_allclose(np.abs(gl).astype(np.float64).sum(), np.abs(d).astype(np.float64).sum(), rtol=1e-5)


def test_dare_ties_elects_signs_on_the_masked_deltas(zero_base_family, tmp_path: Path) -> None:
    p = 0.5
    out = _dare("dare_ties", zero_base_family, tmp_path / "t", [0, 1], density=p, seed=2, weights=[1.0, 0.5])
    srcs = [load_checkpoint(m) for m in zero_base_family[1]]
    for name, got in out.items():
        n = got.size
        v = [np.where(reference_mask(2, name, i, n, p), s[name].reshape(-1) * np.float32(1 / p), 0) * w
             for i, (s, w) in enumerate(zip(srcs, [1.0, 0.5]))]
        v = [x.astype(np.float64) for x in v]
        maj = np.where(v[0] + v[1] >= 0, 1.0, -1.0)
        expected = sum(np.where(np.sign(x) == maj, x, 0.0) for x in v)
        np.testing.assert_allclose(got.reshape(-1), expected, rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_same_seed_same_bytes_any_threads_and_budget_other_seed_differs(zero_base_family, tmp_path: Path,
                                                                        method: str) -> None:
    runs = {}
    for label, threads, budget, seed in [("a", 1, "64MiB", 7), ("b", 2, "512MiB", 7), ("c", 2, "64MiB", 8)]:
        _dare(method, zero_base_family, tmp_path / label, [0, 1], density=0.4, seed=seed, threads=threads,
              memory_budget=budget, rescale="l1")
        runs[label] = {Path(k).name: v.split()[0] for k, v in tree_digest(tmp_path / label).items()
                       if k.endswith(".safetensors")}
    assert runs["a"] == runs["b"]
    other = load_checkpoint(tmp_path / "c")
    same = load_checkpoint(tmp_path / "a")
    assert all(not np.array_equal(other[n], same[n]) for n in same)
    assert "seed" in (tmp_path / "a" / "umerge.yml").read_text()


@pytest.mark.parametrize(("density", "epsilon"), [(0.5, 0.3), (0.2, 0.15)])
def test_della_mask_is_the_documented_rank_rule(zero_base_family, tmp_path: Path, density: float,
                                                epsilon: float) -> None:
    out = _dare("della_linear", zero_base_family, tmp_path / "o", [1], density=density, epsilon=epsilon,
                rescale="none", seed=4)
    src = load_checkpoint(zero_base_family[1][1])
    for name, v in out.items():
        d = src[name]
        keep, p = della_reference_mask(4, name, 0, d, density, epsilon)
        kept = v.reshape(-1) != 0
        np.testing.assert_array_equal(kept, keep, err_msg=name)
        # E[kept] = sum p = density * n; Var = sum p (1 - p).
        assert abs(kept.sum() - p.sum()) <= 4 * np.sqrt((p * (1 - p)).sum()), name
        assert abs(p.sum() - density * p.size) < 1e-3 * p.size, name
        np.testing.assert_array_equal(v.reshape(-1)[kept], d.reshape(-1)[kept])
    # Larger entries survive more often: over all 2-D tensors, the top-ranked fifth of each row
    # keeps more than the bottom fifth, by about 2 * 0.8 * epsilon.
    top = bottom = count = 0
    for name, v in out.items():
        d = src[name]
        if d.ndim != 2:
            continue
        ranks = np.argsort(np.argsort(np.abs(d), axis=1, kind="stable"), axis=1, kind="stable") / (d.shape[1] - 1)
        top += int((v[ranks >= 0.8] != 0).sum())
        bottom += int((v[ranks <= 0.2] != 0).sum())
        count += int((ranks >= 0.8).sum())
    assert (top - bottom) / count > 1.2 * epsilon


def test_della_rescale_keeps_expectation_and_l1_keeps_norm(zero_base_family, tmp_path: Path) -> None:
    density, eps = 0.3, 0.2
    src = load_checkpoint(zero_base_family[1][0])
    prob = _dare("della_linear", zero_base_family, tmp_path / "p", [0], density=density, epsilon=eps, seed=9)
    l1 = _dare("della_linear", zero_base_family, tmp_path / "l", [0], density=density, epsilon=eps, seed=9,
               rescale="l1")
    for name, d in src.items():
        keep, p = della_reference_mask(9, name, 0, d, density, eps)
        d = d.reshape(-1).astype(np.float64)
        got = prob[name].reshape(-1)
        np.testing.assert_array_equal(got != 0, keep, err_msg=name)
        np.testing.assert_array_equal(got[keep], (d[keep] / p[keep]).astype(np.float32), err_msg=name)
        # E[sum] = sum(d); Var[sum] = sum d^2 (1 - p) / p.
        sd = np.sqrt(float((d**2 * (1 - p) / p).sum()))
        assert abs(float(got.astype(np.float64).sum()) - float(d.sum())) <= 4 * sd, name
        gl = l1[name].reshape(-1)
        np.testing.assert_array_equal(gl != 0, keep, err_msg=name)
        np.testing.assert_allclose(np.abs(gl).astype(np.float64).sum(), np.abs(d).sum(), rtol=1e-5, err_msg=name)


def test_della_elects_signs_and_normalizes_by_default(zero_base_family, tmp_path: Path) -> None:
    density, eps, w = 0.5, 0.1, [1.0, 0.5]
    out = _dare("della", zero_base_family, tmp_path / "t", [0, 1], density=density, epsilon=eps, seed=2, weights=w)
    srcs = [load_checkpoint(m) for m in zero_base_family[1]]
    for name, got in out.items():
        v = []
        for i, (s, wi) in enumerate(zip(srcs, w)):
            keep, p = della_reference_mask(2, name, i, s[name], density, eps)
            d = s[name].reshape(-1).astype(np.float64)
            v.append(np.where(keep, (d / p).astype(np.float32).astype(np.float64), 0.0) * wi)
        maj = np.where(v[0] + v[1] >= 0, 1.0, -1.0)
        agree = [np.sign(x) == maj for x in v]
        num = sum(np.where(a, x, 0.0) for a, x in zip(agree, v))
        den = sum(np.where(a, wi, 0.0) for a, wi in zip(agree, w))
        expected = num / np.where(den == 0, 1.0, den)
        np.testing.assert_allclose(got.reshape(-1), expected, rtol=1e-6, atol=1e-7, err_msg=name)


def test_della_command_is_seeded_and_matches_the_api(zero_base_family, tmp_path: Path) -> None:
    from conftest import run_umerge

    base, ms = zero_base_family
    args = ["della_linear", *ms, "--base", base, "--density", "0.5", "--epsilon", "0.2", "--seed", "5", "--quiet"]
    assert run_umerge([*args, "-o", tmp_path / "cli"]).returncode == 0
    umerge.della_linear(ms, base, density=0.5, epsilon=0.2, seed=5, out=tmp_path / "api", progress=False)
    def shards(d: Path) -> dict[str, str]:
        return {Path(k).name: v.split()[0] for k, v in tree_digest(d).items() if k.endswith(".safetensors")}

    assert shards(tmp_path / "cli") == shards(tmp_path / "api") != {}
