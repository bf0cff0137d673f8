"""The loss of one unlearning step, as a public function: what the trainer computes for a batch.

    step_terms(model, reference, forget_rows, retain_rows, tokenizer, config)
        -> {"npo", "kl", "gdr", "total", "forget_nll", "forget_nll_ref", "tokens"}

`forget_rows` and `retain_rows` are rows with `input` and `output` (LUME's jsonl rows as dicts, or
`umerge.unlearn.data.Row`), one retain row per forget row; `config` is a preset name, an
`UnlearnConfig` or a dict of config values. The rows are tokenised as the reference trainer did
(`umerge.unlearn.tokenize.encode_example`), and:

    total = npo_weight * NPO(forget) + kl_weight * KL(p_ref || p_theta)(retain) + retain_weight * NLL(retain)

with the formulas and reductions of `umerge.unlearn.losses` (NPO on the batch-mean token NLL, KL with
`config.kl_reduction`, the retain NLL as the Hugging Face causal-LM loss).

The reference model: `reference=None` means `model` with its LoRA adapter switched off (a PEFT model,
possibly inside a distributed wrapper), so no second copy of the weights is held; or pass any causal
LM (a frozen copy of the starting model, as the reference code held). Either way its logits are taken
in eval mode under no_grad, as the reference code's separately loaded, eval-mode copy gave them: with
dropout in the model, a reference in train mode would not be the starting model. `model` itself runs
in whatever mode the caller left it (train mode in the trainer); its modes are restored on return.

Forget and retain rows go through the model in one forward pass (then split): right padding and causal
attention make each half's logits those it would have alone, and distributed wrappers see one forward
per backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from umerge.errors import InputError
from umerge.unlearn.losses import answer_nll, gdr_loss, kl_to_reference, npo_from_nll, total_loss
from umerge.unlearn.presets import UnlearnConfig, resolve_config
from umerge.unlearn.tokenize import collate, encode_example


def _prompt_and_answer(row: Any) -> tuple[str, str]:
    """(input, output) of a Row or a dict row."""
    if isinstance(row, Mapping):
        try:
            return str(row["input"]), str(row["output"])
        except KeyError as exc:
            raise InputError(f"a row needs 'input' and 'output' (missing {exc.args[0]!r})") from None
    return str(row.input), str(row.output)


def _config(config: str | Path | UnlearnConfig | Mapping[str, Any]) -> UnlearnConfig:
    return config if isinstance(config, UnlearnConfig) else resolve_config(config)


def _innermost(model: Any) -> Any:
    """The model inside distributed wrappers (DDP and friends keep it as `.module`)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Every submodule in eval mode inside the block; each one's own mode restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def _reference_of(model: Any, reference: Any) -> Iterator[Any]:
    """The module whose logits are the reference: `reference`, or `model` with its adapter off."""
    if reference is not None:
        yield reference
        return
    peft_model = _innermost(model)
    if not hasattr(peft_model, "disable_adapter"):
        raise InputError("reference=None needs a PEFT model (its adapter switched off is the reference); "
                         "pass the starting model as `reference` instead")
    with peft_model.disable_adapter():
        yield model


def batch_terms(
    model: Any,
    reference: Any,
    forget: Mapping[str, torch.Tensor],
    retain: Mapping[str, torch.Tensor],
    cfg: UnlearnConfig,
    pad_id: int,
) -> dict[str, torch.Tensor]:
    """`step_terms` on already collated, right-padded batches (input_ids, attention_mask, labels)."""
    nf, tf = forget["input_ids"].shape
    tr = retain["input_ids"].shape[1]
    width = max(tf, tr)

    def both(key: str, value: int) -> torch.Tensor:
        pad = torch.nn.functional.pad
        return torch.cat([pad(forget[key], (0, width - tf), value=value), pad(retain[key], (0, width - tr), value=value)])

    ids, mask = both("input_ids", pad_id), both("attention_mask", 0)
    # use_cache=False here rather than in the config, so that an eval hook's generate() keeps its cache.
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    with torch.no_grad(), _reference_of(model, reference) as ref, eval_mode(ref):
        ref_logits = ref(input_ids=ids, attention_mask=mask, use_cache=False).logits
    # Right padding: each half's own tokens sit in its first tf (tr) columns; cutting there restores
    # exactly the logits each batch would have had alone (causal attention never looks right).
    f_logits, r_logits = logits[:nf, :tf], logits[nf:, :tr]
    f_ref, r_ref = ref_logits[:nf, :tf], ref_logits[nf:, :tr]

    nll_theta = answer_nll(f_logits, forget["labels"], cfg.npo_reduction)
    with torch.no_grad():
        nll_ref = answer_nll(f_ref, forget["labels"], cfg.npo_reduction)
    npo = npo_from_nll(nll_theta, nll_ref, cfg.beta)
    kl = kl_to_reference(r_logits, r_ref, retain["attention_mask"], cfg.kl_reduction,
                         max_length=cfg.max_length, labels=retain["labels"])
    gdr = gdr_loss(r_logits, retain["labels"])
    total = total_loss(npo, kl, gdr, cfg.npo_weight, cfg.kl_weight, cfg.retain_weight)
    with torch.no_grad():  # the forget NLL in the reference's reduction, for the log
        if cfg.npo_reduction == "mean":  # already computed above: the same numbers
            fn, fr = nll_theta.detach(), nll_ref
        else:
            fn = answer_nll(f_logits, forget["labels"], "mean")
            fr = answer_nll(f_ref, forget["labels"], "mean")
    tokens = (forget["attention_mask"].sum() + retain["attention_mask"].sum()).to(torch.float32)
    return {"npo": npo, "kl": kl, "gdr": gdr, "total": total, "forget_nll": fn, "forget_nll_ref": fr,
            "tokens": tokens}


def encode_batch(tokenizer: Any, rows: Sequence[Any], cfg: UnlearnConfig, device: Any) -> dict[str, torch.Tensor]:
    """Rows -> a right-padded batch on `device`, tokenised as the reference trainer did."""
    if not rows:
        raise InputError("a step needs at least one forget and one retain row")
    encoded = [encode_example(tokenizer, *_prompt_and_answer(r), cfg.max_length, cfg.prompt_fraction) for r in rows]
    return {k: v.to(device) for k, v in collate(encoded, tokenizer.pad_token_id).items()}


def step_terms(
    model: Any,
    reference: Any,
    forget_rows: Sequence[Any],
    retain_rows: Sequence[Any],
    tokenizer: Any,
    config: str | Path | UnlearnConfig | Mapping[str, Any],
) -> dict[str, torch.Tensor]:
    """The loss terms of one micro-batch: npo, kl, gdr, total (0-d tensors; total carries the graph).

    Also returns forget_nll and forget_nll_ref (the forget answers' mean token NLL under the model and
    the reference) and tokens (real tokens in the batch). See the module docstring for the rules.
    """
    cfg = _config(config)
    if len(forget_rows) != len(retain_rows):
        raise InputError(f"one retain row per forget row: got {len(forget_rows)} forget and {len(retain_rows)} retain")
    if tokenizer.pad_token_id is None:
        raise InputError("the tokenizer has no pad token (set tokenizer.pad_token, e.g. to eos)")
    device = next(_innermost(model).parameters()).device
    forget = encode_batch(tokenizer, forget_rows, cfg, device)
    retain = encode_batch(tokenizer, retain_rows, cfg, device)
    return batch_terms(model, reference, forget, retain, cfg, tokenizer.pad_token_id)


__all__ = ["step_terms", "batch_terms", "encode_batch", "eval_mode"]
