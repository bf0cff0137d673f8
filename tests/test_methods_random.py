"""The random methods (dare_linear, dare_ties): masks, rescale, determinism.

- the keep mask of every tensor equals an independent numpy implementation of the documented
  generator (SplitMix64 at position j of the stream keyed by seed, tensor name and model, from the
  published constants), and its kept fraction is within 4 standard deviations of density;
- `rescale: density` makes kept entries d / density, so each tensor's sum keeps its expectation
  (checked within 4 standard deviations); `rescale: l1` keeps each tensor's L1 norm;
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
from umerge.testing import TINY_ODD, llama_tensors, write_model
from umerge.testing.safetensors_io import load_checkpoint

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


def reference_mask(seed: int, tensor: str, model: int, n: int, density: float) -> np.ndarray:
    """keep_j = top 53 bits of mix(key + (j + 1) * GAMMA) < ceil(density * 2^53)."""
    with np.errstate(over="ignore"):
        one = lambda x: _mix(np.array([x], dtype=np.uint64))[0]  # noqa: E731
        key = one(int(one(np.uint64(seed) ^ one(np.uint64(_fnv1a(tensor))))) ^ int(one(np.uint64((model + 1)) * GAMMA)))
        j = np.arange(1, n + 1, dtype=np.uint64)
        bits = _mix(key + j * GAMMA) >> np.uint64(11)
    cutoff = int(np.ceil(density * 2.0**53))
    return bits < np.uint64(cutoff)


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


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
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
