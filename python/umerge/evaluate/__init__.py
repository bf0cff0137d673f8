"""SemEval-2025 Task 4 evaluation: regurgitation, knowledge, Task Aggregate, MIA, MMLU, final score.

Public API (torch is imported only by `evaluate`):

* ``evaluate(model, data, adapter=None, mia_members=None, mia_nonmembers=None, mmlu_dir=None,
  out=None, batch_size=8, max_new_tokens=256, progress=True, ...) -> EvalReport``
* ``score_only(generations_path, mia_losses_path=None, out=None, *, mmlu=None) -> EvalReport``
* ``compare(reports, names=None) -> str``: the paper's Table 1 layout in Markdown.
* ``epoch_eval_hook(data, max_rows=8, ...)``: a per-epoch hook for the trainer (score curves).

Modules: `metrics` (the formulas, pure), `data` (row files), `report` (EvalReport, JSON,
Markdown), `generate`, `mia`, `mmlu` (torch), `run` (orchestration).
"""

from __future__ import annotations

from umerge.evaluate.report import EvalReport, build_report, compare
from umerge.evaluate.run import epoch_eval_hook, evaluate, score_only

__all__ = ["EvalReport", "build_report", "compare", "epoch_eval_hook", "evaluate", "score_only"]
