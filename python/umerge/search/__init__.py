"""Merge search for the unlearning workbench: which factor-wise merge of these LoRA adapters scores best?

`search(SearchOptions(adapters, base, data, out, ...))` scores many recipes (method, density,
per-adapter weights, TIES sign election) of two or more adapters trained on one base, each merged
in memory and applied to the base model held in torch, with the SemEval-2025 Task 4 metrics on a
validation split; chooses the best there; and scores the chosen recipe and the default (TIES,
density 0.8, weights 1) on a held-out test split. CLI: `umerge search`.

Submodules, one job each: `space` (candidates: grid and seeded random draws), `split` (the
validation/test split of the data), `inmemory` (the base model with W + ΔW applied in place),
`results` (choice, Pareto front, table, figure), `run` (the orchestration and outputs).
torch is imported only when a search runs.
"""

from __future__ import annotations

from umerge.search.run import SearchOptions, search
from umerge.search.space import Candidate, SearchSpace, default_candidate, grid, random_candidates

__all__ = ["Candidate", "SearchOptions", "SearchSpace", "default_candidate", "grid", "random_candidates", "search"]
