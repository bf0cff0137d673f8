"""Plain supervised fine-tuning, to make a vanilla model memorise a data set before unlearning it.

The SemEval-2025 Task 4 target models had been fine-tuned on the forget and retain documents, so
there was something to unlearn. With a tiny model built locally (`umerge.unlearn.tiny`) we recreate
that situation: full-parameter training, on exactly the tokenisation the unlearning trainer uses
(`tokenize.encode_example`: prompt left-truncated to 0.8 * max_length, answer + eos), loss = mean
token NLL over the answer tokens of the batch (or over prompt and answer with `prompt_loss=True`,
closer to how the task's models saw whole documents). AdamW, linear warmup then linear decay to 0,
float32 weights (bf16 autocast on CUDA). One process; this is for small models, not a general SFT
framework.

The result is a full model directory (safetensors, config, tokenizer) that `umerge train` and
`umerge eval` take as --model.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from umerge.errors import InputError
from umerge.unlearn.data import Row, TaskData, load_task_data
from umerge.unlearn.losses import answer_nll
from umerge.unlearn.tokenize import Encoded, collate, encode_rows


@dataclass
class FinetuneResult:
    """Where the fine-tuned model went and how the loss went down (mean loss of each epoch)."""

    out_dir: Path
    epoch_losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0

    @property
    def final_loss(self) -> float:
        return self.epoch_losses[-1] if self.epoch_losses else float("nan")


def _rows_of(rows: Sequence[Row] | TaskData | str | Path) -> list[Row]:
    if isinstance(rows, (str, Path)):
        rows = load_task_data(rows)
    if isinstance(rows, TaskData):
        return list(rows.forget) + list(rows.retain)
    out = list(rows)
    if not out:
        raise InputError("nothing to fine-tune on (no rows)")
    return out


def finetune(
    model_dir: str | Path | Any,
    rows: Sequence[Row] | TaskData | str | Path,
    out: str | Path,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 8,
    max_length: int = 256,
    prompt_fraction: float = 0.8,
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.05,
    seed: int = 0,
    prompt_loss: bool = False,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune every parameter of a causal LM on `rows` and save the full model to `out`.

    `model_dir` is a model directory, or a loaded `PreTrainedModel` (then pass `tokenizer` too, or it
    is loaded from `model_dir`'s name_or_path). `rows`: a list of `Row`, a `TaskData` (both splits are
    used), or a data path for `load_task_data`. Writes OUT/ (model + tokenizer) and
    OUT/finetune_log.jsonl (one line per epoch: epoch, loss, lr, seconds).
    """
    from transformers import AutoTokenizer, PreTrainedModel, get_linear_schedule_with_warmup

    from umerge.unlearn.tiny import save_model
    from umerge.unlearn.trainer import load_causal_lm

    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise InputError(f"finetune: epochs ({epochs}) and batch_size ({batch_size}) must be >= 1 and lr ({lr}) > 0")
    data = _rows_of(rows)
    if isinstance(model_dir, PreTrainedModel):
        model = model_dir
        if tokenizer is None:
            if not model.config.name_or_path:
                raise InputError("finetune: pass tokenizer= with a model object that was not loaded from a directory")
            tokenizer = AutoTokenizer.from_pretrained(model.config.name_or_path)
    else:
        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise InputError(f"{path}: not a model directory (no config.json)")
        model = load_causal_lm(path, torch.float32)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(dev, dtype=torch.float32)
    model.config.use_cache = False

    enc = encode_rows(tokenizer, data, max_length, prompt_fraction)
    if prompt_loss:
        enc = [Encoded(e.input_ids, list(e.input_ids), 0) for e in enc]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    steps_per_epoch = math.ceil(len(enc) / batch_size)
    total = steps_per_epoch * epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(round(warmup_ratio * total)), total)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "finetune_log.jsonl"
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="finetune", unit="step", dynamic_ncols=True)
    result = FinetuneResult(out_dir=out)
    t0 = time.perf_counter()
    model.train()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else None
    with log_path.open("w", encoding="utf-8") as log:
        for epoch in range(epochs):
            order = torch.randperm(len(enc), generator=gen).tolist()
            total_loss, n = 0.0, 0
            for i in range(0, len(order), batch_size):
                b = collate([enc[j] for j in order[i : i + batch_size]], tokenizer.pad_token_id)
                b = {k: v.to(dev) for k, v in b.items()}
                if autocast is not None:
                    with autocast:
                        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                else:
                    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                loss = answer_nll(logits, b["labels"], "mean")
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                total_loss += float(loss.detach())
                n += 1
                result.steps += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch + 1)
            mean = total_loss / max(n, 1)
            result.epoch_losses.append(mean)
            log.write(
                json.dumps(
                    {"epoch": epoch + 1, "loss": mean, "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - t0}
                )
                + "\n"
            )
    if bar is not None:
        bar.close()
    model.eval()
    model.config.use_cache = True
    save_model(model, tokenizer, out)
    result.seconds = time.perf_counter() - t0
    return result


__all__ = ["finetune", "FinetuneResult"]
