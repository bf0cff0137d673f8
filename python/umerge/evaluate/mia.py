"""Per-document losses for the membership inference attack, batched, with per-token data.

The official MIA tokenizes each whole document (the tokenizer's default special tokens) and takes
``model(input_ids, labels=input_ids).loss``: the mean negative log-likelihood of tokens 2..T given
their prefixes. Here documents are batched with right padding and the same mean is taken over the
real (unpadded) positions, so the loss matches the one-at-a-time value up to float rounding.

Alongside the loss each row can carry what the extra attacks need (see `umerge.evaluate.metrics`):
``token_logprobs`` (log p of each target token: Min-K%), ``token_zscores``
(``(log p(x_t) - mu_t) / sigma_t`` with mu_t and sigma_t the mean and standard deviation of log p
under the model's next-token distribution: Min-K%++) and ``zlib_bytes`` (zlib attack).
A document longer than the model's context is cut to its first tokens (counted in the stats).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from umerge.errors import InputError
from umerge.evaluate._torch import require_torch
from umerge.evaluate.batching import inference, pad_batch
from umerge.evaluate.generate import context_length, ensure_pad_token, model_device
from umerge.evaluate.metrics import zlib_bytes


def document_losses(
    model: Any,
    tokenizer: Any,
    documents: Sequence[dict[str, Any]],
    *,
    batch_size: int = 8,
    token_data: bool = True,
    progress: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """LOSSES rows ``{"id", "split", "loss", ...}`` for documents ``{"id", "split", "text"}``, and stats."""
    torch = require_torch()
    pad_id = ensure_pad_token(tokenizer)
    max_len = context_length(model)
    encoded: list[list[int]] = []
    truncated = 0
    for d in documents:
        ids = list(tokenizer(d["text"])["input_ids"])
        if len(ids) > max_len:
            ids = ids[:max_len]
            truncated += 1
        if len(ids) < 2:
            raise InputError(f"MIA document {d['id']!r} ({d['split']}) has fewer than 2 tokens: no loss to take")
        encoded.append(ids)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    rows: list[dict[str, Any] | None] = [None] * len(documents)
    device = model_device(model)
    with inference(model, total=len(documents), desc="mia losses", unit="doc", progress=progress) as advance:
        start = time.perf_counter()
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            input_ids, mask = pad_batch([encoded[i] for i in idx], pad_id, left=False)
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
            for r, i in enumerate(idx):
                n = len(encoded[i])
                # position t predicts token t+1; float32 whatever the model's dtype
                lp = torch.log_softmax(logits[r, : n - 1].float(), dim=-1)
                target = input_ids[r, 1:n].to(lp.device)
                tok_lp = lp.gather(-1, target[:, None])[:, 0]
                doc = documents[i]
                row: dict[str, Any] = {"id": doc["id"], "split": doc["split"], "loss": float(-tok_lp.mean())}
                if token_data:
                    p = lp.exp()
                    mu = (p * lp).sum(-1)
                    # E[(log p - mu)^2], not E[log p^2] - mu^2: no cancellation in float32
                    sigma = (p * (lp - mu[:, None]) ** 2).sum(-1).clamp_min(1e-12).sqrt()
                    row["token_logprobs"] = [float(x) for x in tok_lp.tolist()]
                    row["token_zscores"] = [float(x) for x in ((tok_lp - mu) / sigma).tolist()]
                    row["zlib_bytes"] = zlib_bytes(doc["text"])
                rows[i] = row
            advance(len(idx))
    seconds = time.perf_counter() - start
    stats = {"documents": len(documents), "seconds": seconds, "truncated_documents": truncated}
    return [r for r in rows if r is not None], stats
