"""Shared fixtures for the adapter tests: tiny Llama/OLMo bases built from configs and random
PEFT LoRA adapters (init_lora_weights=False, so B is non-zero), saved as PEFT saves them."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_base(kind: str, seed: int = 0) -> "transformers.PreTrainedModel":
    """A tiny float32 causal LM of `kind` ("llama" or "olmo"), odd sizes so shapes differ per module."""
    common = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(seed)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.OlmoForCausalLM(transformers.OlmoConfig(**common))
    return model.to(torch.float32).eval()


def save_base(kind: str, out: Path) -> Path:
    build_base(kind).save_pretrained(str(out))
    return out


def make_adapter(base_dir: Path, out: Path, r: int, alpha: float, seed: int, use_rslora: bool = False,
                 targets: list[str] | None = None, dtype: "torch.dtype | None" = None) -> Path:
    """A random LoRA adapter on every linear layer (or `targets`), saved with save_pretrained."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), torch_dtype=torch.float32)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets or ALL_LINEAR, init_lora_weights=False,
                          use_rslora=use_rslora, lora_dropout=0.0)
    torch.manual_seed(seed)
    pm = peft.get_peft_model(model, cfg)
    with torch.no_grad():  # larger B so merged updates are visible next to the base weights
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.mul_(3.0)
    if dtype is not None:
        pm = pm.to(dtype)
    pm.save_pretrained(str(out))
    return out


def peft_model(base_dir: Path, adapters: dict[str, Path]) -> "peft.PeftModel":
    """The base with every adapter loaded under its name (first one active)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), torch_dtype=torch.float32)
    names = list(adapters)
    pm = peft.PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(str(adapters[n]), adapter_name=n)
    return pm.eval()


def peft_adapter_state(pm: "peft.PeftModel", name: str) -> dict[str, "torch.Tensor"]:
    """The adapter `name`'s tensors under the names PEFT saves them with."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(pm, adapter_name=name).items()}
