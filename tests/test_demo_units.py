"""Fast unit tests of the demo's pieces that need no training: findings, rendering, update geometry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from umerge.demo.config import DemoConfig, config_for
from umerge.demo.pipeline import _findings
from umerge.demo.render import fmt

safetensors_numpy = pytest.importorskip("safetensors.numpy")


def _scores(tmp: Path, auc1: float, auc2: float, aucm: float, n: int = 100) -> dict[str, dict[str, object]]:
    """Demo scores whose evaluation reports (the MIA row counts) are written under tmp."""
    out = {}
    for name, auc, agg, reg in (("vanilla", 0.99, 0.3, 1.0), ("model1", auc1, 0.5, 0.0), ("model2", auc2, 0.6, 0.5),
                                ("merge-ties-factorwise", aucm, 0.7, 0.2)):
        rel = f"eval/{name}/report.json"
        (tmp / rel).parent.mkdir(parents=True)
        (tmp / rel).write_text(json.dumps({"mia": {"n_member": n, "n_nonmember": n}}))
        out[name] = {"mia_auc": auc, "aggregate": agg, "forget_regurgitation": reg, "report": rel}
    return out


def test_findings_come_from_the_criteria(tmp_path: Path) -> None:
    table2 = [{"method": "ties", "path": "factor-wise (PEFT semantics)", "aggregate": 0.7}]
    f = _findings(_scores(tmp_path / "a", 0.05, 0.90, 0.52), tmp_path / "a", table2)
    assert f["available"] and f["n_members"] == 100
    assert f["sentence"].startswith("The paper's pattern holds on every criterion (1 seed).")
    f = _findings(_scores(tmp_path / "b", 0.47, 0.52, 0.60, n=20), tmp_path / "b", table2)
    j = f["judgement"]
    assert not j["model1_over_forgets"] and not j["model2_under_forgets"]  # intervals straddle 0.5
    assert f["sentence"].startswith("The paper's pattern does not hold")
    assert _findings({"model1": {"mia_auc": None}}, tmp_path, [])["available"] is False


def test_fmt_and_config_round_trip() -> None:
    assert fmt(0.123456) == "0.1235" and fmt(None) == "n/a" and fmt(float("nan")) == "n/a"
    for quick in (True, False):
        cfg = config_for(quick, seed=3)
        assert DemoConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert config_for(False, given_model=True).max_new_tokens == 256


def _write_adapter(d: Path, rng: np.random.Generator, r: int, alpha: int) -> dict[str, np.ndarray]:
    d.mkdir(parents=True)
    tensors, deltas = {}, {}
    for mod, (out_f, in_f) in {"model.layers.0.self_attn.q_proj": (6, 5), "model.layers.0.mlp.up_proj": (7, 5)}.items():
        a = rng.standard_normal((r, in_f)).astype(np.float32)
        b = rng.standard_normal((out_f, r)).astype(np.float32)
        tensors[f"base_model.model.{mod}.lora_A.weight"] = a
        tensors[f"base_model.model.{mod}.lora_B.weight"] = b
        deltas[mod] = (alpha / r) * b.astype(np.float64) @ a.astype(np.float64)
    safetensors_numpy.save_file(tensors, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": alpha, "use_rslora": False}))
    return deltas


def test_update_geometry_against_concatenated_vectors(tmp_path: Path) -> None:
    from umerge.demo.merging import update_geometry

    rng = np.random.default_rng(0)
    d1 = _write_adapter(tmp_path / "a1", rng, 3, 6)
    d2 = _write_adapter(tmp_path / "a2", rng, 3, 6)
    dm = _write_adapter(tmp_path / "m", rng, 2, 5)
    flat = {k: np.concatenate([v[m].ravel() for m in sorted(v)]) for k, v in (("1", d1), ("2", d2), ("m", dm))}
    mean = (flat["1"] + flat["2"]) / 2

    def cos(x: np.ndarray, y: np.ndarray) -> float:
        return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))

    g = update_geometry([tmp_path / "a1", tmp_path / "a2"], tmp_path / "m")
    assert g["norm_model1"] == pytest.approx(np.linalg.norm(flat["1"]), rel=1e-12)
    assert g["norm_mean"] == pytest.approx(np.linalg.norm(mean), rel=1e-12)
    assert g["norm_merged"] == pytest.approx(np.linalg.norm(flat["m"]), rel=1e-12)
    assert g["cos_merged_mean"] == pytest.approx(cos(flat["m"], mean), rel=1e-12)
    assert g["cos_model1_model2"] == pytest.approx(cos(flat["1"], flat["2"]), rel=1e-12)
    assert g["cos_merged_model2"] == pytest.approx(cos(flat["m"], flat["2"]), rel=1e-12)
