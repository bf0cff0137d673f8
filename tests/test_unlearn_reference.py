"""The unlearning step against the ZJUKLAB reference trainer, re-implemented here from its description.

The reference (zjunlp/unlearn, semeval25: its QADataset and IterativeUnlearner.compute_loss) does:
- encoding: prompt with the tokenizer's defaults, cut to its last int(0.8 * max_len) tokens; answer
  without special tokens, then eos; labels -100 on the prompt; every example LEFT-padded with the
  pad token to max_len (attention mask 0, labels -100 there), then cut to max_len;
- a separate, frozen copy of the starting model in eval mode as the reference;
- forget and retain batches through the model separately;
- NPO: -(2 / beta) * mean(logsigmoid(beta * (L_f - L_f_ref))), L = its get_batch_loss (the mean token
  cross-entropy over the batch's answer tokens), beta = 0.1;
- retain NLL: the model's own loss (the Hugging Face causal-LM loss);
- KL: kl_div(log_softmax(retain logits), log_softmax(reference retain logits), batchmean,
  log_target=True) on the (B * max_len, V) flattening;
- loss = ga_ratio * NPO + gd_ratio * KL + gk_ratio * retain NLL.

Nothing below calls umerge's loss code: the reference is written out with torch alone. Models run in
float64, so that what is compared is the definition, not float32 rounding of two layouts (left
padding to max_len there, right padding to the batch's width here).
"""

from __future__ import annotations

import copy
import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
F = torch.nn.functional

from umerge.unlearn import get_preset  # noqa: E402
from umerge.unlearn.step import step_terms  # noqa: E402

MAX_LEN = 40
REL = 1e-6

FORGET = [
    {"input": "Who is Ada Brightwater?", "output": "Ada Brightwater is a glassblower from Lyon."},
    {"input": "Tell me the story of the lighthouse keeper who counted every wave of the winter storm, "
               "one by one, until morning came", "output": "He counted nine thousand."},
    {"input": "What is Ada's phone number?",
     "output": "Her phone number is 555-0142, and her email is ada@example.org, she answers on Mondays only."},
]
RETAIN = [
    {"input": "Where does Tom Vale live?", "output": "Tom Vale lives in Porto."},
    {"input": "Name the river.", "output": "The Douro."},
    {"input": "A long retain prompt about the orchard, its apple trees, pear trees and the old stone wall "
               "around it", "output": "Apples."},
]


def _tokenizer() -> "transformers.PreTrainedTokenizerFast":
    """A byte-level BPE that adds BOS by default (many tokenizers do; the demo's does not)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([r["input"] + r["output"] for r in FORGET + RETAIN], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")


def _base(kind: str, vocab: int, zero_pad_embedding: bool = True) -> "torch.nn.Module":
    """A tiny float64 causal LM with dropout. pad_token_id 0 gives the pad row of the embedding zero
    (padding_idx), as OLMo's config does; without it the pad embedding is random."""
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
                  attention_dropout=0.2, pad_token_id=0 if zero_pad_embedding else None, bos_token_id=1,
                  eos_token_id=2)
    torch.manual_seed(3)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.OlmoForCausalLM(transformers.OlmoConfig(**common))
    return model.to(torch.float64)


def _policy(base: "torch.nn.Module") -> "peft.PeftModel":
    """LoRA with dropout and a non-zero B (init_lora_weights=False), so the model differs from the reference."""
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, init_lora_weights=False,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    torch.manual_seed(4)
    model = peft.get_peft_model(base, cfg).to(torch.float64)
    with torch.no_grad():  # a clearly different model: NPO away from its starting value (2 / beta) log 2
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.mul_(4.0)
    return model


# -- the reference, written out -------------------------------------------------------------------


def _reference_batch(tok: "transformers.PreTrainedTokenizerFast", rows: list[dict], max_len: int) -> dict:
    max_q_len = int(max_len * 0.8)
    ids, masks, labels = [], [], []
    for r in rows:
        q = tok(r["input"])["input_ids"][-max_q_len:]
        a = tok(r["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seq, lab = q + a, [-100] * len(q) + a
        n_pad = max(0, max_len - len(seq))
        ids.append(([tok.pad_token_id] * n_pad + seq)[:max_len])
        masks.append(([0] * n_pad + [1] * len(seq))[:max_len])
        labels.append(([-100] * n_pad + lab)[:max_len])
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(masks), "labels": torch.tensor(labels)}


def _get_batch_loss(logits: "torch.Tensor", labels: "torch.Tensor") -> "torch.Tensor":
    v = logits.shape[-1]
    return F.cross_entropy(logits[..., :-1, :].reshape(-1, v), labels[..., 1:].reshape(-1), ignore_index=-100)


def _reference_terms(model, ref_model, tok, forget_rows, retain_rows, weights, max_len, beta=0.1) -> dict:
    xf, xr = _reference_batch(tok, forget_rows, max_len), _reference_batch(tok, retain_rows, max_len)
    out_f = model(xf["input_ids"], labels=xf["labels"], attention_mask=xf["attention_mask"])
    with torch.no_grad():
        out_f_ref = ref_model(xf["input_ids"], labels=xf["labels"], attention_mask=xf["attention_mask"])
    out_r = model(xr["input_ids"], labels=xr["labels"], attention_mask=xr["attention_mask"])
    with torch.no_grad():
        out_r_ref = ref_model(xr["input_ids"], labels=xr["labels"], attention_mask=xr["attention_mask"])
    v = out_r.logits.shape[-1]
    kl = F.kl_div(F.log_softmax(out_r.logits, -1).view(-1, v), F.log_softmax(out_r_ref.logits, -1).view(-1, v),
                  reduction="batchmean", log_target=True)
    lf, lf_ref = _get_batch_loss(out_f.logits, xf["labels"]), _get_batch_loss(out_f_ref.logits, xf["labels"])
    npo = -F.logsigmoid(beta * (lf - lf_ref)).mean() * 2 / beta
    ga, gd, gk = weights
    # The KL of the real positions alone: what is left when the pad positions carry none.
    per_pos = (F.softmax(out_r_ref.logits, -1) * (F.log_softmax(out_r_ref.logits, -1) - F.log_softmax(out_r.logits, -1))).sum(-1)
    kl_real = (per_pos * xr["attention_mask"]).sum() / per_pos.numel()
    return {"npo": npo, "kl": kl, "gdr": out_r.loss, "total": ga * npo + gd * kl + gk * out_r.loss,
            "kl_real": kl_real, "forget_nll_ref": lf_ref}


# -- the comparisons ------------------------------------------------------------------------------


def _config(preset: str) -> object:
    cfg = get_preset(preset)
    cfg.max_length = MAX_LEN
    return cfg


@pytest.fixture(scope="module")
def tok() -> "transformers.PreTrainedTokenizerFast":
    return _tokenizer()


def test_the_rows_exercise_truncation_and_bos(tok: "transformers.PreTrainedTokenizerFast") -> None:
    # Guards the fixture: a prompt beyond 0.8 * MAX_LEN (left cut), an answer past MAX_LEN (right cut),
    # padding in every batch, and a BOS that the tokenizer adds by default.
    lens = [(len(tok(r["input"])["input_ids"]), len(tok(r["output"], add_special_tokens=False)["input_ids"]))
            for r in FORGET + RETAIN]
    assert any(q > int(0.8 * MAX_LEN) for q, _ in lens)
    assert any(min(q, int(0.8 * MAX_LEN)) + a + 1 > MAX_LEN for q, a in lens)
    assert any(q + a + 1 < MAX_LEN for q, a in lens)
    assert tok("x")["input_ids"][0] == tok.bos_token_id


@pytest.mark.parametrize("kind", ["olmo", "llama"])
@pytest.mark.parametrize("preset, batch", [("zjuklab-model1", 1), ("zjuklab-model2", 2), ("zjuklab-model1", 3)])
@pytest.mark.parametrize("separate_reference", [False, True])
def test_step_terms_equal_the_reference_compute_loss(tok, kind: str, preset: str, batch: int,
                                                     separate_reference: bool) -> None:
    base = _base(kind, len(tok))
    frozen = copy.deepcopy(base).eval()
    model = _policy(base).eval()  # eval: the two implementations' dropout draws cannot be matched
    cfg = _config(preset)
    forget, retain = FORGET[:batch], RETAIN[:batch]
    want = _reference_terms(model, frozen, tok, forget, retain, (cfg.npo_weight, cfg.kl_weight, cfg.retain_weight),
                            MAX_LEN)
    got = step_terms(model, frozen if separate_reference else None, forget, retain, tok, cfg)
    assert float(want["kl"]) > 1e-3 and abs(float(want["npo"]) - 2 / 0.1 * math.log(2)) > 1e-2  # not trivial
    for term in ("npo", "kl", "gdr", "total", "forget_nll_ref"):
        assert float(got[term]) == pytest.approx(float(want[term]), rel=REL), term
    # Padding in the retain batch: dividing by its real positions or its padded width would differ.
    real = int(sum(_reference_batch(tok, retain, MAX_LEN)["attention_mask"].sum(1)))
    assert real < batch * MAX_LEN


def test_pad_positions_with_kl_are_left_out_and_the_gap_is_the_reference_padding_artefact(tok) -> None:
    """A Llama whose pad embedding is random gives pad positions non-zero KL in the reference's
    left-padded batch. Our "reference" reduction then equals the reference's real-position part,
    not its total: NPO and the retain NLL still agree (they never look at pad positions)."""
    base = _base("llama", len(tok), zero_pad_embedding=False)
    frozen = copy.deepcopy(base).eval()
    model = _policy(base).eval()
    cfg = _config("zjuklab-model1")
    want = _reference_terms(model, frozen, tok, FORGET[:2], RETAIN[:2], (0.4, 0.4, 0.2), MAX_LEN)
    got = step_terms(model, frozen, FORGET[:2], RETAIN[:2], tok, cfg)
    assert float(got["kl"]) == pytest.approx(float(want["kl_real"]), rel=REL)
    assert float(want["kl"]) > 1.05 * float(want["kl_real"])  # the artefact is there, and left out
    for term in ("npo", "gdr"):
        assert float(got[term]) == pytest.approx(float(want[term]), rel=REL), term


def test_the_reference_runs_in_eval_mode_whatever_the_model_mode(tok) -> None:
    """Dropout in the base model and in LoRA: the model in train mode gives a different forget NLL on
    every call, the reference must not (it is the starting model, as the reference's eval-mode copy)."""
    base = _base("olmo", len(tok))
    frozen = copy.deepcopy(base).eval()
    model = _policy(base).train()
    cfg = _config("zjuklab-model2")
    want = _reference_terms(model, frozen, tok, FORGET[:2], RETAIN[:2], (0.3, 0.3, 0.4), MAX_LEN)
    runs = [step_terms(model, None, FORGET[:2], RETAIN[:2], tok, cfg) for _ in range(2)]
    assert float(runs[0]["forget_nll"]) != float(runs[1]["forget_nll"])  # dropout is active in the model
    for r in runs:
        assert float(r["forget_nll_ref"]) == pytest.approx(float(want["forget_nll_ref"]), rel=REL)
    assert model.training and all(m.training for m in model.modules())  # modes restored


def test_step_terms_accepts_a_preset_name_or_a_dict_and_checks_its_rows(tok) -> None:
    from umerge.errors import InputError

    base = _base("olmo", len(tok))
    model = _policy(base).eval()
    by_name = step_terms(model, None, FORGET[:1], RETAIN[:1], tok, "zjuklab-model1")
    by_dict = step_terms(model, None, FORGET[:1], RETAIN[:1], tok,
                         {"npo_weight": 0.4, "kl_weight": 0.4, "retain_weight": 0.2, "batch_size": 1})
    assert float(by_name["total"]) == pytest.approx(float(by_dict["total"]), rel=1e-12)
    with pytest.raises(InputError, match="one retain row per forget row"):
        step_terms(model, None, FORGET[:2], RETAIN[:1], tok, "zjuklab-model1")
    with pytest.raises(InputError, match="'output'"):
        step_terms(model, None, [{"input": "x"}], RETAIN[:1], tok, "zjuklab-model1")
    with pytest.raises(InputError, match="PEFT model"):
        step_terms(base.eval(), None, FORGET[:1], RETAIN[:1], tok, "zjuklab-model1")
