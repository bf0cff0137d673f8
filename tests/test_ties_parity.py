"""TIES parity: the engine against independent references on Llama-shaped checkpoints.

- preset mergekit (default) vs the float64 numpy reference of mergekit's TIES, everywhere: ties at
  the trim threshold are broken by the lowest index in both, which a separate test checks on data
  full of ties; on continuous data the few threshold ties are also listed, and excluded, so a
  different tie-break would show up in that test only;
- preset mergekit vs mergekit itself (`mergekit-yaml` from the peer venv, same config): at least
  99.9% of elements within 1 float32 ulp (mergekit breaks ties by argsort order);
- preset peft vs `peft.utils.merge_utils.ties` applied to the task vectors (except where
  torch.topk's tie-break could differ);
- preset paper vs the numpy reference of the paper's whole-model algorithm.

Checkpoints: float32 (and bfloat16) Llama shapes with awkward sizes (hidden 42, intermediate 97,
vocab 131), 1-D norm weights, 2-3 shards per model.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

import reference_merge as ref
from conftest import Family, run_umerge, tree_digest
from ties_support import api_ties, compare, dtypes_of, load, task_vectors, tolerance
from umerge.synthetic import TINY_ODD, CheckpointSpec, llama_tensors, write_model

NAMES = [n for n, _ in llama_tensors(TINY_ODD)]


def _mergekit_mismatches(fam: Family, out: Path, density: float, weights: list[float] | None, lambda_: float,
                         out_dtype: str = "F32", trim_ties: bool = True) -> tuple[list[str], int, int]:
    """Compare an output with the mergekit reference; returns (problems, excluded positions, elements).

    Excluded: sign elections float32 cannot resolve, and (if `trim_ties`) magnitude ties at the
    threshold; without `trim_ties` the lowest-index tie-break is checked as well.
    """
    base = load(fam.base)
    deltas = task_vectors(base, [load(m) for m in fam.finetuned])
    got = load(out)
    problems: list[str] = []
    assert set(got) == set(base), f"tensor names differ: {set(got) ^ set(base)}"
    n_ties = n_all = 0
    for name in NAMES:
        ds = [d[name] for d in deltas]
        expected = ref.mergekit_ties(base[name], ds, density, weights, lambda_)
        ties = ref.ambiguous(ds, density, weights, trim_ties=trim_ties)
        n_ties += int(ties.sum())
        n_all += ties.size
        tol = tolerance(base[name], ds, weights, lambda_, expected, out_dtype)
        problems += compare(name, got[name], expected, tol, exclude=ties)
    return problems, n_ties, n_all


@pytest.mark.parametrize(("density", "weights", "lambda_"), [
    (0.8, None, 1.0),
    (0.35, [1.0, 0.5], 0.7),
    (0.8, [0.3, 1.7], 1.0),
])
def test_mergekit_preset_matches_numpy_reference(odd_f32_family: Family, tmp_path: Path, density: float,
                                                 weights: list[float] | None, lambda_: float) -> None:
    before = tree_digest(*odd_f32_family.all)
    kwargs = {} if weights is None else {"weights": weights}
    api_ties(odd_f32_family.finetuned, odd_f32_family.base, tmp_path / "out", density=density,
             lambda_=lambda_, **kwargs)
    problems, n_ties, n_all = _mergekit_mismatches(odd_f32_family, tmp_path / "out", density, weights, lambda_)
    assert not problems, "\n".join(problems)
    assert n_ties < 0.001 * n_all  # continuous data: threshold ties are rare, the exclusion is tiny
    assert set(dtypes_of(tmp_path / "out").values()) == {"F32"}
    assert tree_digest(*odd_f32_family.all) == before  # inputs untouched


def test_mergekit_preset_on_bf16_three_models(odd_bf16_family: Family, tmp_path: Path) -> None:
    api_ties(odd_bf16_family.finetuned, odd_bf16_family.base, tmp_path / "out", density=0.6,
             weights=[1.0, 0.8, 0.6])
    problems, n_ambiguous, n_all = _mergekit_mismatches(odd_bf16_family, tmp_path / "out", 0.6, [1.0, 0.8, 0.6],
                                                        1.0, "BF16", trim_ties=False)
    assert not problems, "\n".join(problems)
    assert n_ambiguous < 0.005 * n_all  # only sign elections float32 cannot resolve (bf16 deltas cancel often)
    assert set(dtypes_of(tmp_path / "out").values()) == {"BF16"}


def test_tie_break_keeps_the_lowest_indices(make_family_at, tmp_path: Path) -> None:
    # Values on a 2^-12 grid: deltas take a handful of values, so nearly every cut falls in a tie.
    fam = make_family_at(CheckpointSpec(TINY_ODD, "F32", shards=2, seed=21, grid=2.0 ** -12))
    api_ties(fam.finetuned, fam.base, tmp_path / "out", density=0.55)
    base = load(fam.base)
    deltas = task_vectors(base, [load(m) for m in fam.finetuned])
    got = load(tmp_path / "out")
    problems, n_ties = [], 0
    for name in NAMES:
        ds = [d[name] for d in deltas]
        n_ties += sum(int(ref.threshold_ties(d, ref.keep_count(0.55, d.size)).sum()) for d in ds)
        expected = ref.mergekit_ties(base[name], ds, 0.55)
        problems += compare(name, got[name], expected, tolerance(base[name], ds, None, 1.0, expected))
    assert n_ties > 1000  # the data really is full of ties
    assert not problems, "\n".join(problems)


def test_cli_merge_matches_numpy_reference(odd_f32_family: Family, tmp_path: Path) -> None:
    fam = odd_f32_family
    result = run_umerge(["ties", *fam.finetuned, "--base", fam.base, "--density", "0.5", "--weight", "0.7",
                         "--weight", "1.3", "--lambda", "1.2", "-o", tmp_path / "out", "--quiet"])
    assert result.returncode == 0, result.stderr
    problems, _, _ = _mergekit_mismatches(fam, tmp_path / "out", 0.5, [0.7, 1.3], 1.2)
    assert not problems, "\n".join(problems)


def _run_mergekit(peers: Path, fam: Family, out: Path, density: float, weights: list[float], lambda_: float) -> None:
    models = "\n".join(f"  - model: {m}\n    parameters: {{weight: {w}, density: {density}}}"
                       for m, w in zip(fam.finetuned, weights))
    config = (f"merge_method: ties\nbase_model: {fam.base}\nmodels:\n{models}\n"
              f"parameters:\n  lambda: {lambda_}\n  normalize: true\ndtype: float32\n")
    (out.parent / "mergekit.yml").write_text(config)
    cmd = [str(peers / "bin" / "mergekit-yaml"), str(out.parent / "mergekit.yml"), str(out), "--no-copy-tokenizer",
           "--no-write-model-card", "--no-cuda", "--quiet", "-j", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"mergekit-yaml failed:\n{proc.stderr[-3000:]}"


@pytest.mark.slow
def test_mergekit_preset_matches_mergekit_itself(peers: Path, odd_f32_family: Family, tmp_path: Path) -> None:
    fam, density, weights, lambda_ = odd_f32_family, 0.8, [1.0, 0.5], 0.9
    _run_mergekit(peers, fam, tmp_path / "mergekit", density, weights, lambda_)
    api_ties(fam.finetuned, fam.base, tmp_path / "umerge", density=density, weights=weights, lambda_=lambda_)
    theirs, ours = load(tmp_path / "mergekit"), load(tmp_path / "umerge")
    assert set(theirs) == set(ours)
    within = total = identical = 0
    worst = []
    for name in theirs:
        a, b = ours[name], theirs[name]
        assert a.shape == b.shape and a.dtype == b.dtype == np.float32, name
        ulp = np.spacing(np.abs(b))  # float32 ulp at mergekit's value
        ok = np.abs(a.astype(np.float64) - b.astype(np.float64)) <= ulp
        within += int(ok.sum())
        identical += int(np.count_nonzero(a.view(np.uint32) == b.view(np.uint32)))
        total += ok.size
        if not ok.all():
            worst.append(f"{name}: {int((~ok).sum())} elements beyond 1 ulp")
    print(f"\numerge vs mergekit: {within}/{total} elements within 1 float32 ulp ({within / total:.5%}), "
          f"{identical} bit-identical")
    assert within >= 0.999 * total, "\n".join(worst)


@pytest.mark.peft
@pytest.mark.train
@pytest.mark.parametrize(("weights", "lambda_"), [([1.0, 1.0], 1.0), ([1.0, 0.6], 0.8)])
def test_peft_preset_matches_peft(odd_f32_family: Family, tmp_path: Path, weights: list[float], lambda_: float) -> None:
    torch = pytest.importorskip("torch", reason="the peft parity test needs torch (the `train` extra)")
    merge_utils = pytest.importorskip("peft.utils.merge_utils", reason="needs peft (the `train` extra)")
    fam, density = odd_f32_family, 0.7
    api_ties(fam.finetuned, fam.base, tmp_path / "out", density=density, weights=weights, lambda_=lambda_,
             preset="peft")
    base = load(fam.base)
    models = [load(m) for m in fam.finetuned]
    got = load(tmp_path / "out")
    problems = []
    for name in NAMES:
        b = torch.from_numpy(base[name])
        tvs = [torch.from_numpy(m[name]) - b for m in models]  # float32, as PEFT users hold them
        merged = merge_utils.ties(tvs, torch.tensor(weights, dtype=torch.float32), density=density)
        expected = base[name].astype(np.float64) + lambda_ * merged.double().numpy()
        ds = [t.double().numpy() for t in tvs]
        ties = ref.ambiguous(ds, density, weighted_sign=False)
        # the float64 numpy reference of the same formula agrees with PEFT here too
        np.testing.assert_allclose(ref.peft_ties(base[name], ds, density, weights, lambda_)[~ties], expected[~ties],
                                   rtol=0, atol=1e-6)
        problems += compare(name, got[name], expected, tolerance(base[name], ds, weights, lambda_, expected),
                            exclude=ties)
    assert not problems, "\n".join(problems)


def test_peft_preset_matches_numpy_reference(odd_f32_family: Family, tmp_path: Path) -> None:
    fam, density, weights = odd_f32_family, 0.45, [1.5, 0.5]
    api_ties(fam.finetuned, fam.base, tmp_path / "out", density=density, weights=weights, preset="peft")
    base = load(fam.base)
    deltas = task_vectors(base, [load(m) for m in fam.finetuned])
    got = load(tmp_path / "out")
    problems = []
    for name in NAMES:
        ds = [d[name] for d in deltas]
        expected = ref.peft_ties(base[name], ds, density, weights)
        problems += compare(name, got[name], expected, tolerance(base[name], ds, weights, 1.0, expected))
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def uneven_family(odd_f32_family: Family, tmp_path_factory: pytest.TempPathFactory) -> Family:
    """The odd family with task-vector scales varying by tensor (x1 to x5), so that trimming the whole
    model at once keeps very different fractions of different tensors (unlike per-tensor trimming)."""
    root = tmp_path_factory.mktemp("uneven")
    base = load(odd_f32_family.base)
    write_model(root / "base", base, "F32", shards=2)
    fts = []
    for v, path in enumerate(odd_f32_family.finetuned, start=1):
        m = load(path)
        scaled = {n: base[n] + np.float32(1 + j % 5) * (m[n] - base[n]) for j, n in enumerate(NAMES)}
        fts.append(write_model(root / f"ft{v}", scaled, "F32", shards=3))
    return Family(odd_f32_family.spec, root / "base", fts)


@pytest.mark.parametrize(("density", "lambda_"), [(0.8, 1.0), (0.2, 1.5)])
def test_paper_preset_matches_numpy_paper(uneven_family: Family, tmp_path: Path, density: float,
                                          lambda_: float) -> None:
    fam = uneven_family
    api_ties(fam.finetuned, fam.base, tmp_path / "out", density=density, lambda_=lambda_, preset="paper")
    base = load(fam.base)
    deltas = task_vectors(base, [load(m) for m in fam.finetuned])
    expected = ref.paper_ties(base, deltas, density, lambda_)
    got = load(tmp_path / "out")
    problems = []
    for name in NAMES:
        ds = [d[name] for d in deltas]
        problems += compare(name, got[name], expected[name], tolerance(base[name], ds, None, lambda_, expected[name]))
    assert not problems, "\n".join(problems)
    # the test can tell global from per-tensor trimming: a per-tensor reference is far off here
    name = "model.layers.0.mlp.gate_proj.weight"  # scale x1: trimmed much harder than the x5 tensors
    per_tensor = ref.mergekit_ties(base[name], [d[name] for d in deltas], density, None, lambda_)
    assert np.count_nonzero(np.abs(per_tensor - expected[name]) > 1e-5) > 0.05 * per_tensor.size


def test_presets_differ_where_the_formulas_differ(odd_f32_family: Family, tmp_path: Path) -> None:
    fam = odd_f32_family
    outs = {}
    for preset in ("mergekit", "peft", "paper"):
        api_ties(fam.finetuned, fam.base, tmp_path / preset, density=0.5, weights=[2.0, 0.5], preset=preset)
        outs[preset] = load(tmp_path / preset)
    name = "model.layers.1.mlp.up_proj.weight"
    assert not np.array_equal(outs["mergekit"][name], outs["peft"][name])
    assert not np.array_equal(outs["mergekit"][name], outs["paper"][name])
    recipe = (tmp_path / "paper" / "umerge.yml").read_text()
    assert "paper" in recipe and "ties" in recipe
    config = json.loads((tmp_path / "paper" / "config.json").read_text())
    assert config["hidden_size"] == TINY_ODD.hidden
