"""Parity with mergekit: the same YAML through `mergekit-yaml`'s engine and `umerge run`.

Every deterministic method umerge shares with mergekit (linear, task_arithmetic, ties,
breadcrumbs with gamma 0 = magnitude_prune, breadcrumbs and breadcrumbs_ties with outliers
dropped, slerp, model_stock) on float32 Llama-shaped
checkpoints (odd sizes, 1-D norms, 3 shards), including configs with a filter list, with gradients
(plain and inside filter rules) and with slices. All configs run in one peer-venv process
(mergekit's `run_merge`, what `mergekit-yaml` calls) so torch is imported once.

Agreement required: at least 99.9% of the elements of every tensor within 1 float32 ulp of
mergekit's value (magnitude ties at the trim threshold may be broken differently: mergekit uses
argsort order); slerp and model_stock compute their per-tensor coefficients in float64 where
mergekit uses float32, so they are held to 8 ulp of the output's scale instead.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import Family, run_umerge
from umerge.safetensors_io import load_checkpoint

RUNNER = textwrap.dedent("""
    import json, sys, yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    opts = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, cuda=False)
    for cfg, out in json.loads(sys.argv[1]):
        with open(cfg) as f:
            run_merge(MergeConfiguration.model_validate(yaml.safe_load(f)), out, opts)
""")


def _configs(fam: Family) -> dict[str, str]:
    b, (a, c) = fam.base, fam.finetuned
    return {
        "linear": f"""
            merge_method: linear
            models:
              - model: {a}
                parameters: {{weight: 0.3}}
              - model: {c}
                parameters: {{weight: 0.9}}
            dtype: float32
        """,
        "linear_filter": f"""
            merge_method: linear
            models:
              - model: {a}
                parameters:
                  weight:
                    - filter: mlp
                      value: 0.2
                    - value: 0.8
              - model: {c}
                parameters: {{weight: 0.5}}
            parameters:
              normalize: true
            dtype: float32
        """,
        "task_arithmetic": f"""
            merge_method: task_arithmetic
            base_model: {b}
            models:
              - model: {a}
                parameters: {{weight: 0.7}}
              - model: {c}
                parameters: {{weight: 0.4}}
            parameters:
              lambda: 0.8
            dtype: float32
        """,
        "ties_gradient": f"""
            merge_method: ties
            base_model: {b}
            models:
              - model: {a}
                parameters: {{weight: 1.0, density: [0.3, 0.9]}}
              - model: {c}
                parameters: {{weight: 0.5, density: 0.7}}
            parameters:
              lambda: [1.0, 0.6]
            dtype: float32
        """,
        "breadcrumbs_gamma0": f"""
            merge_method: breadcrumbs
            base_model: {b}
            models:
              - model: {a}
                parameters: {{weight: 1.0}}
              - model: {c}
                parameters: {{weight: 0.6}}
            parameters:
              density: 0.5
              gamma: 0.0
            dtype: float32
        """,
        "breadcrumbs_outliers": f"""
            merge_method: breadcrumbs
            base_model: {b}
            models:
              - model: {a}
                parameters: {{weight: 1.0, gamma: 0.05}}
              - model: {c}
                parameters: {{weight: 0.6, gamma: [0.2, 0.01]}}
            parameters:
              density: 0.6
            dtype: float32
        """,
        "breadcrumbs_ties_filter": f"""
            merge_method: breadcrumbs_ties
            base_model: {b}
            models:
              - model: {a}
                parameters: {{weight: 1.0}}
              - model: {c}
                parameters: {{weight: 0.8}}
            parameters:
              density:
                - filter: mlp
                  value: 0.3
                - value: 0.7
              gamma: 0.1
              normalize: true
            dtype: float32
        """,
        "slerp_filter_gradient": f"""
            merge_method: slerp
            base_model: {b}
            models:
              - model: {b}
              - model: {a}
            parameters:
              t:
                - filter: self_attn
                  value: [0.0, 0.5, 1.0]
                - filter: mlp
                  value: [1.0, 0.5, 0.0]
                - value: 0.4
            dtype: float32
        """,
        "model_stock": f"""
            merge_method: model_stock
            base_model: {b}
            models:
              - model: {a}
              - model: {c}
            dtype: float32
        """,
        "task_arithmetic_slices": f"""
            merge_method: task_arithmetic
            base_model: {b}
            slices:
              - sources:
                  - model: {b}
                    layer_range: [0, 2]
                  - model: {a}
                    layer_range: [0, 2]
                    parameters: {{weight: 0.5}}
                  - model: {c}
                    layer_range: [0, 2]
                    parameters: {{weight: 1.5}}
              - sources:
                  - model: {b}
                    layer_range: [2, 3]
                  - model: {a}
                    layer_range: [2, 3]
                    parameters: {{weight: [0.1, 0.9]}}
                  - model: {c}
                    layer_range: [2, 3]
                    parameters: {{weight: 1.0}}
                parameters:
                  lambda: 0.5
            dtype: float32
        """,
    }


@pytest.fixture(scope="module")
def mergekit_outputs(peers: Path, odd_f32_family: Family, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mk_parity")
    jobs = []
    for name, text in _configs(odd_f32_family).items():
        cfg = root / f"{name}.yml"
        cfg.write_text(textwrap.dedent(text))
        jobs.append((str(cfg), str(root / f"mk_{name}")))
    proc = subprocess.run([str(peers / "bin" / "python"), "-c", RUNNER, json.dumps(jobs)], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"mergekit failed:\n{proc.stderr[-3000:]}"
    return {Path(c).stem: Path(o) for c, o in jobs}


CASES = ["linear", "linear_filter", "task_arithmetic", "ties_gradient", "breadcrumbs_gamma0",
         "breadcrumbs_outliers", "breadcrumbs_ties_filter",
         "slerp_filter_gradient", "model_stock", "task_arithmetic_slices"]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_umerge_run_matches_mergekit(case: str, mergekit_outputs: dict[str, Path], tmp_path: Path) -> None:
    theirs_dir = mergekit_outputs[case]
    cfg = theirs_dir.parent / f"{case}.yml"
    result = run_umerge(["run", cfg, "-o", tmp_path / "out", "--quiet"])
    assert result.returncode == 0, result.stderr
    ours, theirs = load_checkpoint(tmp_path / "out"), load_checkpoint(theirs_dir)
    assert set(ours) == set(theirs)
    coefficient_method = case.startswith(("slerp", "model_stock"))
    report = []
    for name in theirs:
        a, b = ours[name], theirs[name]
        assert a.shape == b.shape and a.dtype == b.dtype == np.float32, name
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        if coefficient_method:
            ok = diff <= 8 * np.spacing(np.float32(np.abs(b).max()))
            assert ok.all(), f"{case} {name}: {int((~ok).sum())} elements off by more than 8 ulp of the scale"
        else:
            ok = diff <= np.spacing(np.abs(b))
            assert ok.mean() >= 0.999, f"{case} {name}: only {ok.mean():.4%} within 1 ulp"
        report.append(int(np.count_nonzero(a.view(np.uint32) == b.view(np.uint32))) / a.size)
    print(f"\n{case}: bit-identical fraction, worst tensor {min(report):.5f}, mean {np.mean(report):.5f}")
    # The merge must actually have changed something (a copy of the base would not test the method).
    base = load_checkpoint(_base_of(cfg))
    assert any(not np.array_equal(ours[n], base[n]) for n in base)


def _base_of(cfg: Path) -> Path:
    import yaml

    c = yaml.safe_load(cfg.read_text())
    if c.get("base_model"):
        return Path(c["base_model"])
    return Path(c["models"][0]["model"])
