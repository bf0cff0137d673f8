"""The unlearning methods' losses against hand computations, the method config, and one step of each.

Expected values are written out here from the published formulas (see `umerge.unlearn.methods` for
the sources): softmax and log in float64 with Python's math module, explicit loops over positions,
masks applied by hand. Nothing below takes an expected value from the code under test. The step
tests compare `step_terms` (all batches of a step in one forward pass, the reference with the
adapter off) with the pure functions applied to each batch run through the model on its own.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from umerge.errors import InputError
from umerge.unlearn.presets import (
    METHOD_ALIASES,
    METHOD_PARAMS,
    METHOD_PRESETS,
    METHODS,
    PRESETS,
    UnlearnConfig,
    apply_overrides,
    get_preset,
)

torch = pytest.importorskip("torch")
from umerge.unlearn import losses, methods  # noqa: E402  (needs torch)

pytestmark = pytest.mark.train

REPO = Path(__file__).resolve().parents[1]

# -- the tiny tensors of every hand computation ---------------------------------------------------
# B = 2 sequences, T = 3 positions, V = 5 tokens. Position t predicts labels[b, t+1]: sequence 0 has
# answer tokens 2 and 4 (predicted at positions 0 and 1), sequence 1 has token 1 (predicted at 1).
RNG = np.random.default_rng(20240611)
Z = RNG.normal(size=(2, 3, 5)) * 2.0  # the model's logits
ZREF = RNG.normal(size=(2, 3, 5)) * 2.0  # the reference's logits
LABELS = [[-100, 2, 4], [-100, -100, 1]]
PREDICTED = {0: [(0, 2), (1, 4)], 1: [(1, 1)]}  # sequence -> [(position, token it predicts)]


def t(x: np.ndarray, grad: bool = False) -> "torch.Tensor":
    return torch.tensor(x, dtype=torch.float64, requires_grad=grad)


def labels() -> "torch.Tensor":
    return torch.tensor(LABELS)


def log_softmax(row: list[float] | np.ndarray) -> list[float]:
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def seq_nll(z: np.ndarray, b: int) -> float:
    """Summed NLL of sequence b's answer tokens under logits z, by hand."""
    return sum(-log_softmax(z[b, pos])[tok] for pos, tok in PREDICTED[b])


def forget_descent_raises_nll(loss: "torch.Tensor", logits: "torch.Tensor") -> float:
    """<-grad loss, grad NLL_mean>: positive when one step down the loss raises the forget NLL."""
    (g_loss,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (g_nll,) = torch.autograd.grad(losses.answer_nll(logits, labels(), "mean"), logits)
    return float(-(g_loss * g_nll).sum())


# -- gradient ascent, gradient difference ---------------------------------------------------------


def test_grad_ascent_is_minus_the_mean_answer_nll_and_its_gradient_is_minus_nlls() -> None:
    want = -(seq_nll(Z, 0) + seq_nll(Z, 1)) / 3  # three answer tokens in the batch
    logits = t(Z, grad=True)
    ga = methods.grad_ascent_loss(logits, labels())
    assert ga.item() == pytest.approx(want, abs=1e-12)
    (g,) = torch.autograd.grad(ga, logits)
    # d(-NLL_mean)/dz[b, pos, v] = (onehot(tok) - softmax(z[b, pos]))[v] / 3 at a predicting position, else 0
    want_g = np.zeros_like(Z)
    for b, preds in PREDICTED.items():
        for pos, tok in preds:
            p = np.exp(log_softmax(Z[b, pos]))
            want_g[b, pos] = (np.eye(5)[tok] - p) / 3
    assert np.allclose(g.numpy(), want_g, atol=1e-12)
    assert not g[:, 2].any() and not g[1, 0].any()  # the last position and the prompt's carry nothing


def test_grad_diff_total_is_minus_forget_nll_plus_weighted_retain_nll() -> None:
    terms = {"ga": torch.tensor(-2.5), "retain_nll": torch.tensor(0.75)}
    total = methods.weighted_total("grad_diff", terms, {"forget_weight": 0.5, "retain_weight": 2.0})
    assert total.item() == pytest.approx(0.5 * -2.5 + 2.0 * 0.75)


# -- SimNPO ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta, delta", [(4.5, 0.0), (2.0, 0.7)])
def test_simnpo_by_hand_length_normalised_margin_inside_beta(beta: float, delta: float) -> None:
    # per row: -(2/beta) log sigmoid(beta * (NLL_sum / |y| - delta)), then the mean over rows
    per_row = [seq_nll(Z, 0) / 2, seq_nll(Z, 1) / 1]
    want = sum(-(2 / beta) * log_sigmoid(beta * (x - delta)) for x in per_row) / 2
    logits = t(Z, grad=True)
    got = methods.simnpo_loss(logits, labels(), beta, delta)
    assert got.item() == pytest.approx(want, rel=1e-12)
    assert forget_descent_raises_nll(got, logits) > 0
    # the paper writes the margin outside beta (gamma); the code's delta is gamma / beta
    paper = sum(-(2 / beta) * log_sigmoid(beta * x - beta * delta) for x in per_row) / 2
    assert got.item() == pytest.approx(paper, rel=1e-12)
    if delta:
        outside = sum(-(2 / beta) * log_sigmoid(beta * x - delta) for x in per_row) / 2
        assert got.item() != pytest.approx(outside, rel=1e-6)


def test_simnpo_needs_no_reference_and_is_20_ln2_over_beta_at_its_margin() -> None:
    # A row whose mean token NLL equals delta: (2/beta) ln 2, derivative -1 in that mean (as NPO at its start).
    x = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    logits = torch.stack([torch.stack([torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)])])
    loss = (-(2 / 0.1) * torch.nn.functional.logsigmoid(0.1 * (x - 0.3)))
    loss.backward()
    assert loss.item() == pytest.approx(20 * math.log(2)) and x.grad.item() == pytest.approx(-1.0)
    lab = torch.tensor([[-100, 1]])  # one answer token, probability 1/2: NLL ln 2
    assert methods.simnpo_loss(logits, lab, 0.1, math.log(2)).item() == pytest.approx(20 * math.log(2), rel=1e-12)


# -- DPO ------------------------------------------------------------------------------------------


def test_dpo_by_hand_summed_logps_against_the_reference() -> None:
    pref, pref_ref = RNG.normal(size=(2, 3, 5)), RNG.normal(size=(2, 3, 5))
    beta = 0.1
    want = 0.0
    for b in range(2):
        lw, rw = -seq_nll(pref, b), -seq_nll(pref_ref, b)  # the refusal (its own labels: the same here)
        ll, rl = -seq_nll(Z, b), -seq_nll(ZREF, b)
        want += -log_sigmoid(beta * ((lw - rw) - (ll - rl))) / 2
    disp = t(Z, grad=True)
    ref = t(ZREF, grad=True)
    got = methods.dpo_loss(t(pref), t(pref_ref), labels(), disp, ref, labels(), beta)
    assert got.item() == pytest.approx(want, rel=1e-12)
    got.backward()
    assert ref.grad is None  # the reference is a constant
    # at the reference the loss is ln 2; descending it lowers the forget answer's log-likelihood
    at_ref = t(Z, grad=True)
    loss = methods.dpo_loss(t(pref), t(pref), labels(), at_ref, t(Z), labels(), beta)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-12)
    assert forget_descent_raises_nll(loss, at_ref) > 0


def test_dpo_from_logps_derivative_signs() -> None:
    lw = torch.tensor([-3.0], dtype=torch.float64, requires_grad=True)
    ll = torch.tensor([-2.0], dtype=torch.float64, requires_grad=True)
    loss = methods.dpo_from_logps(lw, torch.tensor([-3.5]), ll, torch.tensor([-1.0]), 0.5)
    m = 0.5 * ((-3.0 + 3.5) - (-2.0 + 1.0))  # the margin
    assert loss.item() == pytest.approx(-log_sigmoid(m), rel=1e-12)
    loss.backward()
    s = 1 / (1 + math.exp(m))  # sigmoid(-m)
    assert lw.grad.item() == pytest.approx(-0.5 * s) and ll.grad.item() == pytest.approx(0.5 * s)


def test_refusals_are_chosen_per_prompt_by_seed_the_same_in_any_process() -> None:
    prompts = [f"What is the phone number of person {i}?" for i in range(40)]
    picks = [methods.refusal_for(p, 42) for p in prompts]
    assert all(p in methods.REFUSALS for p in picks) and len(set(picks)) >= 5  # spread over the list
    assert picks == [methods.refusal_for(p, 42) for p in prompts]
    assert picks != [methods.refusal_for(p, 43) for p in prompts]
    # Python's str hash is salted per process (this one's at random); the choice must not depend on it
    code = "from umerge.unlearn.refusals import refusal_for; print(refusal_for('What is the phone number of person 3?', 42))"
    env = {**os.environ, "PYTHONPATH": str(REPO / "python"), "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == picks[3], out.stderr


# -- RMU ------------------------------------------------------------------------------------------


def test_rmu_control_vector_is_c_times_a_seeded_unit_vector_in_the_positive_orthant() -> None:
    v = methods.rmu_control_vector(64, 20.0, seed=7)
    assert v.shape == (64,) and v.dtype == torch.float32
    assert float(v.norm()) == pytest.approx(20.0, rel=1e-6) and bool((v >= 0).all())
    assert torch.equal(v, methods.rmu_control_vector(64, 20.0, seed=7))
    assert not torch.equal(v, methods.rmu_control_vector(64, 20.0, seed=8))


def test_activation_mse_by_hand_with_masks() -> None:
    h = RNG.normal(size=(2, 3, 4))
    target = RNG.normal(size=4)
    mask = [[True, True, False], [False, True, False]]

    def sq(b: int, pos: int, tgt: np.ndarray) -> float:
        return sum((h[b, pos, k] - tgt[k]) ** 2 for k in range(4)) / 4

    want = (sum(sq(0, p, target) for p in (0, 1)) / 2 + sq(1, 1, target)) / 2
    got = methods.activation_mse(t(h), t(target), torch.tensor(mask))
    assert got.item() == pytest.approx(want, rel=1e-12)
    other = RNG.normal(size=(2, 3, 4))  # a per-position target (the reference's hidden states)
    want = (sum(sq(0, p, other[0, p]) for p in (0, 1)) / 2 + sq(1, 1, other[1, 1])) / 2
    assert methods.activation_mse(t(h), t(other), torch.tensor(mask)).item() == pytest.approx(want, rel=1e-12)
    assert methods.answer_positions(labels()).tolist() == [[False, True, True], [False, False, True]]


@pytest.mark.parametrize(
    "n_layers, layer, trainable, want",
    [(2, None, None, (0, [0])), (32, None, None, (7, [5, 6, 7])), (8, None, None, (1, [0, 1])),
     (4, 3, None, (3, [1, 2, 3])), (4, 2, [0, 2], (2, [0, 2]))],
)
def test_rmu_layers(n_layers: int, layer: int | None, trainable: list[int] | None, want: tuple[int, list[int]]) -> None:
    assert methods.rmu_layers(n_layers, layer, trainable) == want


def test_rmu_layers_refuses_layers_that_get_no_gradient() -> None:
    with pytest.raises(InputError, match="not a layer of this model"):
        methods.rmu_layers(2, 2, None)
    with pytest.raises(InputError, match="at or below rmu_layer"):
        methods.rmu_layers(4, 1, [1, 2])


# -- UNDIAL ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [10.0, 3.0])
def test_undial_by_hand_adjusted_reference_targets(beta: float) -> None:
    total = 0.0
    for b, preds in PREDICTED.items():
        for pos, tok in preds:
            adjusted = [ZREF[b, pos, v] - (beta if v == tok else 0.0) for v in range(5)]
            q = [math.exp(x) for x in log_softmax(adjusted)]
            logp = log_softmax(Z[b, pos])
            total += -sum(q[v] * logp[v] for v in range(5))
    want = total / 3  # mean over the three positions that predict an answer token
    logits = t(Z, grad=True)
    got = methods.undial_loss(logits, t(ZREF), labels(), beta)
    assert got.item() == pytest.approx(want, rel=1e-12)
    # positions that predict nothing do not count: change their logits, the loss stays
    z2 = Z.copy()
    z2[:, 2] += 5.0
    z2[1, 0] -= 3.0
    assert methods.undial_loss(t(z2), t(ZREF), labels(), beta).item() == pytest.approx(want, rel=1e-12)


def test_undial_at_the_reference_pushes_the_true_token_down() -> None:
    logits = t(ZREF, grad=True)
    loss = methods.undial_loss(logits, t(ZREF), labels(), 10.0)
    (g,) = torch.autograd.grad(loss, logits)
    for b, preds in PREDICTED.items():  # dCE/dz = (p - q) / 3; q lowered the true token, so p_y > q_y
        for pos, tok in preds:
            assert g[b, pos, tok] > 0
    assert forget_descent_raises_nll(methods.undial_loss(logits, t(ZREF), labels(), 10.0), logits) > 0
    assert methods.undial_loss(t(ZREF), t(ZREF), labels(), 0.0).item() == pytest.approx(
        sum(-sum(math.exp(a) * a for a in log_softmax(ZREF[b, pos])) for b, ps in PREDICTED.items() for pos, _ in ps) / 3,
        rel=1e-12)  # beta 0: the reference's own entropy (self-distillation, nothing forgotten)


# -- the objectives and the config ----------------------------------------------------------------


def test_every_method_has_terms_weights_that_are_config_fields_params_and_a_preset() -> None:
    fields = set(UnlearnConfig().to_dict())
    assert set(methods.OBJECTIVES) == set(METHODS) == set(METHOD_PARAMS) == set(METHOD_PRESETS)
    for method, parts in methods.OBJECTIVES.items():
        assert {w for _, w in parts} <= fields and {w for _, w in parts} <= set(METHOD_PARAMS[method]) | {"rmu_alpha"}
        assert set(METHOD_PARAMS[method]) <= fields
        assert get_preset(METHOD_PRESETS[method]).method in (method, "npo_gdr_klr")
    for name, values in PRESETS.items():
        cfg = get_preset(name)
        assert cfg.preset == name and cfg.method == values.get("method", "npo_gdr_klr")


def test_weighted_total_sums_each_term_times_its_field() -> None:
    cfg = apply_overrides(get_preset("rmu"), ["forget_weight=0.5", "rmu_alpha=3"])
    terms = {"rmu_forget": torch.tensor(2.0), "rmu_retain": torch.tensor(0.25)}
    weights = {w: getattr(cfg, w) for _, w in methods.OBJECTIVES["rmu"]}
    assert methods.weighted_total("rmu", terms, weights).item() == pytest.approx(0.5 * 2.0 + 3 * 0.25)


def test_method_config_round_trips_and_aliases(tmp_path: Path) -> None:
    cfg = apply_overrides(get_preset("rmu"), ["rmu_layer=1", "rmu_trainable_layers=[0, 1]", "finetune=full",
                                              "rmu_steering_coeff=6.5", "seed=3"])
    assert (cfg.rmu_layer, cfg.rmu_trainable_layers, cfg.finetune) == (1, [0, 1], "full")
    assert UnlearnConfig.from_json(cfg.to_json()) == cfg and UnlearnConfig.from_yaml(cfg.to_yaml()) == cfg
    assert json.loads(cfg.to_json())["method"] == "rmu"
    assert apply_overrides(cfg, ["rmu_trainable_layers=0,1"]).rmu_trainable_layers == [0, 1]
    assert apply_overrides(cfg, ["rmu_trainable_layers=1"]).rmu_trainable_layers == [1]
    assert METHOD_ALIASES == {"idkdpo": "dpo"}
    assert apply_overrides(get_preset("zjuklab-model1"), ["method=idkdpo"]).method == "dpo"
    assert UnlearnConfig().method == "npo_gdr_klr" and UnlearnConfig().finetune == "lora"
    # a config written before methods existed (no method key) still means the paper's objective
    old = {k: v for k, v in get_preset("zjuklab-model2").to_dict().items() if k in UnlearnConfig.__dataclass_fields__
           and k not in ("method", "finetune", "forget_weight")}
    assert UnlearnConfig.from_dict(old).method == "npo_gdr_klr"


@pytest.mark.parametrize(
    "override, message",
    [("method=npo_kl", "method='npo_kl': must be one of npo_gdr_klr, grad_ascent"),
     ("finetune=qlora", "finetune"), ("simnpo_beta=0", "simnpo_beta"), ("forget_weight=-1", "forget_weight"),
     ("rmu_layer=-1", "rmu_layer"), ("rmu_trainable_layers=[a]", "rmu_trainable_layers"),
     ("rmu_trainable_layers=[0.5]", "rmu_trainable_layers"), ("rmu_steering_coeff=0", "rmu_steering_coeff"),
     ("undial_beta=-2", "undial_beta")],
)
def test_bad_method_settings_are_input_errors(override: str, message: str) -> None:
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        apply_overrides(get_preset("zjuklab-model1"), [override])


# -- one step of each method on a tiny model ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> dict:
    """The float64 OLMo, LoRA policy and byte-level tokenizer of test_unlearn_reference (with dropout)."""
    from test_unlearn_reference import FORGET, RETAIN, _base, _policy, _tokenizer

    tok = _tokenizer()
    base = _base("olmo", len(tok))
    frozen = copy.deepcopy(base).eval()
    return {"tok": tok, "frozen": frozen, "policy": _policy(base).eval(), "forget": FORGET[:2], "retain": RETAIN[:2]}


def _cfg(method: str, *more: str) -> UnlearnConfig:
    return apply_overrides(get_preset(METHOD_PRESETS[method]), [f"method={method}", "max_length=40", "retain_weight=0.7",
                                                                "forget_weight=1.3", *more])


def _alone(module, tok, rows, cfg, hidden_layer=None):  # noqa: ANN001, ANN202
    """One batch through `module` by itself: (logits, labels, layer-l hidden states or None)."""
    from umerge.unlearn.step import encode_batch

    b = encode_batch(tok, rows, cfg, "cpu")
    out = module(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False,
                 output_hidden_states=hidden_layer is not None)
    return out.logits, b["labels"], (out.hidden_states[hidden_layer + 1] if hidden_layer is not None else None)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "npo_gdr_klr"])
def test_step_terms_are_the_pure_functions_on_each_batch_alone(tiny: dict, method: str) -> None:
    """One joint forward, then split, gives each batch's own logits; the terms are the module's formulas."""
    from umerge.unlearn.step import step_terms

    tok, model, frozen = tiny["tok"], tiny["policy"], tiny["frozen"]
    cfg = _cfg(method, "rmu_steering_coeff=3.0")
    got = step_terms(model, None, tiny["forget"], tiny["retain"], tok, cfg)
    layer = 0 if method == "rmu" else None  # layer 0 of 2: hidden_states[1] is its output
    fz, fl, fh = _alone(model, tok, tiny["forget"], cfg, layer)
    rz, rl, rh = _alone(model, tok, tiny["retain"], cfg, layer)
    with torch.no_grad():
        ref_f, _, _ = _alone(frozen, tok, tiny["forget"], cfg)
        _, _, ref_rh = _alone(frozen, tok, tiny["retain"], cfg, layer)
    want: dict[str, torch.Tensor] = {}
    if method in ("grad_ascent", "grad_diff"):
        want["ga"] = methods.grad_ascent_loss(fz, fl)
    elif method == "npo":
        want["npo"] = losses.npo_loss(fz, ref_f, fl, cfg.beta, cfg.npo_reduction)
    elif method == "simnpo":
        want["simnpo"] = methods.simnpo_loss(fz, fl, cfg.simnpo_beta, cfg.simnpo_delta)
    elif method == "dpo":
        refusals = [{"input": r["input"], "output": methods.refusal_for(r["input"], cfg.seed)} for r in tiny["forget"]]
        pz, pl, _ = _alone(model, tok, refusals, cfg)
        with torch.no_grad():
            pref_ref, _, _ = _alone(frozen, tok, refusals, cfg)
        want["dpo"] = methods.dpo_loss(pz, pref_ref, pl, fz, ref_f, fl, cfg.beta)
    elif method == "rmu":
        c = methods.rmu_control_vector(fh.shape[-1], cfg.rmu_steering_coeff, cfg.seed).to(torch.float64)
        want["rmu_forget"] = methods.activation_mse(fh, c, fl != -100)
        want["rmu_retain"] = methods.activation_mse(rh, ref_rh, rl != -100)
    elif method == "undial":
        want["undial"] = methods.undial_loss(fz, ref_f, fl, cfg.undial_beta)
    if method not in ("grad_ascent", "rmu"):
        want["retain_nll"] = losses.gdr_loss(rz, rl)
    for term, value in want.items():
        assert float(got[term]) == pytest.approx(float(value), rel=1e-9), term
    weights = {w: getattr(cfg, w) for _, w in methods.OBJECTIVES[method]}
    assert float(got["total"]) == pytest.approx(sum(weights[w] * float(got[n]) for n, w in methods.OBJECTIVES[method]),
                                                rel=1e-12)
    assert float(got["forget_nll"]) == pytest.approx(float(losses.answer_nll(fz, fl)), rel=1e-9)
    assert float(got["retain_nll"]) == pytest.approx(float(losses.gdr_loss(rz, rl)), rel=1e-9)
    assert ("forget_nll_ref" in got) == (method in ("npo", "dpo", "undial"))
    assert all(math.isfinite(float(v)) for v in got.values())
    assert got["total"].requires_grad
    # the same with a frozen copy as the reference (full fine-tuning's way)
    again = step_terms(model, frozen, tiny["forget"], tiny["retain"], tok, cfg)
    assert float(again["total"]) == pytest.approx(float(got["total"]), rel=1e-12)


def test_method_npo_is_the_npo_only_preset_bit_for_bit(tiny: dict) -> None:
    from umerge.unlearn.step import step_terms

    tok, model = tiny["tok"], tiny["policy"]
    grads = []
    totals = []
    for cfg in (apply_overrides(get_preset("npo-only"), ["max_length=40"]),
                apply_overrides(get_preset("npo-only"), ["max_length=40", "method=npo"])):
        model.zero_grad(set_to_none=True)
        terms = step_terms(model, None, tiny["forget"], tiny["retain"], tok, cfg)
        terms["total"].backward()
        totals.append(terms["total"].detach().clone())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    assert torch.equal(totals[0], totals[1])
    assert grads[0].keys() == grads[1].keys() and all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])


def test_reference_free_methods_never_run_the_reference(tiny: dict) -> None:
    from umerge.unlearn.step import step_terms

    class Forbidden(torch.nn.Module):
        def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
            raise AssertionError("the reference was run")

    plain = copy.deepcopy(tiny["frozen"])  # not a PEFT model: reference=None would need disable_adapter
    for method in ("grad_ascent", "grad_diff", "simnpo"):
        cfg = _cfg(method)
        step_terms(tiny["policy"], Forbidden(), tiny["forget"], tiny["retain"], tiny["tok"], cfg)
        step_terms(plain, None, tiny["forget"], tiny["retain"], tiny["tok"], cfg)
    with pytest.raises(InputError, match="PEFT model"):
        step_terms(plain, None, tiny["forget"], tiny["retain"], tiny["tok"], _cfg("undial"))


def test_rmu_gradient_reaches_only_the_steered_layer_and_below(tiny: dict) -> None:
    from umerge.unlearn.step import step_terms

    model = tiny["policy"]
    model.zero_grad(set_to_none=True)
    step_terms(model, None, tiny["forget"], tiny["retain"], tiny["tok"], _cfg("rmu", "rmu_layer=0"))["total"].backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    model.zero_grad(set_to_none=True)
    assert with_grad and all(".layers.0." in n for n in with_grad)
    with pytest.raises(InputError, match="not a layer of this model"):
        step_terms(model, None, tiny["forget"], tiny["retain"], tiny["tok"], _cfg("rmu", "rmu_layer=5"))


# -- the command line -----------------------------------------------------------------------------


def test_train_help_lists_every_method_and_a_bad_method_is_one_line_exit_2(tmp_path: Path) -> None:
    from conftest import run_umerge

    res = run_umerge(["train", "--help"])
    assert res.returncode == 0, res.stderr
    for name in [*METHODS, *METHOD_ALIASES]:
        assert name in res.stdout, name
    bad = run_umerge(["train", "--model", str(tmp_path), "--data", str(tmp_path), "-o", str(tmp_path / "o"),
                      "--method", "gradient_ascent"])
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("umerge: error: Invalid value for '--method'"), bad.stderr
    assert "grad_ascent" in lines[0] and not (tmp_path / "o").exists()
    both = run_umerge(["train", "--model", str(tmp_path), "--data", str(tmp_path), "-o", str(tmp_path / "o"),
                       "--method", "rmu", "--set", "method=npo"])
    assert both.returncode == 2 and both.stderr.strip() == "umerge: error: give --method or --set method=..., not both"


def test_presets_command_lists_every_preset_with_its_method() -> None:
    from conftest import run_umerge

    res = run_umerge(["presets"])
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert [line.split(":", 1)[0] for line in lines] == list(PRESETS)
    for line, name in zip(lines, PRESETS):
        assert f" method={get_preset(name).method} " in line
    assert lines[list(PRESETS).index("simnpo")].startswith(
        "simnpo: forget_weight=1.0 retain_weight=1.0 simnpo_beta=4.5 simnpo_delta=0.0 batch_size=1")
