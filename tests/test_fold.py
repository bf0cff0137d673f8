"""`umerge fold` against PEFT's merge_and_unload, and `--delta full --base` against PEFT's own
merge-utility functions applied to the full updates.

Tiny Llama and OLMo bases built from configs, random LoRA adapters on all linear layers
(r != lora_alpha, one with rslora), float32: the folded state dict must equal merge_and_unload's
to 1e-5 relative per tensor, and the folded checkpoint must load with AutoModelForCausalLM and
give the PEFT-merged model's logits to 1e-4.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from adapters_support import ALL_LINEAR, make_adapter, peft_model, save_base, torch, transformers
from umerge.safetensors_io import checkpoint_dtypes, load_checkpoint

RTOL = 1e-5


@pytest.fixture(scope="module", params=["llama", "olmo"])
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp(f"fold-{request.param}")
    base = save_base(request.param, root / "base")
    return {
        "base": base,
        "a": make_adapter(base, root / "a", r=8, alpha=16, seed=11),
        "b": make_adapter(base, root / "b", r=8, alpha=6, seed=12, use_rslora=True),
    }


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _peft_merged(family: dict[str, Path], name: str) -> "torch.nn.Module":
    return peft_model(family["base"], {name: family[name]}).merge_and_unload().eval()


@pytest.mark.peft
def test_fold_matches_merge_and_unload(family: dict[str, Path], tmp_path: Path) -> None:
    import umerge

    out = tmp_path / "folded"
    report = umerge.fold(family["a"], base=family["base"], out=out, progress=False)
    assert report.tensors > 0
    ours = load_checkpoint(out)
    ref = {k: v.detach().numpy() for k, v in _peft_merged(family, "a").state_dict().items()}
    base = load_checkpoint(family["base"])
    assert set(ours) == set(base)
    changed = 0
    for k, v in ours.items():
        assert v.shape == ref[k].shape, k
        assert _rel(v, ref[k]) <= RTOL, (k, _rel(v, ref[k]))
        changed += int(not np.array_equal(v, base[k]))
    assert changed == 2 * len(ALL_LINEAR)  # every targeted module, and nothing else
    assert (out / "config.json").is_file() and (out / "umerge.yml").is_file()


@pytest.mark.peft
def test_folded_model_loads_and_gives_peft_logits(family: dict[str, Path], tmp_path: Path) -> None:
    import umerge

    out = tmp_path / "folded"
    umerge.fold(family["b"], base=family["base"], out=out, progress=False)
    ours = transformers.AutoModelForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    ref = _peft_merged(family, "b")
    ids = (torch.arange(24).reshape(2, 12) * 7) % 96
    with torch.no_grad():
        lo, lr = ours(ids).logits, ref(ids).logits
    assert torch.allclose(lo, lr, rtol=1e-4, atol=1e-4 * float(lr.abs().max()))


def test_fold_to_bf16_rounds_once(family: dict[str, Path], tmp_path: Path) -> None:
    """--out-dtype bf16: each output is the float64 W + s B A rounded to the nearest bf16 (within 1 ulp)."""
    import umerge
    from umerge.adapters.lora import load_adapter

    out = tmp_path / "bf16"
    umerge.fold(family["a"], base=family["base"], out=out, out_dtype="bf16", progress=False)
    assert set(checkpoint_dtypes(out).values()) == {"BF16"}
    ours, base = load_checkpoint(out), load_checkpoint(family["base"])
    ad = load_adapter(family["a"])
    for mod, f in ad.modules.items():
        name = mod.removeprefix("base_model.model.") + ".weight"
        exact = base[name].astype(np.float64) + ad.config.scaling * (f.b.astype(np.float64) @ f.a)
        ulp = np.abs(exact) * 2.0**-7 + 1e-30
        assert np.all(np.abs(ours[name] - exact) <= ulp), name


@pytest.mark.peft
@pytest.mark.parametrize("density, majority", [(0.8, "total"), (0.4, "frequency")])
def test_delta_full_ties_with_base_equals_peft_ties_on_updates(family: dict[str, Path], tmp_path: Path, density: float, majority: str) -> None:
    """out = W + peft.utils.merge_utils.ties([s_a B_a A_a, s_b B_b A_b], w, density) per module."""
    from peft.utils.merge_utils import ties

    from umerge.adapters import merge_adapters
    from umerge.adapters.lora import load_adapter

    weights = [1.0, 0.6]
    out = tmp_path / "full"
    merge_adapters([family["a"], family["b"]], out, method="ties", delta="full", base=family["base"], weights=weights,
                   density=density, majority_sign=majority)
    ours, base = load_checkpoint(out), load_checkpoint(family["base"])
    a, b = load_adapter(family["a"]), load_adapter(family["b"])
    for mod in a.modules:
        name = mod.removeprefix("base_model.model.") + ".weight"
        deltas = [torch.from_numpy(x.config.scaling * (x.modules[mod].b @ x.modules[mod].a)) for x in (a, b)]
        merged = ties(deltas, torch.tensor(weights), density, majority).numpy()
        ref = base[name] + merged
        assert _rel(ours[name], ref) <= RTOL, (name, _rel(ours[name], ref))


def test_delta_full_linear_with_base_is_the_weighted_sum(family: dict[str, Path], tmp_path: Path) -> None:
    from umerge.adapters import merge_adapters
    from umerge.adapters.lora import load_adapter

    out = tmp_path / "lin"
    merge_adapters([family["a"], family["b"]], out, method="linear", delta="full", base=family["base"], weights=[0.5, -1.5])
    ours, base = load_checkpoint(out), load_checkpoint(family["base"])
    a, b = load_adapter(family["a"]), load_adapter(family["b"])
    for mod in a.modules:
        name = mod.removeprefix("base_model.model.") + ".weight"
        ref = (base[name].astype(np.float64) + 0.5 * a.config.scaling * (a.modules[mod].b.astype(np.float64) @ a.modules[mod].a)
               - 1.5 * b.config.scaling * (b.modules[mod].b.astype(np.float64) @ b.modules[mod].a))
        assert _rel(ours[name], ref) <= RTOL


@pytest.mark.peft
def test_fold_fan_in_fan_out_gpt2(tmp_path: Path) -> None:
    """GPT-2 stores Conv1D weights [in, out]; PEFT folds (B @ A)^T there (fan_in_fan_out)."""
    import peft

    import umerge

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=24, n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(str(tmp_path / "base"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    lcfg = peft.LoraConfig(r=4, lora_alpha=10, target_modules=["c_attn", "c_fc", "c_proj"], fan_in_fan_out=True,
                           init_lora_weights=False)
    pm = peft.get_peft_model(model, lcfg)
    pm.save_pretrained(str(tmp_path / "ad"))
    ref = {k: v.detach().numpy() for k, v in pm.merge_and_unload().state_dict().items()}
    umerge.fold(tmp_path / "ad", base=tmp_path / "base", out=tmp_path / "out", progress=False)
    ours = load_checkpoint(tmp_path / "out")
    for k, v in ours.items():
        assert _rel(v, ref[k]) <= RTOL, k
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "gpt2"


@pytest.mark.peft
def test_factorwise_ties_with_base_is_peft_add_weighted_adapter_then_merge_and_unload(family: dict[str, Path], tmp_path: Path) -> None:
    """The ZJUKLAB pipeline: add_weighted_adapter(ties, density 0.8, weights [1, 1]) + merge_and_unload."""
    from umerge.adapters import merge_adapters

    out = tmp_path / "paper"
    merge_adapters([family["a"], family["b"]], out, method="ties", density=0.8, base=family["base"])
    pm = peft_model(family["base"], {"a": family["a"], "b": family["b"]})
    pm.add_weighted_adapter(["a", "b"], [1.0, 1.0], "m", combination_type="ties", density=0.8)
    pm.set_adapter("m")
    ref = {k: v.detach().numpy() for k, v in pm.merge_and_unload().state_dict().items()}
    ours = load_checkpoint(out)
    for k, v in ours.items():
        assert _rel(v, ref[k]) <= RTOL, k
    assert not any(p.name.startswith(".umerge") for p in tmp_path.iterdir())
