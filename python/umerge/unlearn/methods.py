"""The unlearning methods beside ZJUKLAB's objective: their losses as pure functions, and their terms.

Notation as in `umerge.unlearn.losses`: a batch has B sequences of T tokens, `logits` are (B, T, V),
`labels` (B, T) hold the token ids where a loss is taken and -100 elsewhere (prompt, padding);
position t predicts labels[:, t+1]. NLL(x) is the answer tokens' negative log-likelihood; "mean" is
the mean over every answer token of the batch (the Hugging Face causal-LM loss), "per sequence" a
value per row, averaged over the B rows at the end. The reference is the starting model (the PEFT
model with its adapter off, or a frozen copy), always without gradient.

Every method minimises a weighted sum of named terms (`OBJECTIVES`: term -> the config field that
weights it). The retain term of grad_diff, npo, simnpo, dpo and undial is the retain NLL ("mean",
`losses.gdr_loss`). The formulas, where each reduction comes from, and where this file departs
from the paper or from open-unlearning (locuslab/open-unlearning, src/trainer/unlearn/ and
src/trainer/utils.py, read at its main branch of 2025-12):

- grad_ascent: ga = -NLL_mean(forget). Plain gradient ascent, as TOFU (Maini et al. 2024) and
  open-unlearning's GradAscent (-outputs.loss). No retain term.
- grad_diff: ga + retain NLL. TOFU's and open-unlearning's GradDiff (gamma = forget_weight,
  alpha = retain_weight).
- npo: NPO (Zhang et al. 2024, eq. 3) as `losses.npo_from_nll`, on `npo_reduction` ("mean", the
  ZJUKLAB reference's batch-mean NLL; "sum", the paper's per-sequence log-likelihood, which
  open-unlearning uses) + retain NLL. With retain_weight 0 it is the npo-only preset's loss exactly.
- simnpo (Fan et al. 2024, "Simplicity Prevails", the SimNPO objective): per sequence,
      -(2 / beta) * log sigmoid(beta * (NLL_sum(y) / |y| - delta)),   averaged over the B rows,
  |y| the number of answer tokens the row predicts. Reference-free. The paper writes the margin
  outside beta, log sigmoid(-(beta / |y|) log pi(y|x) - gamma); the authors' code
  (OPTML-Group/Unlearn-Simple) and open-unlearning subtract it before multiplying by beta, which
  is what is done here: the paper's gamma is beta * delta. Defaults beta 4.5, delta 0 (open-
  unlearning's TOFU values; its weights gamma 0.125, alpha 1 are forget_weight, retain_weight).
- dpo (Rafailov et al. 2023, eq. 7; used for unlearning by TOFU, Maini et al. 2024, with "I don't
  know" answers preferred): with log pi(y|x) the summed log-likelihood of answer y,
      -log sigmoid(beta * ((log pi(w|x) - log pi_ref(w|x)) - (log pi(l|x) - log pi_ref(l|x)))),
  averaged over the B rows, w a refusal (`REFUSALS`, chosen per row by `refusal_for`), l the forget
  answer; beta 0.1. This is TOFU's own form. open-unlearning (and Unlearn-Simple) multiply it by
  2 / beta, NPO's normalisation: forget_weight = 2 / beta gives theirs.
- rmu (Li et al. 2024, "The WMDP Benchmark", its RMU method): with h_l the output of decoder layer
  l (the residual stream after it) and u a fixed random unit vector (`rmu_control_vector`: entries
  uniform in [0, 1), then normalised, as the paper and its code draw it; seeded by the config's
  seed),
      rmu_forget = MSE(h_l(forget), c * u),   rmu_retain = MSE(h_l(retain), h_l^ref(retain)),
  total = forget_weight * rmu_forget + rmu_alpha * rmu_retain. MSE is `activation_mse`: the
  squared error averaged over the hidden dimension, then over the answer positions of each row
  (labels != -100 at the position itself, not shifted), then over rows: open-unlearning's
  reduction. The WMDP code averages over every position of its fixed-length text chunks (padding
  included) and the paper writes the squared norm (d times this). Only layers at or below l are
  trained (below l nothing else could change h_l). Defaults for the tiny demo models: l =
  max(0, L // 4 - 1) (layer 7 of Zephyr-7B's 32 in WMDP; layer 0 of a 2-layer model), the trained
  layers l - 2 .. l (WMDP's 5, 6, 7), c = 20 (open-unlearning's RMU default; here about twice the
  norm of a tiny memorised OLMo's layer-0 hidden states, measured 9.8; WMDP's Zephyr-7B run used
  c = 6.5 with alpha 1200), alpha 10 (enough on the demo world to keep the retain NLL at its start).
- undial (Dong et al. 2024, "UNDIAL", its adjusted-logit target): at each position that predicts an answer token
  y_t, the target distribution q_t = softmax(z_ref,t - beta * onehot(y_t)) is the reference's with
  the true token's logit lowered by beta, and
      undial = mean over those positions of -sum_v q_t(v) log p_theta(v | x_<=t),
  beta 10 (open-unlearning's default; the paper searches 3, 10, 30). The authors' code trains on
  whole texts, where every position predicts a token; here only the answer's positions count, the
  batch mean over them. open-unlearning averages over every position, prompt and padding included,
  where its label -100 indexes vocabulary entry V - 100; that is not reproduced.

Every function is differentiable in the model's tensors, takes the reference's tensors as constants
(detached), and computes in float32 or wider.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from umerge.errors import InputError
from umerge.unlearn.losses import IGNORE_INDEX, _upcast, answer_nll
from umerge.unlearn.refusals import REFUSALS, refusal_for

#: method -> its terms, each with the config field that weights it, in the order they are summed.
OBJECTIVES: dict[str, tuple[tuple[str, str], ...]] = {
    "npo_gdr_klr": (("npo", "npo_weight"), ("kl", "kl_weight"), ("gdr", "retain_weight")),
    "grad_ascent": (("ga", "forget_weight"),),
    "grad_diff": (("ga", "forget_weight"), ("retain_nll", "retain_weight")),
    "npo": (("npo", "forget_weight"), ("retain_nll", "retain_weight")),
    "simnpo": (("simnpo", "forget_weight"), ("retain_nll", "retain_weight")),
    "dpo": (("dpo", "forget_weight"), ("retain_nll", "retain_weight")),
    "rmu": (("rmu_forget", "forget_weight"), ("rmu_retain", "rmu_alpha")),
    "undial": (("undial", "forget_weight"), ("retain_nll", "retain_weight")),
}
#: The methods whose loss needs the reference model (the others are reference-free).
NEEDS_REFERENCE = frozenset({"npo_gdr_klr", "npo", "dpo", "rmu", "undial"})

# -- the forget-side losses ------------------------------------------------------------------------


def grad_ascent_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-NLL_mean: minus the mean token NLL over every answer token of the batch (gradient ascent)."""
    return -answer_nll(logits, labels, "mean")


def simnpo_loss(logits: torch.Tensor, labels: torch.Tensor, beta: float, delta: float = 0.0) -> torch.Tensor:
    """SimNPO: mean over rows of -(2/beta) * logsigmoid(beta * (NLL_sum / |y| - delta)).

    |y| = the row's answer tokens that are predicted (labels[b, 1:] != -100). No reference. At
    NLL/|y| = delta the loss is (2/beta) ln 2 and its derivative in NLL/|y| is -1, as NPO's.
    """
    if beta <= 0:
        raise ValueError(f"SimNPO beta must be positive, got {beta}")
    per_token = answer_nll(logits, labels, "mean_per_sequence")
    return (-(2.0 / beta) * F.logsigmoid(beta * (per_token - delta))).mean()


def dpo_from_logps(
    logp_preferred: torch.Tensor,
    ref_logp_preferred: torch.Tensor,
    logp_dispreferred: torch.Tensor,
    ref_logp_dispreferred: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """mean of -logsigmoid(beta * ((lp_w - ref_w) - (lp_l - ref_l))) over rows; the reference's detached.

    At the reference the loss is ln 2; its derivative in lp_l is +beta * sigmoid(-margin) > 0, so
    descending it lowers the dispreferred answer's likelihood (and raises the preferred one's).
    """
    if beta <= 0:
        raise ValueError(f"DPO beta must be positive, got {beta}")
    margin = beta * ((logp_preferred - ref_logp_preferred.detach()) - (logp_dispreferred - ref_logp_dispreferred.detach()))
    return (-F.logsigmoid(margin)).mean()


def dpo_loss(
    preferred_logits: torch.Tensor,
    preferred_ref_logits: torch.Tensor,
    preferred_labels: torch.Tensor,
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    labels: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """DPO of the preferred answers (refusals) over the dispreferred ones (the forget answers), per row.

    log pi(y|x) = -NLL_sum(y), the summed log-likelihood of the row's answer tokens (Rafailov et al.,
    TOFU). Row b of the preferred batch has the same prompt as row b of the forget batch.
    """
    with torch.no_grad():
        ref_w = -answer_nll(preferred_ref_logits, preferred_labels, "sum")
        ref_l = -answer_nll(ref_logits, labels, "sum")
    return dpo_from_logps(-answer_nll(preferred_logits, preferred_labels, "sum"), ref_w,
                          -answer_nll(logits, labels, "sum"), ref_l, beta)


def rmu_control_vector(dim: int, steering_coeff: float, seed: int) -> torch.Tensor:
    """c * u, float32 (dim,): u has entries uniform in [0, 1), normalised to unit length, drawn from a
    generator seeded with `seed` alone (so every step and every process get the same u)."""
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(dim, generator=g, dtype=torch.float32)
    return steering_coeff * u / u.norm()


def activation_mse(hidden: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked MSE of hidden states (B, T, d) to `target` ((B, T, d), or (d,) for every position).

    Per position the squared error is averaged over d; per row, over the positions where mask is
    true; then over rows (rows with no such position count 0). Computed in float32 or wider.
    """
    h = _upcast(hidden)
    t = target.detach().to(h.dtype)
    per_pos = (h - t).pow(2).mean(dim=-1)  # (B, T)
    m = mask.to(per_pos.dtype)
    return ((per_pos * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)).mean()


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the positions that hold an answer token (labels != -100), RMU's mask."""
    return labels != IGNORE_INDEX


def undial_targets(ref_logits: torch.Tensor, labels: torch.Tensor, beta: float) -> torch.Tensor:
    """UNDIAL's soft targets (B, T-1, V): softmax of the reference's logits at each position with the
    next token's logit lowered by beta (positions whose next label is -100 keep the plain softmax;
    they are not counted by `undial_loss`)."""
    z = _upcast(ref_logits[:, :-1, :].detach())
    nxt = labels[:, 1:]
    real = nxt != IGNORE_INDEX
    onehot = F.one_hot(nxt.masked_fill(~real, 0), z.shape[-1]).to(z.dtype) * real.unsqueeze(-1).to(z.dtype)
    return F.softmax(z - beta * onehot, dim=-1)


def undial_loss(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, beta: float) -> torch.Tensor:
    """UNDIAL: cross-entropy to `undial_targets`, the mean over the positions that predict an answer token."""
    q = undial_targets(ref_logits, labels, beta)
    logp = F.log_softmax(_upcast(logits[:, :-1, :]), dim=-1)
    ce = -(q * logp).sum(dim=-1)  # (B, T-1)
    mask = (labels[:, 1:] != IGNORE_INDEX).to(ce.dtype)
    return (ce * mask).sum() / mask.sum().clamp_min(1.0)


# -- the objective ---------------------------------------------------------------------------------


def weighted_total(method: str, terms: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """sum over the method's terms of weight * term, in `OBJECTIVES` order (left to right)."""
    parts = OBJECTIVES[method]
    total = weights[parts[0][1]] * terms[parts[0][0]]
    for term, weight in parts[1:]:
        total = total + weights[weight] * terms[term]
    return total


# -- RMU's layers ----------------------------------------------------------------------------------


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's stack of decoder layers: the first nn.ModuleList named `layers` (Llama, OLMo,
    Mistral, Qwen), `h` (GPT-2) or `blocks`, inside any PEFT or distributed wrapper."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks"):
            return module
    raise InputError("rmu needs a model with a stack of decoder layers (a ModuleList named layers, h or blocks)")


def rmu_layers(n_layers: int, layer: int | None, trainable: Sequence[int] | None) -> tuple[int, list[int]]:
    """(the steered layer, the sorted layers to train) for a model of n_layers decoder layers.

    layer None: max(0, n_layers // 4 - 1); trainable None: layer - 2 .. layer (those >= 0). Every
    trained layer must lie at or below the steered one: the hidden state there does not depend on
    the layers above it, so they would get no gradient.
    """
    steered = max(0, n_layers // 4 - 1) if layer is None else int(layer)
    if not 0 <= steered < n_layers:
        raise InputError(f"rmu_layer {steered} is not a layer of this model (it has {n_layers}: 0..{n_layers - 1})")
    train = sorted(set(range(max(0, steered - 2), steered + 1) if trainable is None else (int(i) for i in trainable)))
    above = [i for i in train if i > steered]
    if above or not train or train[0] < 0:
        raise InputError(f"rmu_trainable_layers {train}: every trained layer must be in 0..{steered} "
                         "(at or below rmu_layer; the layers above it get no gradient)")
    return steered, train


__all__ = [
    "OBJECTIVES",
    "NEEDS_REFERENCE",
    "REFUSALS",
    "refusal_for",
    "grad_ascent_loss",
    "simnpo_loss",
    "dpo_from_logps",
    "dpo_loss",
    "rmu_control_vector",
    "activation_mse",
    "answer_positions",
    "undial_targets",
    "undial_loss",
    "weighted_total",
    "decoder_layers",
    "rmu_layers",
]
