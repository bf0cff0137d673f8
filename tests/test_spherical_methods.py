"""nuslerp, multislerp, karcher, nearswap, filter-wise model_stock and ties without normalize against
the float64 numpy references of `reference_merge` (mergekit 0.1.5's steps, written out), on
checkpoints through the Python API and on hand-made vectors through `umerge.ops`, including the
edge cases: parallel and antiparallel vectors, zero vectors, eps, antipodal inputs.

Tolerances: umerge computes each tensor's coefficients in float64 and the output in float32, so
it may differ from the float64 reference by the float32 rounding of a few operations per element:
held to 3 ulp of the tensor's scale (its largest magnitude; measured: at most 2.1, model_stock on a
1-D norm). The element-wise methods (nearswap, ties) are held to 1 ulp of the scale (measured 0.8
and 0.5); per element the error can be larger where a result near 0 comes from cancelling terms.
nearswap's float32 steps are checked bit for bit against mergekit's order separately.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import reference_merge as ref
import umerge
from conftest import Family
from umerge.errors import InputError
from umerge.ops import merge_arrays
from umerge.safetensors_io import load_checkpoint, write_tensors
from umerge.synthetic import TINY_ODD, CheckpointSpec, make_family

Ref = Callable[[str], np.ndarray]


@pytest.fixture(scope="module")
def fam3(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """float32, odd sizes, 2 shards, a base and 3 fine-tunes."""
    spec = CheckpointSpec(TINY_ODD, dtype="F32", shards=2, seed=21)
    base, fts = make_family(tmp_path_factory.mktemp("fam3"), spec, 3)
    return Family(spec, base, fts)


def _close_to_scale(out: Path, expected: Ref, ulps: float = 3.0) -> None:
    got = load_checkpoint(out)
    for name, x in got.items():
        want = expected(name)
        scale = np.spacing(np.float32(np.abs(want).max()))
        err = np.abs(x.astype(np.float64) - want).max() / scale
        assert err <= ulps, f"{name}: {err:.2f} ulp of the scale from the float64 reference"


def _run(fn: str, *args: Any, out: Path, **kwargs: Any) -> Path:
    getattr(umerge, fn)(*args, out=out, progress=False, **kwargs)
    return out


@pytest.mark.parametrize(("flatten", "row_wise", "with_base"), [(True, False, True), (False, False, True),
                                                                (False, True, True), (True, False, False),
                                                                (False, True, False)])
def test_nuslerp_matches_reference(fam3: Family, tmp_path: Path, flatten: bool, row_wise: bool,
                                   with_base: bool) -> None:
    b, (x0, x1) = load_checkpoint(fam3.base), [load_checkpoint(p) for p in fam3.finetuned[:2]]
    base = fam3.base if with_base else None
    out = _run("nuslerp", fam3.finetuned[:2], base, weights=[0.3, 0.9], flatten=flatten, row_wise=row_wise,
               out=tmp_path / "o")
    _close_to_scale(out, lambda n: ref.nuslerp(x0[n], x1[n], (0.3, 0.9), b[n] if with_base else None,
                                               flatten=flatten, row_wise=row_wise))


def test_nuslerp_rows_and_columns_differ_from_the_whole_tensor(fam3: Family, tmp_path: Path) -> None:
    outs = [load_checkpoint(_run("nuslerp", fam3.finetuned[:2], fam3.base, flatten=f, row_wise=r, out=tmp_path / k))
            for k, f, r in (("t", True, False), ("r", False, False), ("c", False, True))]
    name = "model.layers.0.mlp.down_proj.weight"
    assert not np.array_equal(outs[0][name], outs[1][name]) and not np.array_equal(outs[1][name], outs[2][name])


@pytest.mark.parametrize(("with_base", "weights", "normalize"), [(True, [0.2, 0.5, 0.3], True),
                                                                 (False, [1.0, 1.0, 1.0], True),
                                                                 (True, [1.0, 2.0, 0.5], False)])
def test_multislerp_matches_the_reference_with_its_tangent_step(fam3: Family, tmp_path: Path, with_base: bool,
                                                                weights: list[float], normalize: bool) -> None:
    b, xs = load_checkpoint(fam3.base), [load_checkpoint(p) for p in fam3.finetuned]
    out = _run("multislerp", fam3.finetuned, fam3.base if with_base else None, weights=weights,
               normalize_weights=normalize, out=tmp_path / "o")
    _close_to_scale(out, lambda n: ref.multislerp([x[n] for x in xs], weights, b[n] if with_base else None,
                                                  normalize_weights=normalize))


@pytest.mark.parametrize(("delta_std", "max_iter", "tol"), [(0.002, 10, 1e-5), (0.03, 10, 1e-5), (0.03, 2, 1e-5),
                                                            (0.03, 50, 1e-9)])
def test_karcher_matches_the_iterating_reference(tmp_path: Path, delta_std: float, max_iter: int, tol: float) -> None:
    # delta 0.03 over a base of 0.02: models about a radian apart, where the iteration matters
    spec = CheckpointSpec(TINY_ODD, dtype="F32", shards=1, seed=5, delta_std=delta_std)
    base, fts = make_family(tmp_path / "fam", spec, 3)
    xs = [load_checkpoint(p) for p in fts]
    out = _run("karcher", fts, max_iter=max_iter, tol=tol, out=tmp_path / "o")
    _close_to_scale(out, lambda n: ref.karcher([x[n] for x in xs], max_iter, tol))
    if delta_std > 0.01 and max_iter == 10:
        # the iteration moved the result: the normalised mean (no step) is far from it
        name = "model.layers.1.mlp.up_proj.weight"
        start = ref.karcher([x[name] for x in xs], 0, tol)
        got = load_checkpoint(out)[name]
        assert np.abs(got - start).max() > 100 * np.spacing(np.float32(np.abs(start).max()))


def test_nearswap_matches_reference(fam3: Family, tmp_path: Path) -> None:
    b, x = load_checkpoint(fam3.base), load_checkpoint(fam3.finetuned[0])
    got = load_checkpoint(_run("nearswap", fam3.finetuned[0], fam3.base, t=0.001, out=tmp_path / "o"))
    swapped = 0.0
    for n, y in got.items():
        want = ref.nearswap(b[n], x[n], 0.001)
        assert np.abs(y - want).max() <= np.spacing(np.float32(np.abs(want).max())), n
        swapped += np.mean(y == x[n])
    # delta std 0.002, t 0.001: some elements are taken whole, most move part of the way
    assert 0.1 < swapped / len(got) < 0.9


def test_model_stock_filter_wise_matches_reference(fam3: Family, tmp_path: Path) -> None:
    b, xs = load_checkpoint(fam3.base), [load_checkpoint(p) for p in fam3.finetuned]
    out = _run("model_stock", fam3.finetuned, fam3.base, filter_wise=True, out=tmp_path / "o")
    _close_to_scale(out, lambda n: ref.model_stock(b[n], [x[n] for x in xs], filter_wise=True))
    whole = load_checkpoint(_run("model_stock", fam3.finetuned, fam3.base, out=tmp_path / "w"))
    name = "model.embed_tokens.weight"
    assert not np.allclose(whole[name], load_checkpoint(out)[name], rtol=0, atol=1e-6)
    # a 1-D tensor is one row either way
    assert np.array_equal(whole["model.norm.weight"], load_checkpoint(out)["model.norm.weight"])


def test_ties_without_normalize_is_the_agreeing_sum(fam3: Family, tmp_path: Path) -> None:
    b, xs = load_checkpoint(fam3.base), [load_checkpoint(p) for p in fam3.finetuned[:2]]
    out = _run("ties", fam3.finetuned[:2], fam3.base, density=0.6, weights=[0.7, 0.4], normalize=False,
               out=tmp_path / "o")
    got = load_checkpoint(out)
    for n, y in got.items():
        deltas = [x[n].astype(np.float64) - b[n] for x in xs]
        want = ref.mergekit_ties(b[n], deltas, 0.6, [0.7, 0.4], normalize=False)
        amb = ref.ambiguous(deltas, 0.6, [0.7, 0.4])  # magnitude ties at the trim threshold, sign ties
        ok = np.abs(y - want) <= np.spacing(np.float32(np.abs(want).max()))
        assert (ok | amb).all() and amb.mean() < 0.01, n
    normalized = load_checkpoint(_run("ties", fam3.finetuned[:2], fam3.base, density=0.6, weights=[0.7, 0.4],
                                      out=tmp_path / "n"))
    assert any(not np.array_equal(normalized[n], got[n]) for n in got)


# -- edge cases on hand-made vectors (umerge.ops, one 1-D tensor) -------------------------------------

def _ops(method: str, base: np.ndarray | None, models: list[np.ndarray], params: dict[str, Any] | None = None,
         weights: list[float] | None = None) -> np.ndarray:
    mp = [{"weight": w} for w in weights] if weights is not None else None
    return merge_arrays(method, base, [np.asarray(m, np.float32) for m in models], params, mp)


RNG = np.random.default_rng(7)
V = RNG.standard_normal(300).astype(np.float32)
W = RNG.standard_normal(300).astype(np.float32)


@pytest.mark.parametrize(("case", "x0", "x1"), [
    ("parallel", V, 2 * V), ("antiparallel", V, -3 * V), ("orthogonal-ish", V, W),
    ("zero first", np.zeros(300, np.float32), W), ("both zero", np.zeros(300, np.float32), np.zeros(300, np.float32)),
])
@pytest.mark.parametrize("weights", [[1.0, 3.0], [1.0, -1.0]])
def test_nuslerp_edge_vectors(case: str, x0: np.ndarray, x1: np.ndarray, weights: list[float]) -> None:
    got = _ops("nuslerp", None, [x0, x1], weights=weights)
    want = ref.nuslerp(x0, x1, weights)
    scale = np.spacing(np.float32(max(np.abs(want).max(), 1e-30)))
    assert np.abs(got - want).max() <= 3 * scale, case
    if case in ("parallel", "antiparallel"):  # collinear: the linear branch, (1 - t) x0 + t x1
        t = 0.5 if abs(sum(weights)) < 1e-6 else weights[1] / sum(weights)
        lin = np.float32(1 - t) * x0 + np.float32(t) * x1
        assert np.array_equal(got, lin), case


def test_multislerp_edge_vectors() -> None:
    # antiparallel pair, equal weights: the weighted mean is zero, two models fall back to the sum
    got = _ops("multislerp", None, [V, -V], weights=[1.0, 1.0])
    assert np.array_equal(got, np.float32(0.5) * V + np.float32(0.5) * -V)
    np.testing.assert_array_equal(ref.multislerp([V, -V], [1.0, 1.0]), got)
    # a zero vector has a zero unit vector and norm: it only dilutes the weights
    z = np.zeros(300, np.float32)
    got = _ops("multislerp", None, [V, z, W], weights=[1.0, 1.0, 2.0])
    want = ref.multislerp([V, z, W], [1.0, 1.0, 2.0])
    assert np.abs(got - want).max() <= 3 * np.spacing(np.float32(np.abs(want).max()))
    # eps large enough to matter changes the unit vectors (x / (|x| + eps)) as in the reference
    for eps in (1e-8, 5.0):
        got = _ops("multislerp", None, [V, 3 * W], {"eps": eps}, weights=[1.0, 1.0])
        want = ref.multislerp([V, 3 * W], [1.0, 1.0], eps=eps)
        assert np.abs(got - want).max() <= 3 * np.spacing(np.float32(np.abs(want).max())), eps
    assert not np.allclose(_ops("multislerp", None, [V, 3 * W], {"eps": 5.0}),
                           _ops("multislerp", None, [V, 3 * W]), rtol=1e-3)
    # three inputs whose weighted unit vectors cancel: undefined, an error naming the tensor
    with pytest.raises(InputError, match="multislerp cannot merge tensor array: the weighted mean"):
        _ops("multislerp", None, [V, -V, z], weights=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError):
        ref.multislerp([V, -V, z], [1.0, 1.0, 1.0])
    # a single model is returned as it is, the base not added
    assert np.array_equal(_ops("multislerp", W, [V]), V)


def test_karcher_edge_vectors() -> None:
    z = np.zeros(300, np.float32)
    # every norm at or below tol: zeros
    assert not _ops("karcher", None, [z, 1e-7 * np.ones(300, np.float32)]).any()
    # a zero input counts in the scale only: mean norm |V| / 2 along V
    got = _ops("karcher", None, [z, V])
    np.testing.assert_allclose(got, ref.karcher([z, V]), rtol=2e-7, atol=1e-7)
    # three inputs far apart: the iteration, as the reference
    xs = [V, W, V + 2 * W]
    got = _ops("karcher", None, xs, {"max_iter": 30, "tol": 1e-8})
    want = ref.karcher(xs, 30, 1e-8)
    assert np.abs(got - want).max() <= 3 * np.spacing(np.float32(np.abs(want).max()))
    # antipodal pair: the mean starts at V, then -V is at angle pi: mergekit divides by sin(pi)
    with pytest.raises(InputError, match="karcher cannot merge tensor array: input 2 points exactly away"):
        _ops("karcher", None, [V, -V])


def test_nearswap_edge_values() -> None:
    a = np.array([0.0, 1.0, 1.0, -2.0, 5.0], np.float32)
    b = np.array([0.0, 1.0005, 3.0, -2.0, 4.0], np.float32)
    for t in (0.0, 0.001, 0.5, 10.0):
        got = _ops("nearswap", a, [b], {"t": t})
        w = np.clip((np.float32(1) / np.maximum(np.abs(a - b), np.float32(1e-6))) * np.float32(t), 0, 1)
        assert np.array_equal(got, w * b + (1 - w) * a), t  # mergekit's float32 steps, bit for bit
        np.testing.assert_allclose(got, ref.nearswap(a, b, t), rtol=1e-6, atol=1e-7)
    assert np.array_equal(_ops("nearswap", a, [b], {"t": 0.0}), a)
    assert np.array_equal(_ops("nearswap", a, [b], {"t": 10.0}), b)


def test_nuslerp_column_sums_beyond_the_budget_are_one_error(tmp_path: Path) -> None:
    # [8, 30000] by columns: 90,000 float64 sums (720 kB) for the total and for each of an item's
    # 4 blocks, over the 2 MiB a 16 MiB budget leaves them; a larger budget merges.
    rng = np.random.default_rng(3)
    paths = []
    for k in range(2):
        p = tmp_path / f"m{k}"
        p.mkdir()
        write_tensors(p / "model.safetensors", {"w": rng.standard_normal((8, 30_000)).astype(np.float32)})
        paths.append(p)
    kw: dict[str, Any] = {"flatten": False, "row_wise": True, "threads": 1, "progress": False}
    with pytest.raises(InputError, match=r"tensor w needs 3600000 bytes for 90000 per-tensor sums of nuslerp"):
        umerge.nuslerp(paths, out=tmp_path / "small", memory_budget="16MiB", **kw)
    assert not (tmp_path / "small").exists()
    umerge.nuslerp(paths, out=tmp_path / "large", memory_budget="64MiB", **kw)
    x0, x1 = (load_checkpoint(p)["w"] for p in paths)
    got = load_checkpoint(tmp_path / "large")["w"]
    want = ref.nuslerp(x0, x1, flatten=False, row_wise=True)
    assert np.abs(got - want).max() <= 3 * np.spacing(np.float32(np.abs(want).max()))
