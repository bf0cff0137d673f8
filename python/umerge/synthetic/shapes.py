"""Llama-family model shapes: the tensor names and shapes of a checkpoint, and its config.json.

The names follow Hugging Face `LlamaForCausalLM` (what mergekit's Llama architecture definition and
`transformers` expect): `model.embed_tokens.weight` [vocab, hidden], per layer the attention
projections (q/o: [hidden, hidden]; k/v: [kv_heads * head_dim, hidden]), the MLP (gate/up:
[intermediate, hidden]; down: [hidden, intermediate]), two 1-D RMS-norm weights [hidden], then the
final `model.norm.weight` [hidden] and `lm_head.weight` [vocab, hidden] (embeddings not tied).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class LlamaShape:
    """The sizes that fix every tensor shape of a Llama model."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden size {self.hidden} is not a multiple of {self.heads} heads")
        if self.heads % self.kv_heads:
            raise ValueError(f"{self.heads} heads is not a multiple of {self.kv_heads} kv heads")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def with_layers(self, layers: int) -> LlamaShape:
        """The same model with another number of decoder layers."""
        return replace(self, layers=layers)

    def n_params(self) -> int:
        """Number of scalar parameters (elements over all tensors)."""
        total = 0
        for _, shape in llama_tensors(self):
            n = 1
            for s in shape:
                n *= s
            total += n
        return total


#: TinyLlama-1.1B (TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T config): 1,100,048,384 parameters.
TINYLLAMA = LlamaShape(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000)

#: A small model for fast tests (a few hundred thousand parameters).
TINY = LlamaShape(hidden=64, intermediate=176, layers=2, heads=4, kv_heads=2, vocab=256)

#: A small model with awkward sizes (odd intermediate and vocab, head_dim 14), for chunking edge cases.
TINY_ODD = LlamaShape(hidden=42, intermediate=97, layers=3, heads=3, kv_heads=1, vocab=131)


def llama_tensors(shape: LlamaShape) -> list[tuple[str, tuple[int, ...]]]:
    """Every (name, shape) of a `LlamaForCausalLM` checkpoint, in the order models are usually saved."""
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab, h))]
    for layer in range(shape.layers):
        p = f"model.layers.{layer}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (shape.vocab, h))]
    return out


_TORCH_DTYPE = {"float32": "float32", "f32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
                "f16": "float16", "float16": "float16", "f64": "float64", "float64": "float64"}


def llama_config(shape: LlamaShape, dtype: str = "float32") -> dict[str, Any]:
    """A `config.json` for the shape, loadable by `transformers.LlamaConfig` (and so by mergekit)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "vocab_size": shape.vocab,
        "max_position_embeddings": 2048,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "use_cache": True,
        "torch_dtype": _TORCH_DTYPE[dtype],
    }
