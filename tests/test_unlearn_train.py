"""End to end on CPU: memorise a LUME subset with a tiny OLMo, then `umerge train` with each preset.

Setup (module fixture, a few seconds): the first 8 forget and 8 retain rows of LUME (read in place
from ../shared/data/lume), a byte-level BPE tokenizer (512 tokens) trained on them, a 172k-parameter
OLMo, fine-tuned at max_length 64 until the answer NLL is ~0.01 on both splits.

Unlearning runs each preset with its loss weights and batch size, and these overrides to fit a test:
epochs=5, lr=1.5e-2, grad_accum=1, warmup_epochs=0, max_length=64 (the paper's 1e-4 with 4-step
accumulation barely moves a model this small in a few dozen steps).

Stated bounds, checked for both presets:
- the forget answer NLL rises by at least 0.5 nat (from ~0.01);
- the retain answer NLL stays <= 2.0 nats (uniform guessing is ln 512 = 6.24) and rises by at most
  0.35 x the forget rise;
- model1 ends with the higher forget NLL and model2 with the lower retain NLL (the complementary pair).
Measured on the 2-core dev machine, seed 42: model1 forget 0.012 -> 10.98, retain 0.010 -> 0.91;
model2 forget 0.012 -> 1.62, retain 0.010 -> 0.08. Seeds 1-4 (not run here): model1 forget 10.8-11.5,
retain 0.52-1.07; model2 forget 0.88-5.10, retain 0.04-0.33 -- every bound above held for every seed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
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

pytestmark = pytest.mark.train

REPO = Path(__file__).resolve().parents[1]
ML = 64
N_ROWS = 8
EPOCHS = 5
OVERRIDES = [f"epochs={EPOCHS}", "lr=1.5e-2", "grad_accum=1", "warmup_epochs=0", f"max_length={ML}"]
LINEAR_NAMES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these models are too small to gain from two, and on a shared 2-core
    machine two spinning OpenMP threads made the file ~8x slower (measured: 229 s vs 29 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(one_thread: None, lume_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from umerge.unlearn.tiny import build_tiny_olmo, save_model, train_byte_bpe_tokenizer

    root = tmp_path_factory.mktemp("unlearn")
    data = load_task_data(lume_dir).head(N_ROWS, N_ROWS)
    write_jsonl(data.forget, root / "data" / "forget.jsonl")
    write_jsonl(data.retain, root / "data" / "retain.jsonl")
    tok = train_byte_bpe_tokenizer([r.input + " " + r.output for r in data.forget + data.retain], 512)
    model = build_tiny_olmo(tok)
    save_model(model, tok, root / "base")
    init = {s: batch_nll(model, tok, getattr(data, s), ML) for s in ("forget", "retain")}
    ft = finetune(root / "base", data, root / "vanilla", epochs=60, lr=1e-2, batch_size=8, max_length=ML, progress=False)
    vanilla = AutoModelForCausalLM.from_pretrained(str(root / "vanilla"))
    vtok = AutoTokenizer.from_pretrained(str(root / "vanilla"))
    before = {s: batch_nll(vanilla, vtok, getattr(data, s), ML) for s in ("forget", "retain")}
    return {"root": root, "data": data, "tok": vtok, "init": init, "before": before, "ft": ft}


def test_finetune_memorises_the_subset(world: dict) -> None:
    # A random 512-token model starts near ln 512 = 6.24 nats per token; memorised means ~0.
    assert world["init"]["forget"] > 5.0 and world["init"]["retain"] > 5.0
    assert world["before"]["forget"] < 0.1 and world["before"]["retain"] < 0.1
    losses = world["ft"].epoch_losses
    assert len(losses) == 60 and losses[-1] < losses[0] / 50
    assert (world["root"] / "vanilla" / "model.safetensors").is_file()


PRESETS = {"zjuklab-model1": 1, "zjuklab-model2": 2}  # preset -> its batch size


@pytest.fixture(scope="module")
def runs(world: dict) -> dict:
    """`umerge train` with each preset (in process, through the CLI entry point), and NLLs after."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, data = world["root"], world["data"]
    results = {}
    for preset in PRESETS:
        out = root / preset
        args = ["train", "--model", str(root / "vanilla"), "--data", str(root / "data"), "--preset", preset, "-o", str(out), "--quiet"]
        for o in OVERRIDES:
            args += ["--set", o]
        if preset == "zjuklab-model2":
            args.append("--gradient-checkpointing")
        else:
            args += ["--eval-nll-rows", str(N_ROWS)]
        cli_main(args)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(root / "vanilla")), str(out))
        after = {s: batch_nll(model, world["tok"], getattr(data, s), ML) for s in ("forget", "retain")}
        b = world["before"]
        print(f"\n{preset}: forget NLL {b['forget']:.3f} -> {after['forget']:.3f}, retain NLL {b['retain']:.3f} -> {after['retain']:.3f}")
        results[preset] = {"out": out, "after": after}
    return results


@pytest.mark.parametrize("preset", list(PRESETS))
def test_umerge_train_each_preset(world: dict, runs: dict, preset: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, data = world["root"], world["data"]
    out, after = runs[preset]["out"], runs[preset]["after"]
    batch_size = PRESETS[preset]

    # -- the log holds every optimizer step, with every term -----------------------------------
    steps_per_epoch = math.ceil(N_ROWS / batch_size)  # grad_accum=1
    total = steps_per_epoch * EPOCHS
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["type"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, total + 1))
    assert [r["epoch"] for r in steps] == [1 + (s - 1) // steps_per_epoch for s in range(1, total + 1)]
    for r in steps:
        for key in ("loss", "npo", "kl", "gdr", "lr", "grad_norm", "forget_nll"):
            assert math.isfinite(r[key]), (key, r)
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["batch_size"] == batch_size and cfg["preset"] == preset
    assert cfg["gradient_checkpointing"] is (preset == "zjuklab-model2")
    w = (cfg["npo_weight"], cfg["kl_weight"], cfg["retain_weight"])
    for r in steps:  # total = weighted sum of the logged terms (single micro-batch per step)
        assert r["loss"] == pytest.approx(w[0] * r["npo"] + w[1] * r["kl"] + w[2] * r["gdr"], rel=1e-5)
    # linear decay with no warmup (Hugging Face schedule): step k uses lr * (total - (k - 1)) / total
    assert [r["lr"] for r in steps] == pytest.approx([1.5e-2 * (total - k) / total for k in range(total)], rel=1e-9)
    # NPO starts at the reference: (2 / beta) ln 2 = 20 ln 2
    assert steps[0]["npo"] == pytest.approx(20 * math.log(2), rel=1e-4)

    evals = [r for r in rows if r["type"] == "eval"]
    if preset == "zjuklab-model1":  # per-epoch NLL curve from --eval-nll-rows, from epoch 0 (the start)
        assert [(e["epoch"], e["step"]) for e in evals] == [(k, k * steps_per_epoch) for k in range(0, EPOCHS + 1)]
        assert evals[0]["forget_nll"] == pytest.approx(world["before"]["forget"], rel=1e-4)  # the vanilla model
    else:
        assert evals == []

    # -- adapters: every epoch and the final one, loadable with PEFT -----------------------------
    for k in range(1, EPOCHS + 1):
        assert (out / f"epoch-{k}" / "adapter_model.safetensors").is_file()
        assert (out / f"epoch-{k}" / "trainer_state.pt").is_file() == (k == EPOCHS)
    final = load_file(str(out / "adapter_model.safetensors"))
    last = load_file(str(out / f"epoch-{EPOCHS}" / "adapter_model.safetensors"))
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert set(adapter_cfg["target_modules"]) == LINEAR_NAMES
    assert (adapter_cfg["r"], adapter_cfg["lora_alpha"], adapter_cfg["lora_dropout"]) == (32, 32, 0.05)
    assert not any("lm_head" in k for k in final)

    epoch1 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(root / "vanilla")), str(out / "epoch-1"))
    assert batch_nll(epoch1, world["tok"], data.forget, ML) != pytest.approx(after["forget"], rel=1e-3)

    # -- the effect --------------------------------------------------------------------------
    before = world["before"]
    rise_forget = after["forget"] - before["forget"]
    rise_retain = after["retain"] - before["retain"]
    assert rise_forget >= 0.5
    assert after["retain"] <= 2.0
    assert rise_retain <= 0.35 * rise_forget
    # the log's last forget NLL is the training view of the same thing
    assert steps[-1]["forget_nll"] > steps[0]["forget_nll"] + 0.5
    if evals:  # the last epoch's hook measured the final adapter on the same rows
        assert evals[-1]["forget_nll"] == pytest.approx(after["forget"], rel=1e-4)
        assert evals[-1]["retain_nll"] == pytest.approx(after["retain"], rel=1e-4)


def test_model1_forgets_more_and_model2_keeps_more(world: dict, runs: dict) -> None:
    """The paper's complementary pair: model1 pushes the forget NLL higher, model2 hurts retain less."""
    m1, m2 = runs["zjuklab-model1"]["after"], runs["zjuklab-model2"]["after"]
    assert m1["forget"] > m2["forget"]
    assert m1["retain"] > m2["retain"]


def test_resume_continues_exactly_and_eval_hook_is_logged(world: dict) -> None:
    root, data = world["root"], world["data"]
    over = ["epochs=2", "lr=1e-2", "grad_accum=2", f"max_length={ML}", "max_forget_rows=4", "max_retain_rows=4"]
    calls: list[int] = []

    def hook(model, tokenizer, epoch):  # noqa: ANN001
        calls.append(epoch)
        return {"forget_nll": batch_nll(model, tokenizer, data.forget[:4], ML)}

    full = train(root / "vanilla", data, "zjuklab-model1", root / "full", overrides=over, eval_hook=hook, progress=False)
    assert calls == [0, 1, 2] and full.steps == 4  # epoch 0: the starting model
    evals = [json.loads(x) for x in full.log_path.read_text().splitlines() if json.loads(x)["type"] == "eval"]
    assert [(e["epoch"], e["step"]) for e in evals] == [(0, 0), (1, 2), (2, 4)]
    assert all(math.isfinite(e["forget_nll"]) for e in evals)

    def crash(model, tokenizer, epoch):  # noqa: ANN001
        if epoch == 1:
            raise KeyboardInterrupt
        assert epoch == 0, "not reached"
        return {}

    with pytest.raises(KeyboardInterrupt):
        train(root / "vanilla", data, "zjuklab-model1", root / "cut", overrides=over, eval_hook=crash, progress=False)
    assert (root / "cut" / "epoch-1" / "trainer_state.pt").is_file() and not (root / "cut" / "epoch-2").exists()
    from umerge.errors import InputError

    with pytest.raises(InputError, match="not empty"):
        train(root / "vanilla", data, "zjuklab-model1", root / "cut", overrides=over, progress=False)
    with pytest.raises(InputError, match="cannot resume: lr was 0.01 in the saved run but is 0.02 now"):
        train(root / "vanilla", data, "zjuklab-model1", root / "cut", overrides=over + ["lr=2e-2"], progress=False, resume=True)
    resumed = train(root / "vanilla", data, "zjuklab-model1", root / "cut", overrides=over, progress=False, resume=True)
    assert resumed.resumed_from_epoch == 1 and resumed.steps == 4
    a = load_file(str(root / "full" / "adapter_model.safetensors"))
    b = load_file(str(root / "cut" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    rows_cut = [json.loads(x) for x in (root / "cut" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_cut if r["type"] == "step"] == [1, 2, 3, 4]
    assert [r["epoch"] for r in rows_cut if r["type"] == "eval"] == [0]  # epoch 0 logged once, kept on resume


def test_the_trainer_steps_on_step_terms(world: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every micro-batch's loss is `umerge.unlearn.step_terms` on the paired rows, and the log shows it."""
    import umerge.unlearn.trainer as trainer_module
    from umerge.unlearn import step_terms

    root, data = world["root"], world["data"]
    seen: list[tuple[list[str], list[str], float]] = []

    def spy(model, reference, forget_rows, retain_rows, tokenizer, config):  # noqa: ANN001
        terms = step_terms(model, reference, forget_rows, retain_rows, tokenizer, config)
        seen.append(([r.id for r in forget_rows], [r.id for r in retain_rows], float(terms["total"])))
        return terms

    monkeypatch.setattr(trainer_module, "step_terms", spy)
    over = ["epochs=1", "grad_accum=1", f"max_length={ML}", "max_forget_rows=4", "max_retain_rows=3"]
    res = train(root / "vanilla", data, "zjuklab-model2", root / "spied", overrides=over, progress=False)
    assert len(seen) == res.steps == 2  # 4 forget rows, batch 2, no accumulation
    forget_ids = [i for f, _, _ in seen for i in f]
    assert sorted(forget_ids) == sorted(r.id for r in data.forget[:4])
    index = {r.id: k for k, r in enumerate(data.forget[:4])}
    for f, r, _ in seen:  # fixed pairing: forget row i with retain row i mod 3
        assert r == [data.retain[index[i] % 3].id for i in f]
    logged = [json.loads(x)["loss"] for x in res.log_path.read_text().splitlines() if json.loads(x)["type"] == "step"]
    assert logged == pytest.approx([t for _, _, t in seen], rel=1e-6)


def test_cli_scores_each_task_from_epoch_0(world: dict) -> None:
    """`--eval-score-rows`: the task's metrics per task and split at epoch 0 and after each epoch."""
    root = world["root"]
    out = root / "scored"
    cli_main(["train", "--model", str(root / "vanilla"), "--data", str(root / "data"), "--preset", "npo-only",
              "-o", str(out), "--quiet", "--eval-score-rows", "2", "--set", "epochs=2", "--set", "grad_accum=1",
              "--set", f"max_length={ML}", "--set", "max_forget_rows=2", "--set", "max_retain_rows=2"])
    evals = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines() if json.loads(x)["type"] == "eval"]
    assert [e["epoch"] for e in evals] == [0, 1, 2]
    keys = {k for k in evals[0] if k.count("/") == 2}
    assert keys and {k.split("/")[0] for k in keys} == {"forget", "retain"}
    assert {k.split("/")[2] for k in keys} == {"regurgitation", "knowledge"}
    with pytest.raises(SystemExit) as exc:
        cli_main(["train", "--model", str(root / "vanilla"), "--data", str(root / "data"), "-o", str(root / "x"),
                  "--eval-score-rows", "2", "--eval-nll-rows", "2"])
    assert exc.value.code != 0


def test_presets_command_lists_both() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "from umerge.cli import main; main()", "presets"],
        capture_output=True, text=True, env={"PYTHONPATH": str(REPO / "python"), "PATH": "/usr/bin:/bin"}, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("zjuklab-model1: npo_weight=0.4 kl_weight=0.4 retain_weight=0.2 batch_size=1")
    assert lines[1].startswith("zjuklab-model2: npo_weight=0.3 kl_weight=0.3 retain_weight=0.4 batch_size=2")
    assert lines[2].startswith("npo-only: npo_weight=1.0 kl_weight=0.0 retain_weight=0.0 batch_size=1")


@pytest.mark.slow
def test_two_processes_through_torchrun_share_the_data(world: dict) -> None:
    """DDP on CPU (gloo) with 2 processes: each sees half the forget rows, one log, one adapter."""
    import os
    import shutil

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    root = world["root"]
    out = root / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "python")}
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "umerge.cli.train", "--model", str(root / "vanilla"),
           "--data", str(root / "data"), "--preset", "zjuklab-model1", "-o", str(out), "--quiet",
           "--set", "epochs=1", "--set", "grad_accum=1", "--set", f"max_length={ML}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("umerge: trained 4 steps") == 1  # 8 rows / 2 processes, batch 1; printed once
    steps = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert (out / "adapter_model.safetensors").is_file() and (out / "epoch-1" / "trainer_state.pt").is_file()


def test_tiny_builders_round_trip(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from umerge.unlearn.tiny import build_tiny_olmo, save_model, train_byte_bpe_tokenizer

    texts = ["Sherry painted the city of Madera.", "Margaretha solved equations; Lindsey led.", "Odilia cared for animals."] * 5
    tok = train_byte_bpe_tokenizer(texts, 300, save_dir=tmp_path / "tok")
    again = train_byte_bpe_tokenizer(texts, 300)
    assert tok.get_vocab() == again.get_vocab()  # deterministic
    assert len(tok) == 300 and tok.eos_token == tok.pad_token == tok.bos_token == "<|endoftext|>"
    odd = "Zoë's SSN: 123-45-6789 ☃ \t naïve"  # bytes never seen in training still encode (byte level)
    ids = tok(odd, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == odd and tok.eos_token_id not in ids
    model = build_tiny_olmo(tok)
    # 2 x V x H embeddings + L x (4 H^2 attention + 3 H I MLP), no biases, parameter-free norms
    assert sum(p.numel() for p in model.parameters()) == 2 * 300 * 64 + 2 * (4 * 64 * 64 + 3 * 64 * 192)
    save_model(model, tok, tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))
    assert type(loaded).__name__ == "OlmoForCausalLM"
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) and sd2[k].dtype == torch.float32 for k in sd)
    assert AutoTokenizer.from_pretrained(str(tmp_path / "m"))(odd, add_special_tokens=False)["input_ids"] == ids
    assert torch.equal(build_tiny_olmo(tok, seed=0).lm_head.weight, model.lm_head.weight)
    assert not torch.equal(build_tiny_olmo(tok, seed=1).lm_head.weight, model.lm_head.weight)
