"""MMLU-style multiple-choice accuracy from a directory in the standard MMLU CSV layout.

Layout (Hendrycks et al., 2021, "Measuring Massive Multitask Language Understanding"):
``DIR/test/<subject>_test.csv`` and, for the few-shot examples, ``DIR/dev/<subject>_dev.csv``;
no header; columns ``question, A, B, C, D, answer`` with the answer a letter A..D.

Prompt, as in the original evaluation code: the line
``"The following are multiple choice questions (with answers) about <subject words>.\\n\\n"``,
then k dev examples each written ``question\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: X\\n\\n``,
then the test question in the same form ending in ``"Answer:"``. When the prompt does not fit the
model's context, shots are dropped one at a time (as the original code does).

Prediction: the argmax of the next-token logits over the tokens of ``" A"`` .. ``" D"``. When the
tokenizer splits ``" A"`` into several tokens that share a prefix (a byte-level BPE with a small
vocabulary gives ``"Ġ" "A"``), the shared prefix is appended to the prompt and the argmax is taken
over the first token that differs. Accuracy is pooled over all questions (not averaged over
subjects); per-subject accuracies are reported beside it.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

from umerge.errors import InputError
from umerge.evaluate._torch import require_torch
from umerge.evaluate.batching import inference, pad_batch
from umerge.evaluate.generate import context_length, ensure_pad_token, model_device

CHOICES = ("A", "B", "C", "D")


def read_mmlu_csv(path: Path) -> list[list[str]]:
    """Rows ``[question, A, B, C, D, answer]`` of one CSV, checked."""
    rows: list[list[str]] = []
    with path.open(encoding="utf-8", newline="") as fh:
        for n, row in enumerate(csv.reader(fh), start=1):
            if not row:
                continue
            if len(row) != 6:
                raise InputError(f"{path}:{n}: expected 6 columns (question,A,B,C,D,answer), got {len(row)}")
            if row[5].strip() not in CHOICES:
                raise InputError(f"{path}:{n}: the answer must be one of A, B, C, D, got {row[5]!r}")
            rows.append([c for c in row[:5]] + [row[5].strip()])
    return rows


def load_mmlu(directory: str | Path) -> dict[str, dict[str, list[list[str]]]]:
    """``{subject: {"dev": rows, "test": rows}}`` from an MMLU directory."""
    d = Path(directory)
    test_dir = d / "test"
    if not test_dir.is_dir():
        raise InputError(f"{d}: no test/ folder (expected DIR/test/<subject>_test.csv and DIR/dev/<subject>_dev.csv)")
    out: dict[str, dict[str, list[list[str]]]] = {}
    for f in sorted(test_dir.glob("*_test.csv")):
        subject = f.name[: -len("_test.csv")]
        dev = d / "dev" / f"{subject}_dev.csv"
        out[subject] = {"test": read_mmlu_csv(f), "dev": read_mmlu_csv(dev) if dev.is_file() else []}
    if not out or not any(v["test"] for v in out.values()):
        raise InputError(f"{test_dir}: no questions in any <subject>_test.csv")
    return out


def format_subject(subject: str) -> str:
    """``high_school_physics`` -> ``" high school physics"`` (leading space, as the original code)."""
    return "".join(" " + w for w in subject.split("_"))


def format_example(row: list[str], include_answer: bool = True) -> str:
    """One question with its choices, ending in ``Answer:`` (and `` X\\n\\n`` with the answer)."""
    text = row[0]
    for letter, choice in zip(CHOICES, row[1:5]):
        text += f"\n{letter}. {choice}"
    text += "\nAnswer:"
    if include_answer:
        text += f" {row[5]}\n\n"
    return text


def build_prompt(subject: str, dev: list[list[str]], question: list[str], k: int) -> str:
    """The k-shot prompt for one test question."""
    head = f"The following are multiple choice questions (with answers) about{format_subject(subject)}.\n\n"
    return head + "".join(format_example(r) for r in dev[:k]) + format_example(question, include_answer=False)


def answer_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """(shared prefix ids, one distinguishing id per choice) for ``" A"`` .. ``" D"``."""
    seqs = [list(tokenizer(" " + c, add_special_tokens=False)["input_ids"]) for c in CHOICES]
    prefix: list[int] = []
    while all(len(s) > len(prefix) for s in seqs) and len({s[len(prefix)] for s in seqs}) == 1:
        prefix.append(seqs[0][len(prefix)])
    firsts = [s[len(prefix)] if len(s) > len(prefix) else None for s in seqs]
    if None in firsts or len(set(firsts)) != len(CHOICES):
        raise InputError(f"the tokenizer does not give distinct tokens for ' A'..' D' (got {seqs}): cannot score MMLU")
    return prefix, [int(t) for t in firsts]  # type: ignore[arg-type]


def mmlu_accuracy(
    model: Any,
    tokenizer: Any,
    directory: str | Path,
    *,
    k_shot: int = 5,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """``{"accuracy", "average_acc", "n_questions", "k_shot", "subjects": {s: {"accuracy", "n"}}, "seconds"}``.

    ``average_acc`` repeats the pooled accuracy under the key the official scorer read.
    """
    torch = require_torch()
    data = load_mmlu(directory)
    pad_id = ensure_pad_token(tokenizer)
    prefix, choice_ids = answer_tokens(tokenizer)
    max_len = context_length(model)
    items: list[tuple[str, list[int], int]] = []  # subject, prompt ids, gold index
    for subject, parts in data.items():
        for q in parts["test"]:
            k = min(k_shot, len(parts["dev"]))
            while True:
                ids = list(tokenizer(build_prompt(subject, parts["dev"], q, k))["input_ids"]) + prefix
                if len(ids) <= max_len or k == 0:
                    break
                k -= 1
            if len(ids) > max_len:
                ids = ids[-max_len:]  # even zero-shot does not fit: keep the end, where the question is
            items.append((subject, ids, CHOICES.index(q[5])))
    order = sorted(range(len(items)), key=lambda i: -len(items[i][1]))
    correct = [False] * len(items)
    device = model_device(model)
    choice_t = torch.tensor(choice_ids, dtype=torch.long)
    with inference(model, total=len(items), desc="mmlu", unit="q", progress=progress) as advance:
        start = time.perf_counter()
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            input_ids, mask = pad_batch([items[i][1] for i in idx], pad_id, left=True)
            # positions count real tokens only, so a left-padded prompt sees the same positions as alone
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            logits = model(
                input_ids=input_ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device)
            ).logits[:, -1]
            pred = logits.float().cpu()[:, choice_t].argmax(-1).tolist()
            for r, i in enumerate(idx):
                correct[i] = pred[r] == items[i][2]
            advance(len(idx))
    subjects: dict[str, dict[str, Any]] = {}
    for (subject, _, _), ok in zip(items, correct):
        s = subjects.setdefault(subject, {"correct": 0, "n": 0})
        s["correct"] += int(ok)
        s["n"] += 1
    acc = sum(correct) / len(correct)
    return {
        "accuracy": acc,
        "average_acc": acc,
        "n_questions": len(correct),
        "k_shot": k_shot,
        "subjects": {s: {"accuracy": v["correct"] / v["n"], "n": v["n"]} for s, v in subjects.items()},
        "seconds": time.perf_counter() - start,
    }
