"""Tiny, locally built models and tokenizers for tests, the demo and CPU experiments.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained with the `tokenizers`
library on the texts you give it, and the model is an OLMo (`transformers.OlmoConfig`, the
architecture of the paper's OLMo-7B-0724-Instruct and OLMo-1B-0724) with random weights small
enough to train on a laptop CPU in seconds. These builders are shared by the trainer, the evaluation
and the demo, so their signatures are kept stable.

This module is not a model zoo: it knows one architecture and one tokenizer recipe. It needs the
`train` extra (torch, transformers, tokenizers): `pip install "umerge[train]"`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from umerge.errors import InputError

if TYPE_CHECKING:  # imported lazily at call time so `import umerge.unlearn.tiny` stays cheap
    import transformers

#: The single special token: end of text, also used as beginning of text and as padding
#: (pad = eos, as the SemEval-2025 Task 4 reference code and the evaluation do).
EOS_TOKEN = "<|endoftext|>"

#: Smallest vocabulary a byte-level BPE can have: 256 byte symbols plus the special token.
MIN_VOCAB_SIZE = 257


def train_byte_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 512,
    save_dir: str | Path | None = None,
) -> "transformers.PreTrainedTokenizerFast":
    """Train a byte-level BPE tokenizer (GPT-2 / OLMo style) on `texts` and wrap it for transformers.

    The pre-tokenizer maps every byte to a printable symbol (GPT-2's byte-to-unicode table), so any
    string is encodable without an unknown token; BPE then learns `vocab_size - 257` merges on top of
    the 256 byte symbols and the one special token `<|endoftext|>` (id 0), which serves as eos, bos
    and pad. No token is added automatically when encoding (like the OLMo tokenizer): callers append
    eos where they want it. Training is deterministic for the same texts and vocab size.

    Returns a `transformers.PreTrainedTokenizerFast`; when `save_dir` is given it is also written
    there with `save_pretrained` (tokenizer.json, tokenizer_config.json, special_tokens_map.json).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB_SIZE:
        raise InputError(
            f"vocab_size {vocab_size} is too small for a byte-level BPE (needs >= {MIN_VOCAB_SIZE}: 256 bytes + eos)"
        )
    corpus = [t for t in texts if t]
    if not corpus:
        raise InputError("cannot train a tokenizer on no text (all texts were empty)")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=None,
        model_max_length=1 << 20,
    )
    wrapped.padding_side = "right"
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        wrapped.save_pretrained(str(save_dir))
    return wrapped


def build_tiny_olmo(
    tokenizer: "transformers.PreTrainedTokenizerBase",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 192,
    max_position_embeddings: int = 512,
    seed: int = 0,
) -> "transformers.OlmoForCausalLM":
    """Build a randomly initialised OLMo causal LM sized to `tokenizer`, in float32.

    The vocabulary size is `len(tokenizer)`; eos/bos/pad ids come from the tokenizer. Untied input and
    output embeddings (as OLMo-7B), SwiGLU MLP, RoPE, non-parametric layer norm: the OLMo recipe at toy
    scale. With the defaults and a 512-token vocabulary it has about 172 thousand parameters
    (2 x 512 x 64 embeddings + 2 layers x (4 x 64^2 attention + 3 x 64 x 192 MLP)). `seed` fixes the
    initial weights (torch's global generator is seeded, then restored).
    """
    import torch
    from transformers import OlmoConfig, OlmoForCausalLM

    if hidden_size % num_heads:
        raise InputError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    config = OlmoConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad,
        bos_token_id=bos,
        eos_token_id=eos,
        tie_word_embeddings=False,
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = OlmoForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)
    model.to(torch.float32)
    model.generation_config.pad_token_id = pad
    model.generation_config.eos_token_id = eos
    model.generation_config.bos_token_id = bos
    return model


def save_model(
    model: "transformers.PreTrainedModel",
    tokenizer: "transformers.PreTrainedTokenizerBase | None",
    out_dir: str | Path,
) -> Path:
    """Save `model` (float32 safetensors, config, generation config) and `tokenizer` into `out_dir`.

    The result loads with `AutoModelForCausalLM.from_pretrained(out_dir)` and
    `AutoTokenizer.from_pretrained(out_dir)`, and is a valid input to the merge engine. The model is
    converted to float32 in place (a no-op for the tiny models). Returns the directory.
    """
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float32)
    # safetensors is the default (and, from transformers 5, the only) format of save_pretrained.
    model.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    if not any(out.glob("*.safetensors")):
        raise RuntimeError(f"save_pretrained wrote no safetensors file in {out}")
    return out


__all__ = ["EOS_TOKEN", "train_byte_bpe_tokenizer", "build_tiny_olmo", "save_model"]
