"""The loss of one unlearning step, as a public function: what the trainer computes for a batch.

    step_terms(model, reference, forget_rows, retain_rows, tokenizer, config)
        -> {"npo", "kl", "gdr", "total", "forget_nll", "forget_nll_ref", "tokens"}   (npo_gdr_klr)

`forget_rows` and `retain_rows` are rows with `input` and `output` (LUME's jsonl rows as dicts, or
`umerge.unlearn.data.Row`), one retain row per forget row; `config` is a preset name, an
`UnlearnConfig` or a dict of config values. The rows are tokenised as the reference trainer did
(`umerge.unlearn.tokenize.encode_example`), and `config.method` chooses the loss. ZJUKLAB's
objective, `npo_gdr_klr` (the default, and both zjuklab presets):

    total = npo_weight * NPO(forget) + kl_weight * KL(p_ref || p_theta)(retain) + retain_weight * NLL(retain)

with the formulas and reductions of `umerge.unlearn.losses` (NPO on the batch-mean token NLL, KL with
`config.kl_reduction`, the retain NLL as the Hugging Face causal-LM loss). Every other method's terms
and formulas are in `umerge.unlearn.methods` (`OBJECTIVES`): the result holds each of its terms,
"total" (their weighted sum, with the graph), and the monitors forget_nll and retain_nll (the mean
token NLLs under the model), forget_nll_ref where the method runs the reference on the forget rows,
and tokens. `dpo` adds a batch of the forget prompts with refusals as answers
(`methods.refusal_for`); `rmu` reads the hidden states of one decoder layer through a forward hook.

The reference model: `reference=None` means `model` with its LoRA adapter switched off (a PEFT model,
possibly inside a distributed wrapper), so no second copy of the weights is held; or pass any causal
LM (a frozen copy of the starting model, as the reference code held; full fine-tuning needs one).
Either way its logits are taken in eval mode under no_grad, as the reference code's separately
loaded, eval-mode copy gave them: with dropout in the model, a reference in train mode would not be
the starting model. `model` itself runs in whatever mode the caller left it (train mode in the
trainer); its modes are restored on return. The reference-free methods (grad_ascent, grad_diff,
simnpo) never run it.

All batches of a step go through the model in one forward pass (then split): right padding and
causal attention make each batch's logits those it would have alone, and distributed wrappers see one
forward per backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from umerge.errors import InputError
from umerge.unlearn import methods
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


@contextlib.contextmanager
def _first_output(module: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Inside the block, the first output of `module` (its hidden states) lands in the yielded list.

    Only the first call is kept, and the hook is gone after the block, so gradient checkpointing's
    recomputation during backward does not add to it.
    """
    store: list[torch.Tensor] = []

    def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
        if not store:
            store.append(output[0] if isinstance(output, tuple) else output)

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def _joint_forward(
    module: Any, batches: Sequence[Mapping[str, torch.Tensor]], pad_id: int, layer: torch.nn.Module | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Run `batches` through `module` as one right-padded batch; each batch's logits (and the hidden
    states `layer` outputs, when given) cut back to its own rows and width."""
    width = max(b["input_ids"].shape[1] for b in batches)
    pad = torch.nn.functional.pad

    def cat(key: str, value: int) -> torch.Tensor:
        return torch.cat([pad(b[key], (0, width - b[key].shape[1]), value=value) for b in batches])

    ids, mask = cat("input_ids", pad_id), cat("attention_mask", 0)
    with contextlib.ExitStack() as stack:
        store = stack.enter_context(_first_output(layer)) if layer is not None else None
        logits = module(input_ids=ids, attention_mask=mask, use_cache=False).logits
    cuts, row = [], 0
    for b in batches:
        n, t = b["input_ids"].shape
        cuts.append((slice(row, row + n), slice(0, t)))
        row += n
    hidden = [store[0][r, t] for r, t in cuts] if store is not None else None
    return [logits[r, t] for r, t in cuts], hidden


def _method_terms(
    model: Any,
    reference: Any,
    forget: Mapping[str, torch.Tensor],
    retain: Mapping[str, torch.Tensor],
    cfg: UnlearnConfig,
    pad_id: int,
    preferred: Mapping[str, torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    """The terms of every method but npo_gdr_klr (`methods.OBJECTIVES`), the total and the monitors."""
    method = cfg.method
    batches = [forget, retain] + ([preferred] if preferred is not None else [])
    layer = ref_layer = None
    steered = 0
    if method == "rmu":
        stack = methods.decoder_layers(_innermost(model))
        steered, _ = methods.rmu_layers(len(stack), cfg.rmu_layer, cfg.rmu_trainable_layers)
        layer = stack[steered]
    # The model's pass: every batch, with the graph.
    logits, hidden = _joint_forward(model, batches, pad_id, layer)
    f_logits, r_logits = logits[0], logits[1]
    # The reference's pass, on the batches the method compares with it.
    ref_logits: list[torch.Tensor] = []
    ref_hidden: list[torch.Tensor] | None = None
    if method in methods.NEEDS_REFERENCE:
        ref_batches = [retain] if method == "rmu" else [forget] + ([preferred] if preferred is not None else [])
        with torch.no_grad(), _reference_of(model, reference) as ref, eval_mode(ref):
            if method == "rmu":
                ref_layer = layer if ref is model else methods.decoder_layers(_innermost(ref))[steered]
            ref_logits, ref_hidden = _joint_forward(ref, ref_batches, pad_id, ref_layer)

    f_labels, r_labels = forget["labels"], retain["labels"]
    terms: dict[str, torch.Tensor] = {}
    if method in ("grad_ascent", "grad_diff"):
        terms["ga"] = methods.grad_ascent_loss(f_logits, f_labels)
    elif method == "npo":
        nll_theta = answer_nll(f_logits, f_labels, cfg.npo_reduction)
        with torch.no_grad():
            nll_ref = answer_nll(ref_logits[0], f_labels, cfg.npo_reduction)
        terms["npo"] = npo_from_nll(nll_theta, nll_ref, cfg.beta)
    elif method == "simnpo":
        terms["simnpo"] = methods.simnpo_loss(f_logits, f_labels, cfg.simnpo_beta, cfg.simnpo_delta)
    elif method == "dpo":
        assert preferred is not None
        terms["dpo"] = methods.dpo_loss(logits[2], ref_logits[1], preferred["labels"], f_logits, ref_logits[0],
                                        f_labels, cfg.beta)
    elif method == "rmu":
        assert hidden is not None and ref_hidden is not None
        control = methods.rmu_control_vector(hidden[0].shape[-1], cfg.rmu_steering_coeff, cfg.seed).to(hidden[0].device)
        terms["rmu_forget"] = methods.activation_mse(hidden[0], control, methods.answer_positions(f_labels))
        terms["rmu_retain"] = methods.activation_mse(hidden[1], ref_hidden[0], methods.answer_positions(r_labels))
    elif method == "undial":
        terms["undial"] = methods.undial_loss(f_logits, ref_logits[0], f_labels, cfg.undial_beta)
    else:  # pragma: no cover - the config validates the method
        raise InputError(f"unknown method {method!r}")
    uses_retain_nll = any(term == "retain_nll" for term, _ in methods.OBJECTIVES[method])
    if uses_retain_nll:
        terms["retain_nll"] = gdr_loss(r_logits, r_labels)
    weights = {w: float(getattr(cfg, w)) for _, w in methods.OBJECTIVES[method]}
    out = dict(terms)
    out["total"] = methods.weighted_total(method, terms, weights)
    with torch.no_grad():  # monitors, in the Hugging Face loss's reduction
        out["forget_nll"] = answer_nll(f_logits, f_labels, "mean").detach()
        if not uses_retain_nll:
            out["retain_nll"] = gdr_loss(r_logits, r_labels).detach()
        if method in ("npo", "dpo", "undial"):
            out["forget_nll_ref"] = answer_nll(ref_logits[0], f_labels, "mean")
    out["tokens"] = sum(b["attention_mask"].sum() for b in batches).to(torch.float32)
    return out


def batch_terms(
    model: Any,
    reference: Any,
    forget: Mapping[str, torch.Tensor],
    retain: Mapping[str, torch.Tensor],
    cfg: UnlearnConfig,
    pad_id: int,
    preferred: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """`step_terms` on already collated, right-padded batches (input_ids, attention_mask, labels).

    `preferred` (dpo only): the forget prompts with their refusals as answers, row for row.
    """
    if cfg.method == "dpo" and preferred is None:
        raise InputError("method dpo needs the preferred (refusal) batch")
    if cfg.method != "npo_gdr_klr":
        return _method_terms(model, reference, forget, retain, cfg, pad_id, preferred if cfg.method == "dpo" else None)
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
    """The loss terms of one micro-batch (0-d tensors; total carries the graph).

    npo_gdr_klr: npo, kl, gdr, total, forget_nll and forget_nll_ref (the forget answers' mean token
    NLL under the model and the reference) and tokens (real tokens in the batch). Other methods: their
    own terms (`methods.OBJECTIVES`), total, forget_nll, retain_nll, forget_nll_ref where the
    reference sees the forget rows, and tokens. See the module docstring for the rules.
    """
    cfg = _config(config)
    if len(forget_rows) != len(retain_rows):
        raise InputError(f"one retain row per forget row: got {len(forget_rows)} forget and {len(retain_rows)} retain")
    if tokenizer.pad_token_id is None:
        raise InputError("the tokenizer has no pad token (set tokenizer.pad_token, e.g. to eos)")
    device = next(_innermost(model).parameters()).device
    forget = encode_batch(tokenizer, forget_rows, cfg, device)
    retain = encode_batch(tokenizer, retain_rows, cfg, device)
    preferred = None
    if cfg.method == "dpo":  # the same prompts, a refusal as the answer
        prompts = [_prompt_and_answer(r)[0] for r in forget_rows]
        preferred = encode_batch(tokenizer, [{"input": p, "output": methods.refusal_for(p, cfg.seed)} for p in prompts],
                                 cfg, device)
    return batch_terms(model, reference, forget, retain, cfg, tokenizer.pad_token_id, preferred)


__all__ = ["step_terms", "batch_terms", "encode_batch", "eval_mode"]
