"""The paper's analyses of an unlearning run and its merges, as figures (PNG) with their numbers.

* `curves.loss_curves(logs, out)`: loss terms over optimizer steps (Figure 3);
* `curves.score_curves(sources, out)`: scores over epochs, from eval rows in the training log or
  from per-epoch reports; `curves.task_curves(logs, out)`: regurgitation and knowledge per task and
  split from epoch 0 (Figure 2);
* `angles.angle_analysis(runs, out)`: angles between ΔP(0→s), ΔP(s→F), ΔP(0→F) from epoch
  checkpoints, with the band random directions give and s at the forget-loss plateau (Figure 4);
* `sweep.density_sweep(merge, score, out)`: merge at densities 0.1..1.0 and score each (Figure 5);
* `sweep.methods_table(entries, out)`: the merge-method comparison (Table 2).

Every function writes a PNG and the numbers beside it (CSV, and JSON where nested), into ``out``.
numpy and matplotlib only; torch only when a scorer evaluates a model. CLI: `umerge analyze`.
"""

from __future__ import annotations

from umerge.analysis.angles import angle_analysis, change_angles, run_angles
from umerge.analysis.curves import loss_curves, read_log, score_curves, task_curves
from umerge.analysis.sweep import command_merger, density_sweep, methods_table, model_scorer

__all__ = [
    "angle_analysis",
    "change_angles",
    "command_merger",
    "density_sweep",
    "loss_curves",
    "methods_table",
    "model_scorer",
    "read_log",
    "run_angles",
    "score_curves",
    "task_curves",
]
