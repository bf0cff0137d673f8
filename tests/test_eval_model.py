"""End-to-end evaluation of a tiny OLMo on the CPU, and its parts against plain transformers calls.

References are computed here one row at a time with transformers directly: `model.generate` on a
single unpadded prompt, `model(ids, labels=ids).loss` for the MIA loss (what the official scorer
does), the MMLU prompt written out by hand and scored by the log-probability of each answer.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from umerge.evaluate import epoch_eval_hook, evaluate, score_only  # noqa: E402
from umerge.evaluate.generate import generate  # noqa: E402
from umerge.evaluate.mia import document_losses  # noqa: E402
from umerge.evaluate.mmlu import mmlu_accuracy  # noqa: E402

pytestmark = pytest.mark.train

NAMES = ["Sherry", "Odilia", "Lindsey", "Margaretha", "Tobias", "Ines"]
CITIES = ["Madera", "Lisbon", "Tartu", "Quito", "Hobart", "Oulu"]


def synthetic_rows() -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {"forget": [], "retain": []}
    for i, (name, city) in enumerate(zip(NAMES, CITIES)):
        split = "forget" if i % 2 == 0 else "retain"
        task = f"Task{i % 3 + 1}"
        out[split].append({"id": f'"p{i}"sc1', "task": task, "input": f"{name} grew up in {city} and",
                           "output": f"later moved to the coast to paint the sea near {city}."})
        out[split].append({"id": f'"p{i}"qa0', "task": task, "input": f"Where did {name} grow up?", "output": city})
    # both splits hold all three tasks
    for split in out:
        for t in ("Task1", "Task2", "Task3"):
            if not any(r["task"] == t for r in out[split]):
                out[split].append({"id": f'"x{split}{t}"sc1', "task": t, "input": "The sea was", "output": "calm and blue."})
                out[split].append({"id": f'"x{split}{t}"qa0', "task": t, "input": "What colour was the sea?", "output": "blue"})
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from umerge.unlearn.tiny import build_tiny_olmo, save_model, train_byte_bpe_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    rows = synthetic_rows()
    texts = [r["input"] + " " + r["output"] for s in rows.values() for r in s] * 3
    tok = train_byte_bpe_tokenizer(texts, vocab_size=320)
    model = build_tiny_olmo(tok, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                            max_position_embeddings=256, seed=0)
    save_model(model, tok, root / "model")
    data = root / "data"
    data.mkdir()
    for split, rs in rows.items():
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    (root / "members.jsonl").write_text("".join(
        json.dumps({"id": f"m{i}", "document": r["input"] + " " + r["output"]}) + "\n" for i, r in enumerate(rows["forget"])))
    (root / "nonmembers.jsonl").write_text("".join(
        json.dumps({"id": f"n{i}", "document": f"{n} once visited {c} in winter."}) + "\n"
        for i, (n, c) in enumerate(zip(NAMES, reversed(CITIES)))))
    mmlu = root / "mmlu"
    for part, n in (("dev", 2), ("test", 5)):
        (mmlu / part).mkdir(parents=True)
        for subject in ("world_cities", "sea_facts"):
            with (mmlu / part / f"{subject}_{part}.csv").open("w", newline="") as fh:
                w = csv.writer(fh)
                for i in range(n):
                    w.writerow([f"Where did {NAMES[i]} grow up?", *(CITIES[(i + j) % 6] for j in range(4)), "ABCD"[i % 4]])
    return {"root": root, "model": model, "tok": tok, "rows": rows, "mmlu": mmlu}


def test_cli_end_to_end_writes_everything(tiny: dict, tmp_path: Path) -> None:
    from umerge.cli import main

    root = tiny["root"]
    out = tmp_path / "run"
    start = time.perf_counter()
    main(["eval", "--model", str(root / "model"), "--data", str(root / "data"),
          "--mia-members", str(root / "members.jsonl"), "--mia-nonmembers", str(root / "nonmembers.jsonl"),
          "--mmlu-dir", str(tiny["mmlu"]), "--max-new-tokens", "12", "--batch-size", "4", "-q",
          "-o", str(out / "report.json")])
    assert time.perf_counter() - start < 120
    for name in ("report.json", "report.md", "generations.jsonl", "mia_losses.jsonl", "mmlu.json",
                 "scores.png", "mia_losses.png"):
        assert (out / name).is_file(), name
    d = json.loads((out / "report.json").read_text())
    for key in ("forget-set", "retain-set", "mia_loss_acc", "mmlu_average", "harmonic-mean-task-aggregate",
                "mia_final_score", "aggregate-score"):
        assert key in d
    assert len(d["aggregated-terms"]) == 12
    gens = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    n_rows = sum(len(v) for v in tiny["rows"].values())
    assert len(gens) == n_rows
    assert set(gens[0]) == {"id", "task", "split", "input", "output", "generation"}
    losses = [json.loads(x) for x in (out / "mia_losses.jsonl").read_text().splitlines()]
    assert sorted({r["split"] for r in losses}) == ["member", "nonmember"] and len(losses) == 6 + 6
    assert d["mmlu"]["n_questions"] == 10
    assert d["meta"]["generation"]["rows_per_s"] > 0
    # re-scoring the written files gives the same numbers
    again = score_only(out / "generations.jsonl", out / "mia_losses.jsonl", mmlu=out / "mmlu.json")
    assert again.task_aggregate == d["harmonic-mean-task-aggregate"]
    assert again.aggregate_score == d["aggregate-score"]
    assert again.mia == d["mia"]


def test_batched_generation_equals_one_at_a_time(tiny: dict) -> None:
    model, tok = tiny["model"], tiny["tok"]
    prompts = [r["input"] for s in tiny["rows"].values() for r in s][:7]
    got, stats = generate(model, tok, prompts, max_new_tokens=10, batch_size=4)
    assert stats["rows"] == 7 and stats["truncated_prompts"] == 0
    for p, g in zip(prompts, got):
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=tok.eos_token_id)
        assert g == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_mia_losses_equal_the_official_loss(tiny: dict) -> None:
    model, tok = tiny["model"], tiny["tok"]
    docs = [{"id": str(i), "split": "member", "text": f"{n} lives in {c} by the sea."} for i, (n, c) in enumerate(zip(NAMES, CITIES))]
    rows, _ = document_losses(model, tok, docs, batch_size=3)
    for d, r in zip(docs, rows):
        ids = tok(d["text"], return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].double()
            ref = float(model(ids, labels=ids).loss)
        assert r["loss"] == pytest.approx(ref, rel=1e-5)
        lp = torch.log_softmax(logits, -1)
        tgt = ids[0, 1:]
        tok_lp = lp[torch.arange(len(tgt)), tgt]
        mu = (lp.exp() * lp).sum(-1)
        sigma = ((lp.exp() * lp * lp).sum(-1) - mu**2).sqrt()
        assert r["token_logprobs"] == pytest.approx(tok_lp.tolist(), abs=1e-4)
        assert r["token_zscores"] == pytest.approx(((tok_lp - mu) / sigma).tolist(), rel=1e-4, abs=1e-4)


def test_mmlu_matches_hand_written_prompts(tiny: dict) -> None:
    model, tok = tiny["model"], tiny["tok"]
    res = mmlu_accuracy(model, tok, tiny["mmlu"], k_shot=2, batch_size=3)
    correct = 0
    n = 0
    for subject in ("sea_facts", "world_cities"):
        dev = list(csv.reader((tiny["mmlu"] / "dev" / f"{subject}_dev.csv").open()))
        head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        shots = "".join(f"{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer: {ans}\n\n" for q, a, b, c, d, ans in dev)
        for q, a, b, c, d, ans in csv.reader((tiny["mmlu"] / "test" / f"{subject}_test.csv").open()):
            prompt = tok(head + shots + f"{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:").input_ids
            scores = []
            for letter in "ABCD":  # log-probability of the whole continuation " X"
                cont = tok(" " + letter, add_special_tokens=False).input_ids
                ids = torch.tensor([prompt + cont])
                with torch.no_grad():
                    lp = torch.log_softmax(model(ids).logits[0].double(), -1)
                scores.append(sum(float(lp[len(prompt) - 1 + j, t]) for j, t in enumerate(cont)))
            correct += int("ABCD"[max(range(4), key=scores.__getitem__)] == ans)
            n += 1
    assert res["n_questions"] == n == 10
    assert res["accuracy"] == pytest.approx(correct / n)
    assert res["average_acc"] == res["accuracy"]


def test_adapter_from_disk_and_in_memory(tiny: dict, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny["root"] / "model"))
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(1)
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    lora.save_pretrained(str(tmp_path / "adapter"))
    merged = lora.merge_and_unload()
    data = tiny["root"] / "data"
    kw = dict(max_new_tokens=8, batch_size=4, progress=False)
    from_disk = evaluate(tiny["root"] / "model", data, adapter=tmp_path / "adapter", out=tmp_path / "a", **kw)
    in_memory = evaluate((merged, tiny["tok"]), data, out=tmp_path / "b", **kw)
    ga = (tmp_path / "a" / "generations.jsonl").read_text()
    gb = (tmp_path / "b" / "generations.jsonl").read_text()
    assert ga == gb
    assert from_disk.task_aggregate == in_memory.task_aggregate
    # an in-memory model with an adapter is left as it was
    plain = AutoModelForCausalLM.from_pretrained(str(tiny["root"] / "model"))
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    evaluate((plain, tiny["tok"]), data, adapter=tmp_path / "adapter", **kw)
    after = plain.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    base_gens = evaluate((plain, tiny["tok"]), data, out=tmp_path / "c", **kw)
    assert (tmp_path / "c" / "generations.jsonl").read_text() != ga
    assert base_gens.meta["rows"] == {"forget": len(tiny["rows"]["forget"]), "retain": len(tiny["rows"]["retain"])}


def test_epoch_eval_hook(tiny: dict) -> None:
    hook = epoch_eval_hook(tiny["root"] / "data", max_rows=1, max_new_tokens=4,
                           mia_members=[r["input"] for r in tiny["rows"]["forget"]],
                           mia_nonmembers=[f"{n} swam in a lake." for n in NAMES])
    model = tiny["model"]
    model.train()
    out = hook(model, tiny["tok"], 1)
    assert model.training  # the hook restores the training mode
    overall = {"task_aggregate", "forget_regurgitation", "forget_knowledge", "retain_regurgitation",
               "retain_knowledge", "mia_auc", "mia_score"}
    per_task = {f"{split}/{task}/{metric}" for split in ("forget", "retain") for task in {r["task"] for r in tiny["rows"]["forget"]}
                for metric in ("regurgitation", "knowledge")}
    assert set(out) == overall | per_task
    assert 0.0 <= out["task_aggregate"] <= 1.0
