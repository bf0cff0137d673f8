"""sce, arcee_fusion, ram and ramplus_tl against the float64 numpy references of `reference_merge`
(mergekit 0.1.5's steps, written out), on float32 checkpoints through the Python API and the CLI.

Tolerances: the engine computes in float32 (the variance, softmaxes, KL sums and the sums of
squares in float64), so it may differ from the float64 reference by the float32 rounding of a few
operations per element: held to 1 ulp of each tensor's scale (its largest magnitude; measured at
most 0.5). Which elements are selected (SCE's top-k variance, Arcee Fusion's outliers, RAM's
contributing entries) must be the reference's exactly. Parity with mergekit itself is in
`test_methods_parity.py`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import reference_merge as ref
import umerge
from conftest import Family, run_umerge
from umerge.safetensors_io import load_checkpoint
from umerge.synthetic import TINY_ODD, CheckpointSpec, make_family


@pytest.fixture(scope="module")
def fam3(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """float32, odd sizes, 2 shards, a base and 3 fine-tunes (delta std 0.002)."""
    spec = CheckpointSpec(TINY_ODD, dtype="F32", shards=2, seed=23)
    base, fts = make_family(tmp_path_factory.mktemp("fam3"), spec, 3)
    return Family(spec, base, fts)


def _close_to_scale(got: np.ndarray, want: np.ndarray, name: str, ulps: float = 1.0) -> float:
    scale = np.spacing(np.float32(np.abs(want).max()))
    err = float(np.abs(got.astype(np.float64) - want).max() / scale)
    assert err <= ulps, f"{name}: {err:.2f} ulp of the scale from the float64 reference"
    return err


@pytest.mark.parametrize("select_topk", [1.0, 0.3, 0.05])
def test_sce_matches_reference(fam3: Family, tmp_path: Path, select_topk: float) -> None:
    b, xs = load_checkpoint(fam3.base), [load_checkpoint(p) for p in fam3.finetuned]
    umerge.sce(fam3.finetuned, fam3.base, select_topk=select_topk, out=tmp_path / "o", progress=False)
    got = load_checkpoint(tmp_path / "o")
    worst, unchanged = 0.0, []
    for name, y in got.items():
        want = ref.sce(b[name], [x[name] for x in xs], select_topk)
        worst = max(worst, _close_to_scale(y, want, name))
        unchanged.append(np.mean(y == b[name]))
    print(f"\nsce select_topk {select_topk}: worst {worst:.2f} ulp of the scale")
    # The selection leaves about 1 - select_topk of each tensor at the base.
    assert abs(np.mean(unchanged) - (1 - select_topk)) < 0.02


def test_sce_weights_are_uniform_below_the_floor(tmp_path: Path) -> None:
    # Task vectors of std 3e-4: mean squares of about 1e-7 each, below mergekit's 1e-6 in total.
    spec = CheckpointSpec(TINY_ODD, dtype="F32", shards=1, seed=24, delta_std=3e-4)
    base, fts = make_family(tmp_path / "fam", spec, 3)
    b, xs = load_checkpoint(base), [load_checkpoint(p) for p in fts]
    umerge.sce(fts, base, select_topk=0.5, out=tmp_path / "o", progress=False)
    got = load_checkpoint(tmp_path / "o")
    for name, y in got.items():
        _close_to_scale(y, ref.sce(b[name], [x[name] for x in xs], 0.5), name)
    name = "model.layers.0.mlp.up_proj.weight"
    squares = sum(float(np.mean((x[name].astype(np.float64) - b[name]) ** 2)) for x in xs)
    assert squares < 1e-6  # the uniform branch is the one tested


def test_arcee_fusion_matches_reference(fam3: Family, tmp_path: Path) -> None:
    b, x = load_checkpoint(fam3.base), load_checkpoint(fam3.finetuned[0])
    umerge.arcee_fusion(fam3.finetuned[0], fam3.base, out=tmp_path / "o", progress=False)
    got = load_checkpoint(tmp_path / "o")
    taken = []
    for name, y in got.items():
        want, mask = ref.arcee_fusion(b[name], x[name])
        _close_to_scale(y, want, name)
        assert np.array_equal(y != b[name], mask & (x[name] != b[name])), f"{name}: not the reference's outliers"
        taken.append(mask.mean())
    # Tukey's fence takes a minority of each tensor (normal task vectors: about 5%), never all.
    assert 0.0 < np.mean(taken) < 0.2, taken


@pytest.mark.parametrize(("method", "kwargs"), [("ram", {}), ("ramplus_tl", {"r": 0.5, "alpha": 0.5}),
                                                ("ramplus_tl", {"r": 2.0, "alpha": 0.05})])
def test_ram_matches_reference(fam3: Family, tmp_path: Path, method: str, kwargs: dict[str, float]) -> None:
    b, xs = load_checkpoint(fam3.base), [load_checkpoint(p) for p in fam3.finetuned]
    eps = 0.002  # one delta std: elements changed by none, one, or several of the models
    getattr(umerge, method)(fam3.finetuned, fam3.base, epsilon=eps, out=tmp_path / "o", progress=False, **kwargs)
    got = load_checkpoint(tmp_path / "o")
    for name, y in got.items():
        want = ref.ram(b[name], [x[name] for x in xs], eps, plus=method == "ramplus_tl", **kwargs)
        _close_to_scale(y, want, name)
    name = "model.layers.1.self_attn.q_proj.weight"
    counts = sum((np.abs(x[name].astype(np.float64) - b[name]) > eps).astype(int) for x in xs)
    assert {0, 1, 2} <= set(np.unique(counts))  # every case of the rule is exercised


def test_ramplus_differs_from_ram_only_on_unique_elements(fam3: Family, tmp_path: Path) -> None:
    eps = 0.002
    umerge.ram(fam3.finetuned, fam3.base, epsilon=eps, out=tmp_path / "r", progress=False)
    umerge.ramplus_tl(fam3.finetuned, fam3.base, epsilon=eps, r=1.0, alpha=1.0, out=tmp_path / "p", progress=False)
    b, xs = load_checkpoint(fam3.base), [load_checkpoint(p) for p in fam3.finetuned]
    r, p = load_checkpoint(tmp_path / "r"), load_checkpoint(tmp_path / "p")
    name = "model.layers.0.mlp.down_proj.weight"
    counts = sum((np.abs(x[name].astype(np.float64) - b[name]) > eps).astype(int) for x in xs)
    differs = r[name] != p[name]
    assert differs.any() and not differs[counts != 1].any()


@pytest.mark.parametrize(("args", "message"), [
    (["sce", "{ft0}", "{ft1}", "--base", "{base}", "--select-topk", "1.5"],
     "invalid parameter select_topk: 1.5 is outside (0, 1]"),
    (["sce", "{ft0}", "{ft1}"], "sce needs a base model"),
    (["arcee-fusion", "{ft0}"], "arcee_fusion needs a base model"),
    (["ram", "{ft0}", "{ft1}", "--base", "{base}", "--epsilon", "-1"], "invalid parameter epsilon: -1 is negative"),
    (["ramplus-tl", "{ft0}", "{ft1}", "--base", "{base}", "--alpha", "-0.5"],
     "invalid parameter alpha: -0.5 is negative"),
])
def test_bad_parameters_are_one_line_and_exit_2(fam3: Family, tmp_path: Path, args: list[str], message: str) -> None:
    names = {"ft0": fam3.finetuned[0], "ft1": fam3.finetuned[1], "base": fam3.base}
    result = run_umerge([*(a.format(**names) for a in args), "-o", tmp_path / "out", "--quiet"])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_the_commands_write_what_the_api_writes(fam3: Family, tmp_path: Path) -> None:
    result = run_umerge(["sce", *fam3.finetuned, "--base", fam3.base, "--select-topk", "0.3", "-o", tmp_path / "cli",
                         "--quiet"])
    assert result.returncode == 0, result.stderr
    umerge.sce(fam3.finetuned, fam3.base, select_topk=0.3, out=tmp_path / "api", progress=False)
    a, c = load_checkpoint(tmp_path / "api"), load_checkpoint(tmp_path / "cli")
    assert all(np.array_equal(a[n].view(np.uint32), c[n].view(np.uint32)) for n in a)
    result = run_umerge(["arcee-fusion", fam3.finetuned[0], "--base", fam3.base, "-o", tmp_path / "af", "--quiet"])
    assert result.returncode == 0, result.stderr
    assert "arcee_fusion" in (tmp_path / "af" / "umerge.yml").read_text()  # the recipe names the method
