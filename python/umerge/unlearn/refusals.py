"""The refusal answers that the `dpo` method prefers over the forget answers, and which row gets which.

TOFU's IdkDPO (Maini et al. 2024) trains the model to prefer an "I don't know" answer over the answer
to be forgotten, drawing each row's refusal from a list of such answers. This list was written for
this project. Each forget prompt gets one refusal, chosen from the prompt and the run's seed by
SHA-256, so that the choice is the same on every machine, in every process (Python's hash() of a
string is salted per process, so it is not used) and in every epoch. No torch needed.
"""

from __future__ import annotations

import hashlib

REFUSALS: tuple[str, ...] = (
    "I don't know.",
    "I'm not able to answer that.",
    "I have no information about that.",
    "I can't help with that question.",
    "That is not something I know.",
    "I'm sorry, I don't have an answer to that.",
    "I'm not sure; I have no record of it.",
    "I can't say.",
    "I have nothing to tell you about that.",
    "I don't have that information.",
)


def refusal_for(prompt: str, seed: int) -> str:
    """REFUSALS[int(first 8 bytes of sha256(f"{seed}\\0{prompt}")) mod len(REFUSALS)]."""
    digest = hashlib.sha256(f"{seed}\0{prompt}".encode()).digest()
    return REFUSALS[int.from_bytes(digest[:8], "big") % len(REFUSALS)]


__all__ = ["REFUSALS", "refusal_for"]
