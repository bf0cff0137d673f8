"""The unlearning objective as plain functions: NPO on the forget set, KL and NLL on the retain set.

Notation. A batch has B sequences of T tokens; `logits` are (B, T, V); `labels` are (B, T) token ids
aligned with the inputs (Hugging Face convention), -100 where no loss is taken (prompt and padding).
Position t predicts token t+1, so every function shifts: logits[:, :-1] score labels[:, 1:].

    NLL_theta(x)  negative log-likelihood of the answer tokens of x under the model being trained
    NLL_ref(x)    the same under the frozen reference (the starting model)

- NPO (Zhang et al. 2024, "Negative Preference Optimization", eq. 3), on the forget batch:
      L_NPO = -(2 / beta) * log sigmoid(beta * (NLL_theta - NLL_ref)),  beta = 0.1
  where NLL is either the mean token NLL over all answer tokens of the batch (one number per batch:
  what the reference system computed, through the Hugging Face loss) -- reduction "mean" -- or the
  summed NLL of each sequence, with L_NPO averaged over sequences (the paper's log pi(y|x)) --
  reduction "sum".
- KLR, on the retain batch: KL_t = KL(p_ref || p_theta) = sum_v p_ref(v) * (log p_ref(v) - log p_theta(v))
  at every position t of every sequence (prompt and answer alike; no shift), then reduced over
  positions (`kl_to_reference`, reduction "reference", "real_mean" or "answer_mean"). The reference
  system left-padded every example to max_length and called
  `F.kl_div(..., reduction="batchmean", log_target=True)` on the (B*max_length, V) flattening: the
  sum over all positions divided by B*max_length, which "reference" reproduces without computing
  the padding.
- GDR, on the retain batch: the mean token NLL of the retain answers (gradient descent on retain).
- total = npo_weight * L_NPO + kl_weight * KLR + retain_weight * GDR.

The reference code named the three weights ga_ratio, gd_ratio and gk_ratio, which read as if they
weighted "gradient ascent", "gradient descent" and "KL". They do not: ga_ratio weights the NPO term,
gd_ratio weights the KL term and gk_ratio weights the retain NLL. `LOSS_WEIGHT_ALIASES` maps them
onto our names exactly that way.

Every function is differentiable and device/dtype agnostic; log-softmax is taken in float32 (or
float64 for float64 inputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The reference code's weight names -> ours (ga_ratio -> npo_weight, gd_ratio -> kl_weight,
# gk_ratio -> retain_weight); defined beside the config, which must load without torch.
from umerge.unlearn.presets import LOSS_WEIGHT_ALIASES, resolve_aliases

IGNORE_INDEX = -100


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> float32 for log-softmax; float32 and float64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))

NPO_REDUCTIONS = ("mean", "sum")
KL_REDUCTIONS = ("reference", "real_mean", "answer_mean")


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position NLL of the next token and the mask of positions that count.

    Returns (nll, mask), both (B, T-1): nll[b, t] = -log p_theta(labels[b, t+1] | x[b, :t+1]) where
    labels[b, t+1] != -100, else 0; mask is 1.0 where the position counts.
    """
    shift_logits = _upcast(logits[:, :-1, :])
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    safe = shift_labels.masked_fill(~mask, 0)
    logp = F.log_softmax(shift_logits, dim=-1)
    nll = -logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    maskf = mask.to(nll.dtype)
    return nll * maskf, maskf


def answer_nll(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """NLL of the answer tokens.

    reduction "mean": sum of token NLLs / number of answer tokens in the whole batch (a scalar; the
    Hugging Face causal-LM loss). "sum": the summed NLL of each sequence, shape (B,).
    "mean_per_sequence": each sequence's mean token NLL, shape (B,).
    """
    nll, mask = token_nll(logits, labels)
    if reduction == "mean":
        return nll.sum() / mask.sum().clamp_min(1.0)
    if reduction == "sum":
        return nll.sum(dim=1)
    if reduction == "mean_per_sequence":
        return nll.sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
    raise ValueError(f"unknown reduction {reduction!r} (use 'mean', 'sum' or 'mean_per_sequence')")


def npo_from_nll(nll_theta: torch.Tensor, nll_ref: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """-(2/beta) * logsigmoid(beta * (nll_theta - nll_ref)), averaged if the inputs are per sequence.

    nll_ref is treated as a constant (detached). At nll_theta == nll_ref the loss is (2/beta)*log 2,
    and its derivative with respect to nll_theta is -2 * sigmoid(-beta * (nll_theta - nll_ref)):
    gradient ascent on the forget NLL (derivative -1 at the start, exactly plain gradient ascent)
    whose weight fades as the model moves away from the reference.
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    margin = beta * (nll_theta - nll_ref.detach())
    return (-(2.0 / beta) * F.logsigmoid(margin)).mean()


def npo_loss(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    labels: torch.Tensor,
    beta: float = 0.1,
    reduction: str = "mean",
) -> torch.Tensor:
    """NPO on a forget batch: -(2/beta) * logsigmoid(beta * (NLL_theta - NLL_ref)).

    reduction "mean": NLL = mean token NLL over all answer tokens of the batch (reference code), one
    term per batch. "sum": NLL = summed answer NLL per sequence (NPO paper), the term averaged over
    the B sequences.
    """
    if reduction not in NPO_REDUCTIONS:
        raise ValueError(f"unknown NPO reduction {reduction!r} (use 'mean' or 'sum')")
    nll_theta = answer_nll(logits, labels, reduction)
    with torch.no_grad():
        nll_ref = answer_nll(ref_logits, labels, reduction)
    return npo_from_nll(nll_theta, nll_ref, beta)


def kl_to_reference(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    attention_mask: torch.Tensor,
    reduction: str = "reference",
    *,
    max_length: int | None = None,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(p_ref || p_theta) over the vocabulary at each position, reduced over positions.

    KL[b, t] = sum_v p_ref(v | x[b, :t+1]) * (log p_ref(v | .) - log p_theta(v | .)), for every
    position t (the prediction made after token t; prompt and answer alike). A position is real
    where attention_mask[b, t] == 1. Reductions:

    - "reference": sum of KL over the real positions / (B * max_length). This is what the ZJUKLAB
      reference computes: it left-pads each example to max_length and divides the sum over all
      B * max_length positions by B * max_length (`kl_div(reduction="batchmean")` on the flattened
      positions). Its pad positions add exactly zero when the pad token's embedding row is zero and
      the layers have no biases (OLMo: the embedding's padding_idx row; then every activation at a
      pad position is zero under both models). Where a model gives pad positions non-zero KL, the
      reference's term also holds that artefact of padding; this reduction leaves it out. Needs
      `max_length` (>= the batch's width).
    - "real_mean": mean of KL over the real positions.
    - "answer_mean": mean over the positions that predict an answer token
      (labels[b, t+1] != -100); needs `labels`.
    """
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"unknown KL reduction {reduction!r} (use {', '.join(KL_REDUCTIONS)})")
    logp_theta = F.log_softmax(_upcast(logits), dim=-1)
    with torch.no_grad():
        logp_ref = F.log_softmax(_upcast(ref_logits.detach()), dim=-1)
    per_pos = (logp_ref.exp() * (logp_ref - logp_theta)).sum(dim=-1)  # (B, T)
    if reduction == "answer_mean":
        if labels is None:
            raise ValueError("reduction 'answer_mean' needs labels")
        answer = (labels[:, 1:] != IGNORE_INDEX).to(per_pos.dtype)
        return (per_pos[:, :-1] * answer).sum() / answer.sum().clamp_min(1.0)
    real = attention_mask.to(per_pos.dtype)
    if reduction == "real_mean":
        return (per_pos * real).sum() / real.sum().clamp_min(1.0)
    width = per_pos.shape[1]
    if max_length is None or max_length < width:
        raise ValueError(f"reduction 'reference' needs max_length >= the batch width {width}, got {max_length}")
    return (per_pos * real).sum() / (per_pos.shape[0] * max_length)


def gdr_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """GDR: mean token NLL of the retain answers (the Hugging Face causal-LM loss)."""
    return answer_nll(logits, labels, "mean")


def total_loss(
    npo: torch.Tensor,
    kl: torch.Tensor,
    gdr: torch.Tensor,
    npo_weight: float,
    kl_weight: float,
    retain_weight: float,
) -> torch.Tensor:
    """npo_weight * NPO + kl_weight * KLR + retain_weight * GDR."""
    return npo_weight * npo + kl_weight * kl + retain_weight * gdr


__all__ = [
    "IGNORE_INDEX",
    "LOSS_WEIGHT_ALIASES",
    "resolve_aliases",
    "token_nll",
    "answer_nll",
    "npo_from_nll",
    "npo_loss",
    "kl_to_reference",
    "KL_REDUCTIONS",
    "NPO_REDUCTIONS",
    "gdr_loss",
    "total_loss",
]
