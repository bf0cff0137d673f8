"""`umerge ties` / `umerge.ties` / `umerge merge-adapters` on PEFT adapter directories: routed to
PEFT's add_weighted_adapter semantics, full-model inputs untouched, mixes refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from adapters_support import make_adapter, peft_adapter_state, peft_model, save_base
from umerge.cli import main
from umerge.safetensors_io import load_checkpoint


@pytest.fixture(scope="module")
def fam(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters-cli")
    base = save_base("olmo", root / "base")
    return {"base": base, "a": make_adapter(base, root / "a", r=4, alpha=12, seed=21),
            "b": make_adapter(base, root / "b", r=4, alpha=3, seed=22)}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.peft
def test_umerge_ties_on_adapters_is_peft_add_weighted_adapter(fam: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ab"
    assert main(["ties", str(fam["a"]), str(fam["b"]), "--density", "0.8", "--weight", "1", "--weight", "0.5",
                 "-q", "-o", str(out)]) is None
    pm = peft_model(fam["base"], {"a": fam["a"], "b": fam["b"]})
    pm.add_weighted_adapter(["a", "b"], [1.0, 0.5], "m", combination_type="ties", density=0.8)
    ref = {k: v.numpy() for k, v in peft_adapter_state(pm, "m").items()}
    ours = load_checkpoint(out / "adapter_model.safetensors")
    assert set(ours) == set(ref)
    for k in ref:
        assert _rel(ours[k], ref[k]) <= 1e-5, k


def test_python_ties_on_adapters_returns_an_adapter(fam: dict[str, Path], tmp_path: Path) -> None:
    import umerge

    report = umerge.ties([fam["a"], fam["b"]], density=0.5, majority_sign="frequency", out=tmp_path / "o", progress=False)
    assert report.rank == 4 and report.combination == "ties"
    assert (tmp_path / "o" / "adapter_config.json").is_file()


@pytest.mark.peft
def test_umerge_ties_on_adapters_with_base_writes_a_folded_model(fam: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "model"
    assert main(["ties", str(fam["a"]), str(fam["b"]), "--density", "0.8", "--base", str(fam["base"]), "-q", "-o", str(out)]) is None
    pm = peft_model(fam["base"], {"a": fam["a"], "b": fam["b"]})
    pm.add_weighted_adapter(["a", "b"], [1.0, 1.0], "m", combination_type="ties", density=0.8)
    pm.set_adapter("m")
    ref = {k: v.detach().numpy() for k, v in pm.merge_and_unload().state_dict().items()}
    for k, v in load_checkpoint(out).items():
        assert _rel(v, ref[k]) <= 1e-5, k


@pytest.mark.parametrize("extra, needle", [
    (["--preset", "mergekit"], "no factor-wise form"),
    (["--lambda", "0.5"], "lambda"),
])
def test_adapter_only_refusals(fam: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], needle: str) -> None:
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:
        main(["ties", str(fam["a"]), str(fam["b"]), "--density", "0.8", *extra, "-o", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("umerge: error:") and needle in err and "\n" not in err
    assert not out.exists()


def test_mixing_adapters_and_full_models_is_refused(fam: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:
        main(["ties", str(fam["a"]), str(fam["base"]), "--base", str(fam["base"]), "--density", "0.8", "-o", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "cannot mix LoRA adapters" in err and "\n" not in err
    assert not out.exists()


def test_delta_options_are_refused_for_full_models(fam: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["ties", str(fam["base"]), "--base", str(fam["base"]), "--density", "0.8", "--delta", "full", "-o", str(tmp_path / "o")])
    assert e.value.code == 2
    assert "adapter inputs only" in capsys.readouterr().err


def test_umerge_fold_cli(fam: dict[str, Path], tmp_path: Path) -> None:
    from umerge.safetensors_io import checkpoint_dtypes

    out = tmp_path / "folded"
    assert main(["fold", str(fam["a"]), "--base", str(fam["base"]), "--out-dtype", "bf16", "--memory-budget", "64MiB",
                 "--threads", "1", "-q", "-o", str(out)]) is None
    assert set(checkpoint_dtypes(out).values()) == {"BF16"}
    assert '"bfloat16"' in (out / "config.json").read_text()


def test_umerge_linear_on_adapters_normalizes_weights(fam: dict[str, Path], tmp_path: Path) -> None:
    """umerge.linear (normalize=True by default) on adapters = PEFT linear with weights / sum(weights)."""
    import umerge
    from umerge.adapters import merge_adapters

    umerge.linear([fam["a"], fam["b"]], weights=[1.0, 3.0], out=tmp_path / "lin", progress=False)
    merge_adapters([fam["a"], fam["b"]], tmp_path / "ref", method="linear", weights=[0.25, 0.75])
    ours, ref = load_checkpoint(tmp_path / "lin"), load_checkpoint(tmp_path / "ref")
    assert ours.keys() == ref.keys() and all(np.array_equal(ours[k], ref[k]) for k in ref)


@pytest.mark.peft
def test_umerge_magnitude_prune_on_adapters_is_peft_add_weighted_adapter(fam: dict[str, Path], tmp_path: Path) -> None:
    """The method commands route adapter inputs too (no --base needed), with PEFT's semantics."""
    out = tmp_path / "mp"
    assert main(["magnitude_prune", str(fam["a"]), str(fam["b"]), "--density", "0.6", "-q", "-o", str(out)]) is None
    pm = peft_model(fam["base"], {"a": fam["a"], "b": fam["b"]})
    pm.add_weighted_adapter(["a", "b"], [1.0, 1.0], "m", combination_type="magnitude_prune", density=0.6)
    ref = {k: v.numpy() for k, v in peft_adapter_state(pm, "m").items()}
    ours = load_checkpoint(out / "adapter_model.safetensors")
    assert set(ours) == set(ref)
    for k in ref:
        assert _rel(ours[k], ref[k]) <= 1e-5, k
