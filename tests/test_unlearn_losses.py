"""Unlearning losses against hand-computed values, numpy float64 references, and the config mapping.

Expected values are written out from the published formulas (NPO: Zhang et al. 2024, eq. 3; KL as
sum_v p_ref log(p_ref / p_theta)), never produced by the code under test.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from umerge.errors import InputError
from umerge.unlearn.presets import UnlearnConfig, apply_overrides, get_preset, resolve_config

torch = pytest.importorskip("torch")
from umerge.unlearn import losses  # noqa: E402  (needs torch)

pytestmark = pytest.mark.train

LN2, LN4 = math.log(2.0), math.log(4.0)


def logits_from_probs(rows: list[list[list[float]]]) -> "torch.Tensor":
    """Logits whose softmax is exactly the given probabilities (log p; softmax(log p) = p)."""
    return torch.log(torch.tensor(rows, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# NLL with the causal shift and masking


def test_answer_nll_shift_and_mask_by_hand() -> None:
    # One sequence, T=3, V=3. Position 0 predicts labels[1], position 1 predicts labels[2];
    # the last position predicts nothing. labels[0] is never predicted.
    logits = logits_from_probs([[[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [1 / 3, 1 / 3, 1 / 3]]])
    labels = torch.tensor([[-100, 1, 2]])
    # -log p0(1) = ln 4, -log p1(2) = ln 4
    assert losses.answer_nll(logits, labels, "mean").item() == pytest.approx(LN4, abs=1e-12)
    labels = torch.tensor([[-100, 0, -100]])  # only position 0, token 0: -ln 0.5
    assert losses.answer_nll(logits, labels, "mean").item() == pytest.approx(LN2, abs=1e-12)
    assert losses.answer_nll(logits, labels, "sum").tolist() == pytest.approx([LN2], abs=1e-12)


def test_answer_nll_batch_mean_versus_per_sequence_sum() -> None:
    # Two sequences: the first has 2 answer tokens (ln2 + ln4), the second 1 answer token (ln4).
    p = [[0.5, 0.25, 0.25], [0.25, 0.25, 0.5], [1 / 3, 1 / 3, 1 / 3]]
    logits = logits_from_probs([p, p])
    labels = torch.tensor([[-100, 0, 1], [-100, -100, 1]])
    # mean over all 3 answer tokens of the batch (not the mean of per-sequence means)
    assert losses.answer_nll(logits, labels, "mean").item() == pytest.approx((LN2 + LN4 + LN4) / 3, abs=1e-12)
    assert losses.answer_nll(logits, labels, "sum").tolist() == pytest.approx([LN2 + LN4, LN4], abs=1e-12)
    assert losses.answer_nll(logits, labels, "mean_per_sequence").tolist() == pytest.approx(
        [(LN2 + LN4) / 2, LN4], abs=1e-12
    )


def test_gdr_is_mean_answer_nll() -> None:
    logits = logits_from_probs([[[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.2, 0.2, 0.6]]])
    labels = torch.tensor([[5, 1, 1]])  # labels[0] never counts (nothing predicts it)
    assert losses.gdr_loss(logits, labels).item() == pytest.approx((LN4 + LN2) / 2, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# NPO


def npo_by_hand(nll_theta: float, nll_ref: float, beta: float = 0.1) -> float:
    """-(2/beta) * log(sigmoid(beta * (nll_theta - nll_ref))), written out."""
    z = beta * (nll_theta - nll_ref)
    return -(2.0 / beta) * math.log(1.0 / (1.0 + math.exp(-z)))


def test_npo_at_reference_is_20_ln2_and_gradient_is_minus_one() -> None:
    nll = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    out = losses.npo_from_nll(nll, torch.tensor(1.7, dtype=torch.float64), beta=0.1)
    assert out.item() == pytest.approx(20 * LN2, abs=1e-12)  # (2/beta) ln 2
    out.backward()
    assert nll.grad.item() == pytest.approx(-1.0, abs=1e-12)  # -2 * sigmoid(0)


def test_npo_gradient_fades_with_distance() -> None:
    # d/dx [-(2/b) log sigmoid(b (x - r))] = -2 sigmoid(-b (x - r))
    x = torch.tensor(13.0, dtype=torch.float64, requires_grad=True)
    losses.npo_from_nll(x, torch.tensor(3.0, dtype=torch.float64), beta=0.1).backward()
    assert x.grad.item() == pytest.approx(-2.0 / (1.0 + math.exp(1.0)), abs=1e-12)


def test_npo_two_reductions_by_hand() -> None:
    # Forget batch of two sequences; policy and reference distributions differ per position.
    pol = [
        [[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [1 / 3, 1 / 3, 1 / 3]],
        [[0.25, 0.25, 0.5], [0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]],
    ]
    ref = [
        [[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]],
        [[0.1, 0.1, 0.8], [0.6, 0.2, 0.2], [1 / 3, 1 / 3, 1 / 3]],
    ]
    labels = torch.tensor([[-100, 0, 1], [-100, -100, 0]])
    lp, lr_ = logits_from_probs(pol), logits_from_probs(ref)
    # per-sequence summed NLLs
    th = [-math.log(0.5) - math.log(0.5), -math.log(0.5)]
    rf = [-math.log(0.8) - math.log(0.8), -math.log(0.6)]
    # "mean": one term from the batch means over the 3 answer tokens (reference code)
    want_mean = npo_by_hand(sum(th) / 3, sum(rf) / 3)
    # "sum": a term per sequence from the summed NLLs, averaged (NPO paper)
    want_sum = (npo_by_hand(th[0], rf[0]) + npo_by_hand(th[1], rf[1])) / 2
    assert losses.npo_loss(lp, lr_, labels, 0.1, "mean").item() == pytest.approx(want_mean, abs=1e-10)
    assert losses.npo_loss(lp, lr_, labels, 0.1, "sum").item() == pytest.approx(want_sum, abs=1e-10)
    assert want_mean != pytest.approx(want_sum, abs=1e-3)  # the two options really differ here


def test_npo_reference_gets_no_gradient() -> None:
    lp = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    lr_ = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[-100, 1, 2, 3], [-100, -100, 4, 0]])
    losses.npo_loss(lp, lr_, labels).backward()
    assert lr_.grad is None
    assert lp.grad is not None and lp.grad.abs().sum() > 0


def test_npo_against_numpy_on_random_logits() -> None:
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(3, 6, 7, generator=g, dtype=torch.float64)
    lr_ = torch.randn(3, 6, 7, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 7, (3, 6), generator=g)
    labels[:, :2] = -100
    labels[2, 4:] = -100

    def np_seq_nll(logits: np.ndarray, lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z = logits - logits.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        s, n = np.zeros(logits.shape[0]), np.zeros(logits.shape[0])
        for b in range(logits.shape[0]):
            for t in range(logits.shape[1] - 1):
                y = lab[b, t + 1]
                if y != -100:
                    s[b] -= logp[b, t, y]
                    n[b] += 1
        return s, n

    st, n = np_seq_nll(lp.numpy(), labels.numpy())
    sr, _ = np_seq_nll(lr_.numpy(), labels.numpy())
    f = lambda x, r: -(2 / 0.1) * np.log(1 / (1 + np.exp(-0.1 * (x - r))))  # noqa: E731
    assert losses.npo_loss(lp, lr_, labels, 0.1, "mean").item() == pytest.approx(f(st.sum() / n.sum(), sr.sum() / n.sum()), rel=1e-12)
    assert losses.npo_loss(lp, lr_, labels, 0.1, "sum").item() == pytest.approx(f(st, sr).mean(), rel=1e-12)


# ----------------------------------------------------------------------------------------------
# KL to the reference


def test_kl_direction_is_ref_to_theta() -> None:
    # One position: p_ref = (0.5, 0.5), p_theta = (0.9, 0.1)
    theta = logits_from_probs([[[0.9, 0.1]]])
    ref = logits_from_probs([[[0.5, 0.5]]])
    forward = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # KL(ref || theta) = 0.5108
    reverse = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)  # KL(theta || ref) = 0.3681
    got = losses.kl_to_reference(theta, ref, torch.ones(1, 1), "real_mean").item()
    assert got == pytest.approx(forward, abs=1e-12)
    assert got != pytest.approx(reverse, abs=1e-3)


def test_kl_reductions_by_hand() -> None:
    # B=2, T=3, max_length 5; KL per position written by hand. Sequence 1's last column is padding.
    ref_p = [0.5, 0.5]
    th = [[[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]], [[0.6, 0.4], [0.1, 0.9], [0.5, 0.3 + 0.2]]]
    theta = logits_from_probs(th)
    ref = logits_from_probs([[ref_p] * 3, [ref_p] * 3])

    def kl(q: list[float]) -> float:
        return sum(p * math.log(p / qq) for p, qq in zip(ref_p, q))

    per = [[kl(q) for q in row] for row in th]
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # sequence 0: positions 0 and 1 predict answer tokens; sequence 1: only position 1.
    labels = torch.tensor([[-100, 1, 0], [-100, -100, 1]])
    real = per[0][0] + per[0][1] + per[0][2] + per[1][0] + per[1][1]
    got = {r: losses.kl_to_reference(theta, ref, mask, r, max_length=5, labels=labels).item()
           for r in losses.KL_REDUCTIONS}
    assert got["reference"] == pytest.approx(real / (2 * 5), abs=1e-12)  # B * max_length
    assert got["real_mean"] == pytest.approx(real / 5, abs=1e-12)  # five real positions
    assert got["answer_mean"] == pytest.approx((per[0][0] + per[0][1] + per[1][1]) / 3, abs=1e-12)
    with pytest.raises(ValueError, match="max_length"):
        losses.kl_to_reference(theta, ref, mask, "reference", max_length=2)
    with pytest.raises(ValueError, match="labels"):
        losses.kl_to_reference(theta, ref, mask, "answer_mean")
    with pytest.raises(ValueError, match="unknown KL reduction"):
        losses.kl_to_reference(theta, ref, mask, "all")


def test_kl_reference_equals_kl_div_batchmean_over_left_padding_to_max_length() -> None:
    # The reference code's formulation: left-pad to max_length, kl_div(log p_theta, log p_ref,
    # batchmean, log_target) on (B * max_length, V). Pad positions given identical logits under both
    # models (zero KL, as a zero pad embedding gives) must make it equal to our unpadded "reference".
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 5, 11, generator=g, dtype=torch.float64)
    b = torch.randn(2, 5, 11, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 5, dtype=torch.long)
    assert losses.kl_to_reference(a, a.clone(), mask, "reference", max_length=5).item() == pytest.approx(0.0, abs=1e-12)
    max_length = 9
    pad = torch.zeros(2, max_length - 5, 11, dtype=torch.float64)
    ref_code = torch.nn.functional.kl_div(
        torch.log_softmax(torch.cat([pad, a], 1), -1).view(-1, 11),
        torch.log_softmax(torch.cat([pad, b], 1), -1).view(-1, 11),
        reduction="batchmean", log_target=True,
    )
    got = losses.kl_to_reference(a, b, mask, "reference", max_length=max_length).item()
    assert got == pytest.approx(ref_code.item(), rel=1e-12)


# ----------------------------------------------------------------------------------------------
# The total and the weight names


def test_total_weights() -> None:
    t = losses.total_loss(torch.tensor(2.0), torch.tensor(3.0), torch.tensor(5.0), 0.4, 0.4, 0.2)
    assert t.item() == pytest.approx(0.4 * 2 + 0.4 * 3 + 0.2 * 5)


def test_alias_mapping_is_ga_npo_gd_kl_gk_retain() -> None:
    assert losses.LOSS_WEIGHT_ALIASES == {"ga_ratio": "npo_weight", "gd_ratio": "kl_weight", "gk_ratio": "retain_weight"}
    cfg = UnlearnConfig.from_dict({"ga_ratio": 0.7, "gd_ratio": 0.2, "gk_ratio": 0.1})
    assert (cfg.npo_weight, cfg.kl_weight, cfg.retain_weight) == (0.7, 0.2, 0.1)
    cfg = apply_overrides(get_preset("zjuklab-model1"), ["gd_ratio=0.9"])
    assert cfg.kl_weight == 0.9 and cfg.npo_weight == 0.4 and cfg.retain_weight == 0.2
    with pytest.raises(InputError, match="alias"):
        UnlearnConfig.from_dict({"ga_ratio": 0.7, "npo_weight": 0.3})


# ----------------------------------------------------------------------------------------------
# Presets and config


def test_presets_match_the_paper() -> None:
    common = dict(grad_accum=4, epochs=5, lr=1e-4, max_length=256, weight_decay=0.01, seed=42, lora_r=32,
                  lora_alpha=32, lora_dropout=0.05, warmup_epochs=1.0, beta=0.1, lora_targets=None,
                  npo_reduction="mean", kl_reduction="reference", prompt_fraction=0.8, pairing="fixed")
    for name, (npo, kl, ret, bs) in {"zjuklab-model1": (0.4, 0.4, 0.2, 1), "zjuklab-model2": (0.3, 0.3, 0.4, 2)}.items():
        cfg = get_preset(name)
        assert (cfg.npo_weight, cfg.kl_weight, cfg.retain_weight, cfg.batch_size) == (npo, kl, ret, bs)
        for key, value in common.items():
            assert getattr(cfg, key) == value, (name, key)
    with pytest.raises(InputError, match="unknown preset"):
        get_preset("zjuklab-model3")


def test_config_round_trips_json_and_yaml(tmp_path) -> None:
    cfg = apply_overrides(get_preset("zjuklab-model2"), ["epochs=3", "lr=3e-4", "lora_targets=[q_proj, v_proj]",
                                                           "max_grad_norm=null", "gradient_checkpointing=true"])
    assert cfg.epochs == 3 and cfg.lr == 3e-4 and cfg.lora_targets == ["q_proj", "v_proj"]
    assert cfg.max_grad_norm is None and cfg.gradient_checkpointing is True
    assert UnlearnConfig.from_json(cfg.to_json()) == cfg
    assert UnlearnConfig.from_yaml(cfg.to_yaml()) == cfg
    cfg.to_yaml(tmp_path / "c.yaml")
    cfg.to_json(tmp_path / "c.json")
    assert resolve_config(str(tmp_path / "c.yaml")) == cfg
    assert resolve_config(tmp_path / "c.json", ["epochs=1"]).epochs == 1
    assert json.loads(cfg.to_json())["npo_weight"] == 0.3


@pytest.mark.parametrize(
    "override, message",
    [
        ("epochs=two", "epochs"),
        ("epochs=1.5", "epochs"),
        ("nonsense=1", "unknown config key"),
        ("lr=0", "lr"),
        ("npo_reduction=median", "npo_reduction"),
        ("kl_reduction=all", "kl_reduction"),
        ("kl_positions=all", "replaced by kl_reduction"),
        ("pad_to_max_length=true", "no longer supported"),
        ("epochs", "key=value"),
    ],
)
def test_bad_overrides_are_input_errors(override: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        apply_overrides(get_preset("zjuklab-model1"), [override])
