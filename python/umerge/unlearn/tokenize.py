"""Turning rows into token ids and labels, as the reference system did, and pairing forget with retain.

One example = prompt tokens + answer tokens + eos:

- the prompt (`input`) is tokenised with the tokenizer's defaults (a BOS where the tokenizer adds
  one), as the reference trainer and the official evaluator encode prompts; the answer (`output`) is
  tokenised with no special tokens and followed by eos;
- the prompt keeps its last floor(prompt_fraction * max_length) tokens (truncated from the left:
  the end of the prompt is what the answer continues), prompt_fraction = 0.8;
- the answer, followed by eos, fills the rest, cut on the right at max_length tokens in all;
- labels copy the ids on the answer and eos, -100 on the prompt (and, after collation, on padding).

Batches are padded on the right with the pad token to the longest sequence of the batch. (The
reference padded every example on the left to max_length; for causal models with rotary positions
the real positions' logits are the same either way, and the KL reduction "reference" accounts for
the padded width: see `umerge.unlearn.losses.kl_to_reference`.) The unlearning data set yields
forget row i together with retain row i mod N_retain ("fixed", the reference's pairing), or with a
retain row drawn at random, reproducibly from (seed, epoch, i) ("random"); rows are tokenised when
a step uses them (`umerge.unlearn.step.step_terms`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from umerge.errors import InputError
from umerge.unlearn.data import Row
from umerge.unlearn.losses import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PAIRINGS = ("fixed", "random")


@dataclass(frozen=True)
class Encoded:
    """One tokenised example: ids, labels (-100 on the prompt), and how many prompt tokens it has."""

    input_ids: list[int]
    labels: list[int]
    prompt_len: int


def encode_example(
    tokenizer: "PreTrainedTokenizerBase",
    prompt: str,
    answer: str,
    max_length: int,
    prompt_fraction: float = 0.8,
) -> Encoded:
    """Tokenise prompt (tokenizer defaults) + answer + eos, prompt cut on the left; labels on answer and eos.

    prompt tokens kept = the last floor(prompt_fraction * max_length); total length <= max_length.
    """
    if max_length < 2:
        raise InputError(f"max_length must be at least 2, got {max_length}")
    if not 0.0 <= prompt_fraction < 1.0:
        raise InputError(f"prompt_fraction must be in [0, 1), got {prompt_fraction}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InputError("the tokenizer has no eos token")
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    answer_ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"]) if answer else []
    keep = int(math.floor(prompt_fraction * max_length))
    if len(prompt_ids) > keep:
        prompt_ids = prompt_ids[len(prompt_ids) - keep :] if keep > 0 else []
    answer_ids = (list(answer_ids) + [eos])[: max_length - len(prompt_ids)]
    ids = list(prompt_ids) + answer_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    return Encoded(input_ids=ids, labels=labels, prompt_len=len(prompt_ids))


def encode_rows(
    tokenizer: "PreTrainedTokenizerBase", rows: Sequence[Row], max_length: int, prompt_fraction: float = 0.8
) -> list[Encoded]:
    """`encode_example` on every row (input as prompt, output as answer)."""
    return [encode_example(tokenizer, r.input, r.output, max_length, prompt_fraction) for r in rows]


def collate(
    examples: Sequence[Encoded], pad_id: int, pad_to: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example (or to `pad_to`): input_ids, attention_mask, labels (B, T)."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    width = max(len(e.input_ids) for e in examples)
    if pad_to is not None:
        width = max(width, pad_to)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(e.labels, dtype=torch.long)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pair_index(i: int, n_retain: int, pairing: str = "fixed", seed: int = 0, epoch: int = 0) -> int:
    """The retain example paired with forget example i: i mod n_retain, or a seeded random draw."""
    if n_retain <= 0:
        raise ValueError("no retain examples to pair with")
    if pairing == "fixed":
        return i % n_retain
    if pairing == "random":
        return random.Random(f"{seed}:{epoch}:{i}").randrange(n_retain)
    raise InputError(f"unknown pairing {pairing!r} (use 'fixed' or 'random')")


class UnlearnDataset(torch.utils.data.Dataset):
    """Forget item i with its paired retain item (rows or encoded examples); length = number of forget items.

    Call `set_epoch(k)` before each epoch so "random" pairing draws a new, reproducible pairing.
    """

    def __init__(
        self,
        forget: Sequence[Any],
        retain: Sequence[Any],
        pairing: str = "fixed",
        seed: int = 0,
    ) -> None:
        if pairing not in PAIRINGS:
            raise InputError(f"unknown pairing {pairing!r} (use 'fixed' or 'random')")
        if not forget or not retain:
            raise InputError("the unlearning data set needs at least one forget and one retain example")
        self.forget = list(forget)
        self.retain = list(retain)
        self.pairing = pairing
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the pairing of this epoch (only matters for random pairing)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        j = pair_index(i, len(self.retain), self.pairing, self.seed, self.epoch)
        return self.forget[i], self.retain[j]


def pair_rows(items: Sequence[tuple[Any, Any]]) -> dict[str, list[Any]]:
    """Collate (forget, retain) pairs into {"forget": [...], "retain": [...]}, left as rows."""
    return {"forget": [f for f, _ in items], "retain": [r for _, r in items]}


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """A permutation of range(n) that depends only on (seed, epoch), so a resumed run sees the same order."""

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n = n
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):  # type: ignore[no-untyped-def]
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


__all__ = [
    "Encoded",
    "encode_example",
    "encode_rows",
    "collate",
    "pair_index",
    "UnlearnDataset",
    "pair_rows",
    "EpochShuffleSampler",
]
