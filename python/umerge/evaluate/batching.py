"""Shared batching for the evaluators (`generate`, `mmlu`, `mia`): padding token-id lists into one
batch and running a model in inference mode with an optional progress bar.

Both padding sides are used: generation and next-token scoring (MMLU) pad on the left so the last
column is every row's last real token; document losses (MIA) pad on the right so row r's tokens
sit at positions 0..n-1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from umerge.evaluate._torch import require_torch


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, *, left: bool) -> tuple[Any, Any]:
    """``(input_ids, attention_mask)``, both long tensors of shape (len(seqs), max length): each
    sequence placed at the left or right end of its row, `pad_id` elsewhere, mask 1 on real tokens."""
    torch = require_torch()
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        input_ids[r, cols] = torch.tensor(list(s), dtype=torch.long)
        mask[r, cols] = 1
    return input_ids, mask


@contextmanager
def inference(model: Any, *, total: int, desc: str, unit: str, progress: bool) -> Iterator[Callable[[int], Any]]:
    """Runs the body with `model` in eval mode under ``torch.inference_mode()`` and yields
    ``advance(n)``, which moves a tqdm bar of `total` `unit`s when `progress` (a no-op otherwise).
    On exit, however it happens, the bar is closed and a model that was training is put back in
    training mode."""
    torch = require_torch()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, unit=unit, leave=False)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield bar.update if bar is not None else (lambda n: None)
    finally:
        if bar is not None:
            bar.close()
        if was_training:
            model.train()
