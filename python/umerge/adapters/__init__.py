"""PEFT LoRA adapters: recognise them, merge them (PEFT's add_weighted_adapter semantics, or on
the full updates), and fold them into their base model, without torch.

- `merge_adapters(["a/", "b/"], "ab/", method="ties", density=0.8)`: a new PEFT adapter.
- `fold("ab/", base="base/", out="model/")`: W + scaling * B @ A streamed into a full checkpoint.
- `extract_lora("ft/", base="base/", out="lora/", rank=32)`: the adapter nearest to a fine-tune
  (truncated SVD of each task vector, mergekit-extract-lora's semantics).
- `is_adapter_dir(path)`: whether a path is a PEFT adapter directory.

Submodules: `config` (adapter_config.json), `lora` (factors in memory, writing an adapter),
`combine` (PEFT's combination formulas), `merge` (`merge_adapters`), `fold` (the Rust fold),
`extract` (`extract_lora`: planned as mergekit plans it, the SVD in Rust), `routing` (the hook
that sends adapter inputs of `umerge ties` / `umerge.merge` here), `recipe` (adapter merges as
YAML configs: what `umerge run` reads and `umerge search` writes).
The numpy-based parts load on first use, so detecting adapters costs nothing.
"""

from __future__ import annotations

import importlib
from typing import Any

from umerge.adapters.config import AdapterConfig, is_adapter_dir, read_config

_LAZY = {
    "merge_adapters": "umerge.adapters.merge",
    "AdapterMergeReport": "umerge.adapters.merge",
    "COMBINATIONS": "umerge.adapters.combine",
    "fold": "umerge.adapters.folding",
    "fold_merged": "umerge.adapters.folding",
    "extract_lora": "umerge.adapters.extract",
    "ExtractReport": "umerge.adapters.extract",
}

__all__ = ["AdapterConfig", "is_adapter_dir", "read_config", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'umerge.adapters' has no attribute {name!r}")
