"""Every unlearning method end to end on the demo's synthetic world, with LoRA and with full fine-tuning.

Setup (module fixture, about 15 s on one core): the demo world (`umerge.demo.world`, seed 0, two
documents per task and split), its first 8 forget and 8 retain question-answer rows, a byte-level
BPE tokenizer (512 tokens) trained on the world's text and a 172k-parameter OLMo
(`umerge.unlearn.tiny`), fine-tuned at max_length 64 until it has memorised the rows (answer NLL
~0.01 forget, ~0.04 retain): the recipe of test_unlearn_train.py on the demo's data.

Each method then runs from its own preset (`METHOD_PRESETS`) with these overrides: lr 1e-2, no
accumulation, no warmup, max_length 64, LoRA r 8 / alpha 8 (the demo's scaling), 8 epochs (64 steps;
3 epochs for grad_ascent and npo, which have no retain term and take the retain set with them if
run longer; at these sizes the two follow the same path, NPO's weight 2 sigmoid(-beta (L - L_ref))
staying near 1). Bounds, each with the value measured at seed 42 on the 2-core dev machine (and, not run
here, seeds 1 and 2), answer NLLs in nats per token:

| method | forget NLL after (bound) | retain NLL after (bound) |
|---|---|---|
| grad_ascent, npo | 4.50 (rise >= 3; seeds 1, 2: 3.87, 6.26) | 2.61, below the forget NLL by >= 0.5 (1.59, 5.33) |
| grad_diff | 6.49 (rise >= 2; 2.77, 19.4) | 0.58 (<= 1.0; 0.08, 0.13) |
| simnpo | 1.93 (rise >= 0.5; 0.79, 3.52) | 0.06 (<= 0.5; 0.05, 0.05) |
| dpo | 0.37 (rise >= 0.15; 0.06, 0.32) | 0.05 (<= 0.5) |
| rmu | 2.37 (rise >= 0.3; 0.53, 2.82) | 0.05 (<= 0.5; 0.05, 0.05) |
| undial | 3.49 (rise >= 1.5; 3.27, 2.50) | 3.40 (<= ln 512 = 6.24, uniform guessing; 3.45, 2.12) |

DPO's own score is its loss, the preference of the refusal over the forget answer against the
reference: ln 2 at the first step, a mean of 0.0017 over the last epoch (0.0023, 0.0031; bound
0.05), even where the forget answer's NLL rose little (seed 1). (The refusals' own NLL falls too,
10.4 -> 7.1 nats per token, but rmu and undial lower it as much, so it is not checked.) RMU's is
its forget term: the forget hidden states' MSE to c*u falls below half its start. Every run: every step's loss and terms finite, the
loss the weighted sum of the logged terms.

Full fine-tuning (finetune=full, lr 1e-3): npo with the retain NLL (weight 1) beside a frozen copy
(forget 0.01 -> 5.44, retain 0.04 -> 0.22 at seed 42; bounds rise >= 2, retain <= 1.0), rmu (only
layer 0's weights change), and a resume after a crash that ends on the same weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from safetensors.torch import load_file  # noqa: E402

from umerge.cli import main as cli_main  # noqa: E402
from umerge.unlearn import batch_nll, finetune, load_task_data, train  # noqa: E402
from umerge.unlearn.data import write_jsonl  # noqa: E402
from umerge.unlearn.methods import OBJECTIVES, refusal_for  # noqa: E402
from umerge.unlearn.presets import METHOD_PRESETS  # noqa: E402

pytestmark = pytest.mark.train

ML = 64
N_ROWS = 8
LORA = ["lr=1e-2", "grad_accum=1", "warmup_epochs=0", f"max_length={ML}", "lora_r=8", "lora_alpha=8"]
FULL = ["lr=1e-3", "grad_accum=1", "warmup_epochs=0", f"max_length={ML}", "finetune=full"]
EPOCHS = {"grad_ascent": 3, "npo": 3}  # the others: 8
#: method -> (least rise of the forget NLL, most retain NLL after; None: below the forget NLL by 0.5)
BOUNDS = {"grad_ascent": (3.0, None), "npo": (3.0, None), "grad_diff": (2.0, 1.0), "simnpo": (0.5, 0.5),
          "dpo": (0.15, 0.5), "rmu": (0.3, 0.5), "undial": (1.5, math.log(512))}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread (as test_unlearn_train.py: these models lose time to a second one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(one_thread: None, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from umerge.demo.world import WorldConfig, generate_world, write_world
    from umerge.unlearn.tiny import build_tiny_olmo, save_model, train_byte_bpe_tokenizer

    root = tmp_path_factory.mktemp("methods")
    w = generate_world(WorldConfig(seed=0, docs_per_task=2, nonmember_docs_per_task=1))
    full = load_task_data(write_world(w, root / "world"))
    forget = [r for r in full.forget if "qa" in r.id][:N_ROWS]
    retain = [r for r in full.retain if "qa" in r.id][:N_ROWS]
    write_jsonl(forget, root / "data" / "forget.jsonl")
    write_jsonl(retain, root / "data" / "retain.jsonl")
    tok = train_byte_bpe_tokenizer(w.texts(), 512)
    save_model(build_tiny_olmo(tok), tok, root / "base")
    finetune(root / "base", forget + retain, root / "vanilla", epochs=60, lr=1e-2, batch_size=8, max_length=ML,
             progress=False)
    vanilla = AutoModelForCausalLM.from_pretrained(str(root / "vanilla"))
    vtok = AutoTokenizer.from_pretrained(str(root / "vanilla"))
    refusals = [dataclasses.replace(r, output=refusal_for(r.input, 42)) for r in forget]
    before = {"forget": batch_nll(vanilla, vtok, forget, ML), "retain": batch_nll(vanilla, vtok, retain, ML),
              "refusal": batch_nll(vanilla, vtok, refusals, ML)}
    return {"root": root, "forget": forget, "retain": retain, "refusals": refusals, "tok": vtok, "before": before}


def _nlls(world: dict, model) -> dict[str, float]:  # noqa: ANN001
    return {k: batch_nll(model, world["tok"], world[k if k != "refusal" else "refusals"], ML)
            for k in ("forget", "retain", "refusal")}


def _steps(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if r["type"] == "step"]


def _check_log(out: Path, method: str) -> list[dict]:
    """Every step row: the loss and the method's terms finite, the loss their weighted sum."""
    steps = _steps(out)
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["method"] == method
    for r in steps:
        for term, _ in OBJECTIVES[method]:
            assert math.isfinite(r[term]), (term, r)
        for key in ("loss", "forget_nll", "retain_nll", "grad_norm"):
            assert math.isfinite(r[key]), (key, r)
        want = sum(cfg[w] * r[t] for t, w in OBJECTIVES[method])
        assert r["loss"] == pytest.approx(want, rel=1e-5, abs=1e-7)  # one micro-batch per step
    return steps


@pytest.mark.parametrize("method", list(BOUNDS))
def test_each_method_unlearns_with_lora(world: dict, method: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = world["root"]
    out = root / f"lora-{method}"
    epochs = EPOCHS.get(method, 8)
    if method == "simnpo":  # through the command line: --method alone starts from the method's preset
        args = ["train", "--model", str(root / "vanilla"), "--data", str(root / "data"), "--method", "simnpo",
                "-o", str(out), "--quiet", "--set", f"epochs={epochs}"]
        for o in LORA:
            args += ["--set", o]
        cli_main(args)
    else:
        train(root / "vanilla", root / "data", METHOD_PRESETS[method], out,
              overrides=[*LORA, f"epochs={epochs}", f"method={method}"], progress=False)
    steps = _check_log(out, method)
    assert len(steps) == epochs * N_ROWS  # batch 1, no accumulation
    assert json.loads((out / "train_config.json").read_text())["preset"] == METHOD_PRESETS[method]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(root / "vanilla")), str(out))
    after, before = _nlls(world, model), world["before"]
    print(f"\n{method}: forget {before['forget']:.3f} -> {after['forget']:.3f}, retain {before['retain']:.3f} -> "
          f"{after['retain']:.3f}, refusal {before['refusal']:.3f} -> {after['refusal']:.3f}")
    rise, most_retain = BOUNDS[method]
    assert after["forget"] - before["forget"] >= rise
    assert math.isfinite(after["retain"])
    if most_retain is None:
        assert after["retain"] <= after["forget"] - 0.5
    else:
        assert after["retain"] <= most_retain
    if method == "dpo":  # the refusal is now preferred over the forget answer, against the reference
        assert steps[0]["dpo"] == pytest.approx(math.log(2), rel=1e-6)
        assert sum(r["dpo"] for r in steps[-N_ROWS:]) / N_ROWS < 0.05
    if method == "rmu":
        assert steps[-1]["rmu_forget"] < steps[0]["rmu_forget"] / 2
        adapter_cfg = json.loads((out / "adapter_config.json").read_text())
        assert adapter_cfg["layers_to_transform"] == [0]  # rmu_layer None on 2 layers: layer 0 alone
        keys = load_file(str(out / "adapter_model.safetensors"))
        assert keys and all(".layers.0." in k for k in keys)


def test_full_finetuning_with_a_frozen_reference(world: dict) -> None:
    from transformers import AutoModelForCausalLM

    from conftest import tree_digest

    root = world["root"]
    out = root / "full-npo"
    vanilla_files = tree_digest(root / "vanilla")
    train(root / "vanilla", root / "data", "npo-only", out,
          overrides=[*FULL, "epochs=8", "method=npo", "retain_weight=1.0"], progress=False)
    assert tree_digest(root / "vanilla") == vanilla_files  # the starting model on disk is untouched
    steps = _check_log(out, "npo")
    assert steps[0]["npo"] == pytest.approx(20 * math.log(2), rel=1e-4)  # the reference is the start
    # the frozen copy stays the memorised start while the model moves away from it
    assert max(r["forget_nll_ref"] for r in steps) < 0.1 and steps[-1]["forget_nll"] > 1.0
    for d in (out, out / "epoch-3"):  # whole models with their tokenizer, no adapter
        assert (d / "model.safetensors").is_file() and (d / "tokenizer.json").is_file()
        assert not (d / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(str(out))
    after, before = _nlls(world, model), world["before"]
    print(f"\nfull npo: forget {before['forget']:.3f} -> {after['forget']:.3f}, retain {before['retain']:.3f} -> "
          f"{after['retain']:.3f}")
    assert after["forget"] - before["forget"] >= 2.0
    assert after["retain"] <= 1.0
    start, end = load_file(str(root / "vanilla" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(not torch.equal(start[k], end[k]) for k in start if "layers" in k)  # every layer's weights trained


def test_full_finetuning_rmu_trains_only_its_layer(world: dict) -> None:
    root = world["root"]
    out = root / "full-rmu"
    train(root / "vanilla", root / "data", "rmu", out, overrides=[*FULL, "epochs=4"], progress=False)
    steps = _check_log(out, "rmu")
    assert steps[-1]["rmu_forget"] < steps[0]["rmu_forget"]
    start, end = load_file(str(root / "vanilla" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    changed = {k for k in start if not torch.equal(start[k], end[k])}
    assert changed and all(k.startswith("model.layers.0.") for k in changed)
    assert {k for k in start if k.startswith("model.layers.0.") and k.endswith("proj.weight")} <= changed


def test_full_finetuning_resumes_to_the_same_weights(world: dict) -> None:
    root = world["root"]
    over = [*FULL, "epochs=2", "method=npo", "retain_weight=1.0", "max_forget_rows=4", "max_retain_rows=4"]
    train(root / "vanilla", root / "data", "npo-only", root / "resume-full", overrides=over, progress=False)

    def crash(model, tokenizer, epoch):  # noqa: ANN001
        if epoch == 1:
            raise KeyboardInterrupt
        return {}

    with pytest.raises(KeyboardInterrupt):
        train(root / "vanilla", root / "data", "npo-only", root / "resume-cut", overrides=over, eval_hook=crash,
              progress=False)
    assert (root / "resume-cut" / "epoch-1" / "trainer_state.pt").is_file()
    resumed = train(root / "vanilla", root / "data", "npo-only", root / "resume-cut", overrides=over, progress=False,
                    resume=True)
    assert resumed.resumed_from_epoch == 1 and resumed.steps == 8
    a = load_file(str(root / "resume-full" / "model.safetensors"))
    b = load_file(str(root / "resume-cut" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    # the reference after resuming is still the starting model: NPO's first step of epoch 2 sees the
    # same forget NLL under it in both runs
    ref_full = [r["forget_nll_ref"] for r in _steps(root / "resume-full")]
    ref_cut = [r["forget_nll_ref"] for r in _steps(root / "resume-cut")]
    assert ref_cut == pytest.approx(ref_full, rel=1e-6)
