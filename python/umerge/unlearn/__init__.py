"""The unlearning workbench: NPO + KLR + GDR (the ZJUKLAB presets) and seven other methods, on LoRA or
every weight, and SFT to memorise first.

Public API (torch is imported only by `train`, `finetune` and the loss/tokenisation modules, so the
data loader and the config work in a plain `pip install umerge`):

    load_task_data(data=None, *, forget=None, retain=None) -> TaskData
    UnlearnConfig, get_preset(name) -> UnlearnConfig, PRESETS, METHODS
    train(model_dir, data, preset_or_config, out, overrides=None, eval_hook=None, progress=True,
          resume=False, gradient_checkpointing=None) -> TrainResult
    step_terms(model, reference, forget_rows, retain_rows, tokenizer, config) -> {"npo", "kl", "gdr", "total", ...}
    finetune(model_dir, rows, out, epochs=10, lr=1e-3, batch_size=8, max_length=256, ...) -> FinetuneResult

The objective is the config's `method`: npo_gdr_klr (ZJUKLAB's, the default), grad_ascent,
grad_diff, npo, simnpo, dpo (alias idkdpo), rmu, undial; formulas and sources in
`umerge.unlearn.methods`, and `finetune` is "lora" (default) or "full".

Loss weights: npo_weight, kl_weight, retain_weight. The reference code's ga_ratio, gd_ratio and
gk_ratio are accepted as aliases: ga_ratio -> npo_weight, gd_ratio -> kl_weight, gk_ratio ->
retain_weight (its names do not say what they weight).
"""

from __future__ import annotations

from typing import Any

from umerge.unlearn.data import Row, TaskData, load_rows, load_task_data
from umerge.unlearn.presets import (
    LOSS_WEIGHT_ALIASES,
    METHODS,
    PRESETS,
    UnlearnConfig,
    get_preset,
    resolve_config,
)

_LAZY = {
    "train": ("umerge.unlearn.trainer", "train"),
    "TrainResult": ("umerge.unlearn.trainer", "TrainResult"),
    "batch_nll": ("umerge.unlearn.trainer", "batch_nll"),
    "make_nll_hook": ("umerge.unlearn.trainer", "make_nll_hook"),
    "step_terms": ("umerge.unlearn.step", "step_terms"),
    "finetune": ("umerge.unlearn.sft", "finetune"),
    "FinetuneResult": ("umerge.unlearn.sft", "FinetuneResult"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'umerge.unlearn' has no attribute {name!r}")


__all__ = [
    "Row",
    "TaskData",
    "load_rows",
    "load_task_data",
    "UnlearnConfig",
    "get_preset",
    "resolve_config",
    "PRESETS",
    "METHODS",
    "LOSS_WEIGHT_ALIASES",
    *_LAZY,
]
