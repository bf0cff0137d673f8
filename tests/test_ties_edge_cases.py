"""TIES edge cases on hand-built checkpoints: k = 0, density 1, one-element tensors, zero deltas,
sign sums of exactly zero, NaN/Inf inputs, missing tensors, cropped embeddings, integer tensors,
mixed and converted dtypes.

Every expected value comes from `reference_merge` (float64, written from the formulas) or is
written out by hand in the test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import reference_merge as ref
from conftest import run_umerge
from ties_support import api_ties, compare, dtypes_of, load, task_vectors, tolerance
from umerge.errors import InputError
from umerge.synthetic import load_checkpoint, write_model

PRESETS = ["mergekit", "peft", "paper"]


def _family(root: Path, base: dict[str, np.ndarray], fts: list[dict[str, np.ndarray]],
            dtype: str | dict[str, str] = "F32", ft_dtypes: list[str] | None = None) -> tuple[Path, list[Path]]:
    b = write_model(root / "base", base, dtype)
    paths = [write_model(root / f"ft{i + 1}", ft, (ft_dtypes[i] if ft_dtypes else dtype))
             for i, ft in enumerate(fts)]
    return b, paths


def _rng_family(root: Path, shapes: dict[str, tuple[int, ...]], n: int = 2, seed: int = 0,
                dtype: str = "F32") -> tuple[Path, list[Path]]:
    rng = np.random.default_rng(seed)
    base = {k: rng.standard_normal(s).astype(np.float32) * np.float32(0.02) for k, s in shapes.items()}
    fts = [{k: v + rng.standard_normal(v.shape).astype(np.float32) * np.float32(0.002) for k, v in base.items()}
           for _ in range(n)]
    return _family(root, base, fts, dtype)


def _expected(preset: str, base: dict[str, np.ndarray], deltas: list[dict[str, np.ndarray]], density: float,
              weights: list[float] | None = None, lambda_: float = 1.0) -> dict[str, np.ndarray]:
    if preset == "paper":
        return ref.paper_ties(base, deltas, density, lambda_, weights)
    fn = ref.mergekit_ties if preset == "mergekit" else ref.peft_ties
    return {k: fn(base[k], [d[k] for d in deltas], density, weights, lambda_) for k in base}


def _check(preset: str, base_dir: Path, ft_dirs: list[Path], out: Path, density: float,
           weights: list[float] | None = None, out_dtype: str = "F32") -> dict[str, np.ndarray]:
    base = load(base_dir)
    deltas = task_vectors(base, [load(p) for p in ft_dirs])
    expected = _expected(preset, base, deltas, density, weights)
    got = load(out)
    problems = []
    for k in base:
        tol = tolerance(base[k], [d[k] for d in deltas], weights, 1.0, expected[k], out_dtype)
        problems += compare(k, got[k], expected[k], tol)
    assert not problems, "\n".join(problems)
    return got


@pytest.mark.parametrize("preset", ["mergekit", "peft"])
def test_density_giving_k_zero_leaves_that_tensor_at_the_base(tmp_path: Path, preset: str) -> None:
    # density 0.2: "big" keeps int(0.2 * 70) = 14 entries; "small" (4 entries) keeps int(0.8) = 0
    b, fts = _rng_family(tmp_path, {"big": (10, 7), "small": (4,)})
    api_ties(fts, b, tmp_path / "out", density=0.2, preset=preset)
    raw_out, raw_base = load_checkpoint(tmp_path / "out", raw=True), load_checkpoint(b, raw=True)
    assert raw_out["small"].tobytes() == raw_base["small"].tobytes()
    _check(preset, b, fts, tmp_path / "out", 0.2)


def test_paper_density_giving_k_zero_keeps_only_the_largest_entry(tmp_path: Path) -> None:
    # N = 74 entries over the model, density 0.01: k = 0, the authors' kthvalue threshold is the maximum
    b, fts = _rng_family(tmp_path, {"big": (10, 7), "small": (4,)}, seed=1)
    api_ties(fts, b, tmp_path / "out", density=0.01, preset="paper")
    got = _check("paper", b, fts, tmp_path / "out", 0.01)
    base = load(b)
    changed = sum(int(np.count_nonzero(got[k] != base[k])) for k in base)
    assert 1 <= changed <= 2  # at most the largest entry of each of the two models


@pytest.mark.parametrize("preset", PRESETS)
def test_density_one_keeps_every_delta(tmp_path: Path, preset: str) -> None:
    b, fts = _rng_family(tmp_path, {"w": (9, 11), "norm": (11,)}, n=3, seed=2)
    api_ties(fts, b, tmp_path / "out", density=1.0, preset=preset, weights=[1.0, 2.0, 0.5])
    _check(preset, b, fts, tmp_path / "out", 1.0, [1.0, 2.0, 0.5])


@pytest.mark.parametrize("preset", PRESETS)
def test_one_element_tensors(tmp_path: Path, preset: str) -> None:
    base = {"one": np.array([0.5], np.float32), "scalar": np.array(-0.25, np.float32),
            "w": np.full((3, 3), 0.125, np.float32)}
    ft1 = {"one": np.array([0.75], np.float32), "scalar": np.array(-0.5, np.float32),
           "w": np.full((3, 3), 0.25, np.float32)}
    ft2 = {"one": np.array([1.0], np.float32), "scalar": np.array(0.25, np.float32),
           "w": np.full((3, 3), 0.0, np.float32)}
    b, fts = _family(tmp_path, base, [ft1, ft2])
    api_ties(fts, b, tmp_path / "full", density=1.0, preset=preset)
    got = _check(preset, b, fts, tmp_path / "full", 1.0)
    assert got["scalar"].shape == () and got["one"].shape == (1,)
    # by hand, density 1, every preset: "one" deltas +0.25, +0.5 agree -> mean 0.375 -> 0.875
    assert got["one"].tolist() == [0.875]
    # "scalar" deltas -0.25, +0.5: sum +0.25 -> +; only +0.5 agrees -> 0.25
    assert float(got["scalar"]) == 0.25
    if preset != "paper":  # density 0.5: k = int(0.5) = 0 for the one-element tensors -> the base
        api_ties(fts, b, tmp_path / "half", density=0.5, preset=preset)
        half = load(tmp_path / "half")
        assert half["one"].tolist() == [0.5] and float(half["scalar"]) == -0.25


@pytest.mark.parametrize("preset", PRESETS)
def test_all_zero_deltas_give_the_base_bytes(tmp_path: Path, preset: str) -> None:
    rng = np.random.default_rng(3)
    base = {"a": rng.standard_normal((6, 5)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32)}
    ft = {"a": base["a"].copy(), "b": base["b"] + np.float32(0.5)}
    b, fts = _family(tmp_path, base, [ft, {k: v.copy() for k, v in ft.items()}])
    api_ties(fts, b, tmp_path / "out", density=0.8, preset=preset)
    raw = load_checkpoint(tmp_path / "out", raw=True)
    assert raw["a"].tobytes() == load_checkpoint(b, raw=True)["a"].tobytes()
    _check(preset, b, fts, tmp_path / "out", 0.8)


@pytest.mark.parametrize("preset", ["mergekit", "peft"])
def test_sign_sum_exactly_zero_elects_plus(tmp_path: Path, preset: str) -> None:
    base = {"w": np.array([1.0, -1.0, 0.5, 2.0], np.float32)}
    ft1 = {"w": base["w"] + np.array([0.25, -0.125, 0.5, 0.0], np.float32)}
    ft2 = {"w": base["w"] - np.array([0.25, -0.125, 0.5, 0.0], np.float32)}  # exact negatives
    b, fts = _family(tmp_path, base, [ft1, ft2])
    api_ties(fts, b, tmp_path / "out", density=1.0, preset=preset)
    # sums are exactly 0 -> + elected: the positive delta alone, divided by 1 (its weight/count)
    assert load(tmp_path / "out")["w"].tolist() == [1.25, -0.875, 1.0, 2.0]


@pytest.mark.parametrize(("majority", "expected"), [(1.0, [1.25, -0.875]), (-1.0, [0.75, -1.125])])
def test_paper_sign_sum_zero_takes_the_model_majority_sign(tmp_path: Path, majority: float,
                                                           expected: list[float]) -> None:
    base = {"a": np.array([1.0, -1.0], np.float32), "b": np.zeros(5, np.float32)}
    ft1 = {"a": base["a"] + np.array([0.25, 0.125], np.float32), "b": np.full(5, majority * 0.5, np.float32)}
    ft2 = {"a": base["a"] - np.array([0.25, 0.125], np.float32), "b": np.full(5, majority * 0.25, np.float32)}
    b, fts = _family(tmp_path, base, [ft1, ft2])
    api_ties(fts, b, tmp_path / "out", density=1.0, preset="paper")
    # tensor "b" has 5 elements electing `majority`, "a" has 2 zero sums: they take that sign,
    # so only the delta of that sign survives (divided by a count of 1)
    got = load(tmp_path / "out")
    assert got["a"].tolist() == expected
    assert got["b"].tolist() == [majority * 0.375] * 5
    _check("paper", b, fts, tmp_path / "out", 1.0)


@pytest.mark.parametrize("where", ["base", "ft2"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_in_an_input_is_an_error(tmp_path: Path, where: str, bad: float) -> None:
    rng = np.random.default_rng(4)
    base = {"ok": rng.standard_normal(8).astype(np.float32), "poisoned": rng.standard_normal((3, 4)).astype(np.float32)}
    fts = [{k: v + np.float32(0.01) for k, v in base.items()} for _ in range(2)]
    target = base if where == "base" else fts[1]
    target["poisoned"][1, 2] = bad
    b, ft_dirs = _family(tmp_path, base, fts)
    out = tmp_path / "out"
    result = run_umerge(["ties", *ft_dirs, "--base", b, "--density", "0.5", "-o", out, "--quiet"])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("umerge: error: "), result.stderr
    assert "poisoned" in lines[0]
    assert not out.exists()
    with pytest.raises(InputError):
        api_ties(ft_dirs, b, out, density=0.5)
    assert not out.exists()


def test_missing_tensor_is_merged_over_the_models_that_have_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    base = {"w": rng.standard_normal((4, 6)).astype(np.float32), "extra": rng.standard_normal(10).astype(np.float32)}
    ft1 = {k: v + rng.standard_normal(v.shape).astype(np.float32) * np.float32(0.1) for k, v in base.items()}
    ft2 = {"w": base["w"] + rng.standard_normal((4, 6)).astype(np.float32) * np.float32(0.1)}  # no "extra"
    b, fts = _family(tmp_path, base, [ft1, ft2])
    result = run_umerge(["ties", *fts, "--base", b, "--density", "0.6", "-o", tmp_path / "out", "--quiet"])
    assert result.returncode == 0, result.stderr
    got, base_l = load(tmp_path / "out"), load(b)
    d1 = task_vectors(base_l, [load(fts[0])])[0]
    d2 = {"w": (load(fts[1])["w"] - base_l["w"]).astype(np.float64)}
    exp_w = ref.mergekit_ties(base_l["w"], [d1["w"], d2["w"]], 0.6)
    exp_extra = ref.mergekit_ties(base_l["extra"], [d1["extra"]], 0.6)
    problems = compare("w", got["w"], exp_w, tolerance(base_l["w"], [d1["w"], d2["w"]], None, 1.0, exp_w))
    tol_extra = tolerance(base_l["extra"], [d1["extra"]], None, 1.0, exp_extra)
    problems += compare("extra", got["extra"], exp_extra, tol_extra)
    assert not problems, "\n".join(problems)
    strict = run_umerge(["ties", *fts, "--base", b, "--density", "0.6", "-o", tmp_path / "strict", "--quiet",
                         "--strict"])
    assert strict.returncode == 2 and strict.stderr.startswith("umerge: error: ") and "extra" in strict.stderr
    assert not (tmp_path / "strict").exists()


def test_larger_embeddings_are_cropped_to_the_base_with_a_warning(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    base = {"model.embed_tokens.weight": rng.standard_normal((10, 4)).astype(np.float32),
            "lm_head.weight": rng.standard_normal((10, 4)).astype(np.float32)}
    ft1 = {k: np.concatenate([v, rng.standard_normal((3, 4)).astype(np.float32)]) + np.float32(0.01)
           for k, v in base.items()}  # 3 added tokens
    ft2 = {k: v - np.float32(0.02) * rng.standard_normal(v.shape).astype(np.float32) for k, v in base.items()}
    b, fts = _family(tmp_path, base, [ft1, ft2])
    result = run_umerge(["ties", *fts, "--base", b, "--density", "0.7", "-o", tmp_path / "out"])
    assert result.returncode == 0, result.stderr
    assert "embed_tokens" in result.stderr  # the warning names the cropped tensor
    got, base_l, m1, m2 = load(tmp_path / "out"), load(b), load(fts[0]), load(fts[1])
    for k in base:
        ds = [(m1[k][:10] - base_l[k]).astype(np.float64), (m2[k] - base_l[k]).astype(np.float64)]
        exp = ref.mergekit_ties(base_l[k], ds, 0.7)
        assert got[k].shape == (10, 4)
        assert not compare(k, got[k], exp, tolerance(base_l[k], ds, None, 1.0, exp))


def test_integer_tensors_are_copied_when_identical_and_refused_when_not(tmp_path: Path) -> None:
    w = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    ids = np.arange(5, dtype=np.int64)
    dtypes = {"w": "F32", "position_ids": "I64"}
    base = {"w": w, "position_ids": ids}
    fts = [{"w": w + np.float32(0.1), "position_ids": ids.copy()},
           {"w": w - np.float32(0.05), "position_ids": ids.copy()}]
    b, ft_dirs = _family(tmp_path / "same", base, fts, dtypes)
    api_ties(ft_dirs, b, tmp_path / "out", density=1.0)
    assert dtypes_of(tmp_path / "out")["position_ids"] == "I64"
    assert load_checkpoint(tmp_path / "out")["position_ids"].tolist() == [0, 1, 2, 3, 4]
    fts[1]["position_ids"] = ids + 1
    b, ft_dirs = _family(tmp_path / "diff", base, fts, dtypes)
    result = run_umerge(["ties", *ft_dirs, "--base", b, "--density", "1", "-o", tmp_path / "bad", "--quiet"])
    assert result.returncode == 2 and "position_ids" in result.stderr, result.stderr
    assert not (tmp_path / "bad").exists()


def test_mixed_input_dtypes_output_in_the_base_dtype(tmp_path: Path) -> None:
    b, fts = _rng_family(tmp_path / "src", {"w": (16, 9), "n": (9,)}, seed=7)
    base = load(b)
    write_model(tmp_path / "ft_bf16", load(fts[0]), "BF16")
    write_model(tmp_path / "ft_f16", load(fts[1]), "F16")
    mixed = [tmp_path / "ft_bf16", tmp_path / "ft_f16"]
    api_ties(mixed, b, tmp_path / "out", density=0.7)
    assert set(dtypes_of(tmp_path / "out").values()) == {"F32"}
    _check("mergekit", b, mixed, tmp_path / "out", 0.7)
    assert base  # loaded from the float32 base


@pytest.mark.parametrize(("out_dtype", "st_dtype"), [("bf16", "BF16"), ("f16", "F16")])
def test_out_dtype_rounds_the_float32_result(tmp_path: Path, out_dtype: str, st_dtype: str) -> None:
    b, fts = _rng_family(tmp_path, {"w": (32, 17), "n": (17,)}, seed=8)
    api_ties(fts, b, tmp_path / "out", density=0.8, out_dtype=out_dtype)
    assert set(dtypes_of(tmp_path / "out").values()) == {st_dtype}
    _check("mergekit", b, fts, tmp_path / "out", 0.8, out_dtype=st_dtype)


def test_float64_inputs_stay_float64(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    base = {"w": rng.standard_normal((5, 5))}
    fts = [{"w": base["w"] + 0.01 * rng.standard_normal((5, 5))} for _ in range(2)]
    b, ft_dirs = _family(tmp_path, base, fts, "F64")
    api_ties(ft_dirs, b, tmp_path / "out", density=0.6)
    assert dtypes_of(tmp_path / "out") == {"w": "F64"}
    got = load(tmp_path / "out")["w"]
    exp = ref.mergekit_ties(base["w"], [f["w"] - base["w"] for f in fts], 0.6)
    np.testing.assert_allclose(got, exp, rtol=0, atol=1e-6)


def test_allow_nonfinite_merges_anyway(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    base = {"ok": rng.standard_normal(8).astype(np.float32), "poisoned": rng.standard_normal((3, 4)).astype(np.float32)}
    fts = [{k: v + np.float32(0.01) * rng.standard_normal(v.shape).astype(np.float32) for k, v in base.items()}
           for _ in range(2)]
    fts[0]["poisoned"][0, 0] = np.nan
    b, ft_dirs = _family(tmp_path, base, fts)
    api_ties(ft_dirs, b, tmp_path / "out", density=0.5, allow_nonfinite=True)
    got, base_l = load(tmp_path / "out"), load(b)
    ds = [d["ok"] for d in task_vectors(base_l, [load(p) for p in ft_dirs])]
    expected = ref.mergekit_ties(base_l["ok"], ds, 0.5)
    assert not compare("ok", got["ok"], expected, tolerance(base_l["ok"], ds, None, 1.0, expected))
    assert got["poisoned"].shape == (3, 4)
