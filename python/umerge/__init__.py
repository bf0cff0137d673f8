"""umerge: Rust-accelerated, out-of-core model merging, and unlearning via model merging.

The merge engine is the native module `umerge._core`; this package adds the typed Python API,
the CLI (`umerge --help`), and, with the `train` extra, the unlearning workbench.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("umerge")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

from umerge.errors import InputError, UmergeError
from umerge.merge import MergeReport, inspect, merge, ties
from umerge.methods import (
    arcee_fusion,
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    karcher,
    linear,
    magnitude_prune,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    ram,
    ramplus_tl,
    sce,
    slerp,
    task_arithmetic,
)
from umerge.quantization import quantize

__all__ = ["__version__", "InputError", "UmergeError", "MergeReport", "inspect", "merge", "ties", "ops"]
__all__ += ["linear", "task_arithmetic", "magnitude_prune", "dare_linear", "dare_ties", "breadcrumbs",
            "breadcrumbs_ties", "della", "della_linear", "slerp", "model_stock", "nuslerp", "multislerp", "karcher",
            "nearswap", "sce", "arcee_fusion", "ram", "ramplus_tl"]
__all__ += ["adapters", "fold", "extract_lora", "quantize"]


def __getattr__(name: str) -> Any:
    # `umerge.ops` imports numpy; load it on first use so the CLI starts fast.
    if name == "ops":
        import importlib

        return importlib.import_module("umerge.ops")
    if name == "adapters":  # LoRA adapters: merge_adapters, fold (numpy, loaded on first use)
        import importlib

        return importlib.import_module("umerge.adapters")
    if name == "fold":
        from umerge.adapters.folding import fold

        return fold
    if name == "extract_lora":
        from umerge.adapters.extract import extract_lora

        return extract_lora
    raise AttributeError(f"module 'umerge' has no attribute {name!r}")
