"""How much the KL term's reduction changes the loss: the old "mean over the batch's padded width"
against the reference's effective reduction, on the demo's first micro-batch of each preset.

    .venv/bin/python benches/kl_reduction_effect.py DEMO_OUT [--epoch 1]

DEMO_OUT is a `umerge demo -o DEMO_OUT` directory. For each preset run (model1, model2) this loads
the vanilla model with the run's adapter after `--epoch` (at step 0 LoRA's B is zero and every KL is
zero), takes the first micro-batch the trainer draws (epoch-0 order of its sampler, fixed pairing)
and prints the KL term under each reduction and the weighted KL (kl_weight * KL) beside the total:

- "padded width (old)": sum of KL over every position of the right-padded retain batch, pad
  positions included, divided by B * T for the batch's own width T (what umerge computed before it
  followed the reference);
- "reference": sum over real positions / (B * max_length) (the default now);
- "real_mean", "answer_mean": the other named reductions.

A measurement, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from umerge.unlearn import load_task_data
from umerge.unlearn.losses import kl_to_reference
from umerge.unlearn.presets import UnlearnConfig
from umerge.unlearn.step import encode_batch, eval_mode, step_terms
from umerge.unlearn.tokenize import EpochShuffleSampler, UnlearnDataset


def first_batch(cfg: UnlearnConfig, data_dir: Path) -> tuple[list, list]:
    task = load_task_data(data_dir).head(cfg.max_forget_rows, cfg.max_retain_rows)
    dataset = UnlearnDataset(task.forget, task.retain, cfg.pairing, cfg.seed)
    order = list(iter(EpochShuffleSampler(len(dataset), cfg.seed)))[: cfg.batch_size]
    pairs = [dataset[i] for i in order]
    return [f for f, _ in pairs], [r for _, r in pairs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("demo_out", type=Path)
    ap.add_argument("--epoch", type=int, default=1)
    args = ap.parse_args()
    report = json.loads((args.demo_out / "report.json").read_text())
    vanilla = Path(report["models"]["vanilla"])
    data_dir = Path(report["data"]["dir"])
    tok = AutoTokenizer.from_pretrained(str(vanilla))
    print("| preset | batch | real / padded positions | KL, padded width (old) | KL, reference (now) | "
          "old / now | real_mean | answer_mean | kl_weight * KL old -> now | total now |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in ("model1", "model2"):
        run = report["unlearning"][name]
        cfg = UnlearnConfig.from_dict({k: v for k, v in run["config"].items()})
        base = AutoModelForCausalLM.from_pretrained(str(vanilla), dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(Path(run["dir"]) / f"epoch-{args.epoch}")).eval()
        forget, retain = first_batch(cfg, data_dir)
        batch = encode_batch(tok, retain, cfg, "cpu")
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            with model.disable_adapter(), eval_mode(model):
                ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            lp, lr = torch.log_softmax(logits, -1), torch.log_softmax(ref, -1)
            old = float((lr.exp() * (lr - lp)).sum(-1).mean())  # every position of the padded batch
            red = {r: float(kl_to_reference(logits, ref, batch["attention_mask"], r, max_length=cfg.max_length,
                                            labels=batch["labels"]))
                   for r in ("reference", "real_mean", "answer_mean")}
            total = float(step_terms(model, None, forget, retain, tok, cfg)["total"])
        real, width = int(batch["attention_mask"].sum()), batch["input_ids"].numel()
        print(f"| {run['preset']} | {cfg.batch_size} | {real} / {width} | {old:.5f} | {red['reference']:.5f} | "
              f"{old / red['reference']:.2f} | {red['real_mean']:.5f} | {red['answer_mean']:.5f} | "
              f"{cfg.kl_weight * old:.5f} -> {cfg.kl_weight * red['reference']:.5f} | {total:.4f} |")


if __name__ == "__main__":
    main()
