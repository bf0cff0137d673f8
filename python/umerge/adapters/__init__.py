"""PEFT LoRA adapters: recognise them, merge them (PEFT's add_weighted_adapter semantics, or on
the full updates), and fold them into their base model, without torch.

- `merge_adapters(["a/", "b/"], "ab/", method="ties", density=0.8)`: a new PEFT adapter.
- `fold("ab/", base="base/", out="model/")`: W + scaling * B @ A streamed into a full checkpoint.
- `is_adapter_dir(path)`: whether a path is a PEFT adapter directory.
"""

from __future__ import annotations

from umerge.adapters.combine import COMBINATIONS
from umerge.adapters.config import AdapterConfig, is_adapter_dir, read_config
from umerge.adapters.merge import AdapterMergeReport, merge_adapters

__all__ = ["AdapterConfig", "AdapterMergeReport", "COMBINATIONS", "fold", "is_adapter_dir", "merge_adapters", "read_config"]


def __getattr__(name: str) -> object:
    if name == "fold":
        from umerge.adapters.fold import fold

        return fold
    raise AttributeError(f"module 'umerge.adapters' has no attribute {name!r}")
