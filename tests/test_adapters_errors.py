"""Bad adapter inputs: one line `umerge: error: ...` on stderr, exit 2, and no output directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from adapters_support import make_adapter, save_base
from umerge.cli import main


@pytest.fixture(scope="module")
def fam(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapter-errors")
    base = save_base("llama", root / "base")
    other = root / "other"
    import transformers

    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).save_pretrained(str(other))
    no_cfg = root / "no_cfg"
    shutil.copytree(make_adapter(base, root / "tmp", r=4, alpha=8, seed=5), no_cfg)
    (no_cfg / "adapter_config.json").unlink()
    return {
        "base": base,
        "other_base": other,
        "r4": make_adapter(base, root / "r4", r=4, alpha=8, seed=1),
        "r8": make_adapter(base, root / "r8", r=8, alpha=8, seed=2),
        "attn": make_adapter(base, root / "attn", r=4, alpha=8, seed=3, targets=["q_proj", "v_proj"]),
        "no_cfg": no_cfg,
    }


def _fails(capsys: pytest.CaptureFixture[str], args: list[str], out: Path, *needles: str) -> str:
    with pytest.raises(SystemExit) as e:
        main(args + ["-o", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("umerge: error: ") and "\n" not in err, err
    for n in needles:
        assert n in err, err
    assert not out.exists()
    assert not any(p.name.startswith(".umerge-tmp") for p in out.parent.iterdir())
    return err


def test_different_ranks_for_factorwise(fam: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(capsys, ["merge-adapters", str(fam["r4"]), str(fam["r8"]), "--method", "ties", "--density", "0.8"],
           tmp_path / "o", "same rank", "r=4", "r=8")


def test_different_ranks_are_fine_for_cat(fam: dict[str, Path], tmp_path: Path) -> None:
    assert main(["merge-adapters", str(fam["r4"]), str(fam["r8"]), "--method", "cat", "-q", "-o", str(tmp_path / "o")]) is None
    assert (tmp_path / "o" / "adapter_model.safetensors").is_file()


def test_different_target_modules(fam: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(capsys, ["merge-adapters", str(fam["r4"]), str(fam["attn"]), "--method", "linear"], tmp_path / "o",
           "different modules")


def test_missing_adapter_config(fam: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(capsys, ["merge-adapters", str(fam["r4"]), str(fam["no_cfg"]), "--density", "0.5"], tmp_path / "o",
           "adapter_config.json")


def test_missing_density_for_ties(fam: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(capsys, ["merge-adapters", str(fam["r4"]), str(fam["r4"])], tmp_path / "o", "density")


def test_fold_shapes_do_not_fit_base(fam: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(capsys, ["fold", str(fam["r4"]), "--base", str(fam["other_base"]), "-q"], tmp_path / "o",
           "does not fit this base")


def test_fold_missing_config(fam: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(capsys, ["fold", str(fam["no_cfg"]), "--base", str(fam["base"]), "-q"], tmp_path / "o", "adapter_config.json")


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"density": 0.5, "seed": -1}, "invalid parameter seed: -1 is not a non-negative integer"),
    ({"density": 1.5}, "density 1.5 is outside (0, 1]"),
])
def test_adapter_parameters_are_checked_where_adapters_are_merged(fam: dict[str, Path], tmp_path: Path,
                                                                  kwargs: dict[str, float], needle: str) -> None:
    # the engine checks these for full models; adapter merges run in umerge.adapters, which checks them itself
    import umerge
    from umerge.errors import InputError

    out = tmp_path / "o"
    with pytest.raises(InputError) as exc:
        umerge.dare_ties([fam["r4"], fam["r4"]], out=out, progress=False, **kwargs)
    assert needle in str(exc.value), exc.value
    assert not out.exists()
