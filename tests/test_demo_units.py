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


def _scores(auc1: float, auc2: float, aucm: float) -> dict[str, dict[str, float]]:
    base = {"task_aggregate": 0.5, "mia_score": 0.5, "mmlu": 0.5, "aggregate": 0.5, "retain_knowledge": 0.9}
    return {"vanilla": {**base, "mia_auc": 1.0}, "model1": {**base, "mia_auc": auc1},
            "model2": {**base, "mia_auc": auc2}, "merge-ties-factorwise": {**base, "mia_auc": aucm}}


def test_findings_follow_the_thresholds() -> None:
    f = _findings(_scores(0.30, 0.90, 0.60))
    assert f["model1_over_forgets"] and f["model2_under_forgets"] and f["merge_between"]
    assert f["merge_closer_to_half_than_both"]  # |0.6-0.5| < min(0.2, 0.4)
    assert "appears" in f["explanation"]
    f = _findings(_scores(0.47, 0.52, 0.60))
    assert not f["model1_over_forgets"] and not f["model2_under_forgets"] and not f["merge_between"]
    assert "does not fully appear" in f["explanation"] and "model1 does not over-forget" in f["explanation"]
    assert _findings({"model1": {"mia_auc": None}})["available"] is False


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
