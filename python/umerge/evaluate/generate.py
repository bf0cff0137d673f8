"""Batched greedy generation as the task's scorer does it, only faster.

The official scorer feeds each raw prompt (no chat template; the tokenizer's default special
tokens) to ``model.generate(do_sample=False, max_new_tokens=256, pad_token_id=eos)`` one row at a
time and decodes only the new tokens (``skip_special_tokens=True``; the tokenizer's own
clean-up setting is kept, since transformers 5 refuses clean-up on BPE tokenizers). Here rows are generated in
batches with *left* padding (so every prompt ends where generation starts, and the attention mask
hides the padding), sorted by prompt length first so a batch holds prompts of similar length and
little compute goes to padding; results come back in the input order.

A prompt longer than the model's context minus ``max_new_tokens`` is cut from the left (its end is
what the answer continues); the number of such prompts is returned in the stats.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from umerge.evaluate._torch import require_torch
from umerge.evaluate.batching import inference, pad_batch


def model_device(model: Any) -> Any:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def context_length(model: Any, default: int = 4096) -> int:
    """The model's maximum number of positions (``config.max_position_embeddings``), else ``default``."""
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "max_position_embeddings", None)
    return int(n) if n else default


def ensure_pad_token(tokenizer: Any) -> int:
    """Use eos as the pad token when the tokenizer has none (as the official scorer); return the pad id."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            from umerge.errors import InputError

            raise InputError("the tokenizer has neither a pad nor an eos token: cannot pad batches")
        tokenizer.pad_token = tokenizer.eos_token
    return int(tokenizer.pad_token_id)


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "generate",
) -> tuple[list[str], dict[str, Any]]:
    """Greedy continuations of ``prompts`` (only the new text), and stats.

    Stats: ``rows``, ``seconds``, ``rows_per_s``, ``new_tokens`` (generated, before eos),
    ``truncated_prompts``, ``batch_size``.
    """
    require_torch()  # a clear InputError when torch is missing, before transformers is imported
    from transformers import GenerationConfig

    if batch_size < 1 or max_new_tokens < 1:
        from umerge.errors import InputError

        raise InputError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    pad_id = ensure_pad_token(tokenizer)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id, eos_token_id=eos
    )
    budget = max(1, context_length(model) - max_new_tokens)
    encoded: list[list[int]] = []
    truncated = 0
    for p in prompts:
        ids = list(tokenizer(p)["input_ids"])
        if len(ids) > budget:
            ids = ids[-budget:]
            truncated += 1
        encoded.append(ids)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    device = model_device(model)
    outputs: list[str] = [""] * len(prompts)
    new_tokens = 0
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    with inference(model, total=len(prompts), desc=desc, unit="row", progress=progress) as advance:
        start = time.perf_counter()
        for idx in batches:
            input_ids, mask = pad_batch([encoded[i] for i in idx], pad_id, left=True)
            width = input_ids.shape[1]
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg
            )
            new = out[:, width:].tolist()
            for r, i in enumerate(idx):
                toks = new[r]
                # count tokens up to and including the first eos (the rest is padding)
                n_tok = next((j + 1 for j, t in enumerate(toks) if t in eos_ids), len(toks))
                new_tokens += n_tok
                outputs[i] = tokenizer.decode(toks[:n_tok], skip_special_tokens=True)
            advance(len(idx))
    seconds = time.perf_counter() - start
    stats = {
        "rows": len(prompts),
        "seconds": seconds,
        "rows_per_s": len(prompts) / seconds if seconds > 0 else None,
        "new_tokens": new_tokens,
        "truncated_prompts": truncated,
        "batch_size": batch_size,
    }
    return outputs, stats


def batched_matches_single(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    max_examples: int = 5,
) -> dict[str, Any]:
    """Whether batched generation gives the same texts as one prompt at a time, and where it does not.

    The scores are only the official scorer's if `generate` with ``batch_size`` produces what the
    scorer's one-row-at-a-time loop produces. In exact arithmetic left padding changes nothing (the
    mask hides it, positions start at each row's first real token), but a batch changes the shapes
    the kernels see, hence their reduction order; in bfloat16 on a GPU that rounding can flip a
    greedy argmax, and every token after it differs. This runs both (``batch_size`` and 1, greedy,
    same ``max_new_tokens``) and compares the decoded texts.

    Returns ``n``, ``n_equal``, ``all_equal``, ``batch_size``, ``max_new_tokens``, the seconds of
    each run, and ``mismatches``: the first ``max_examples`` differing prompts in input order, each
    ``{"index", "prompt", "batched", "single", "common_prefix_chars"}`` (how far the texts agree,
    so a late bf16 drift is told apart from a wrong batch).
    """
    batched, b_stats = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    single, s_stats = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=1)
    differing = [i for i, (b, s) in enumerate(zip(batched, single)) if b != s]
    mismatches = [
        {
            "index": i,
            "prompt": prompts[i],
            "batched": batched[i],
            "single": single[i],
            "common_prefix_chars": _common_prefix(batched[i], single[i]),
        }
        for i in differing[: max(0, max_examples)]
    ]
    return {
        "n": len(prompts),
        "n_equal": len(prompts) - len(differing),
        "all_equal": not differing,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "seconds_batched": b_stats["seconds"],
        "seconds_single": s_stats["seconds"],
        "truncated_prompts": b_stats["truncated_prompts"],
        "mismatches": mismatches,
    }


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix of ``a`` and ``b``."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)
