"""The base model held in torch once, with each candidate's merged update applied in place.

Writing, folding and reloading a checkpoint per candidate would cost more than scoring it on a
small model, and disk space on a large one. `MergedModel` instead loads the base once, keeps each
adapted weight W as it is stored on disk (same dtype, so the copy is exact and costs what those
weights cost on disk), and for a candidate computes the merged factors in memory
(`umerge.adapters.merge.merged_tensors`, the arithmetic `merge_adapters` writes) and sets

    W' = round_storage(W + scaling * B @ A)        (B @ A transposed with fan_in_fan_out)

in float32, rounded once to the base's storage dtype, then cast to the evaluation dtype (float32 on
a CPU, bfloat16 on CUDA, as `umerge.evaluate.evaluate` loads a model directory). That is what
`umerge.fold` writes (float32 products, one rounding to the base's dtype) and what loading the folded
directory gives; the merged factors are rounded to the adapters' storage dtype first, as the written
adapter is. The only difference left is the order of the float32 sums in B @ A (torch's matmul
here, the engine's row blocks there): a few ulps of W, checked against the written path in
tests/test_search.py. `restore` puts every adapted weight back to the base's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from umerge.adapters.lora import LoraAdapter, factor_names
from umerge.errors import InputError

_PREFIX = "base_model.model."
_TORCH_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def module_path(adapter_module: str) -> str:
    """``base_model.model.model.layers.0.mlp.up_proj`` -> ``model.layers.0.mlp.up_proj`` (the module in the base)."""
    return adapter_module[len(_PREFIX):] if adapter_module.startswith(_PREFIX) else adapter_module


def merged_scaling(adapters: Sequence[LoraAdapter], rank: int) -> float:
    """The merged adapter's scaling: PEFT sets r = lora_alpha = rank, so 1, or sqrt(rank) with rsLoRA
    (the first adapter's use_rslora is kept, `umerge.adapters.merge.new_config`)."""
    return rank / (math.sqrt(rank) if adapters[0].config.use_rslora else rank)


class MergedModel:
    """The base model and tokenizer, with `apply(candidate tensors)` and `restore()`."""

    def __init__(self, base: str | Path, adapters: Sequence[LoraAdapter], device: str | None = None) -> None:
        from umerge.evaluate._torch import require_torch, require_transformers
        from umerge.safetensors_io import checkpoint_dtypes

        torch = require_torch()
        require_transformers()
        from transformers import AutoModelForCausalLM

        base = Path(base)
        if not (base / "config.json").is_file():
            raise InputError(f"{base}: not a model directory (no config.json); --base must be the full model "
                             "the adapters were trained on")
        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.eval_dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.adapters = list(adapters)
        self.fan_in_fan_out = adapters[0].config.fan_in_fan_out
        self.factor_dtype = getattr(torch, _TORCH_DTYPES.get(adapters[0].dtype, "float32"))
        stored = checkpoint_dtypes(base)
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a per-file loading bar: noise beside the search's own bar
        try:
            model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        self.base = base
        self._tokenizer: Any = None
        self.params: dict[str, Any] = {}
        self.original: dict[str, Any] = {}
        self.storage: dict[str, Any] = {}
        for mod, lm in adapters[0].modules.items():
            name = module_path(mod) + ".weight"
            try:
                p = model.get_parameter(name)
            except AttributeError:
                raise InputError(f"the adapters adapt {module_path(mod)}, which {base} does not have: adapters of "
                                 "another base model?") from None
            want = (lm.a.shape[1], lm.b.shape[0]) if self.fan_in_fan_out else (lm.b.shape[0], lm.a.shape[1])
            if tuple(p.shape) != want:
                raise InputError(f"{name} has shape {list(p.shape)} in {base} but the adapters' update is {list(want)}: "
                                 "adapters of another base model?")
            dtype = getattr(torch, _TORCH_DTYPES.get(stored.get(name, "F32"), "float32"))
            self.storage[name] = dtype
            # exact: the float32 values were loaded from `dtype`
            self.original[name] = p.detach().to(dtype).clone().to(self.device)
            self.params[name] = p
        self.model = model.to(device=self.device, dtype=self.eval_dtype).eval()
        # the parameter objects survive .to(); look them up again in case a backend replaced them
        self.params = {n: self.model.get_parameter(n) for n in self.params}

    def apply(self, tensors: dict[str, Any], rank: int) -> None:
        """Set every adapted weight to W + scaling * B @ A for the merged factors `tensors`
        (`merged_tensors`' output: numpy float32 arrays under the adapter's names)."""
        torch = self.torch
        scaling = merged_scaling(self.adapters, rank)
        with torch.no_grad():
            for mod in self.adapters[0].modules:
                na, nb = factor_names(mod)
                a = torch.from_numpy(tensors[na]).to(self.factor_dtype).to(device=self.device, dtype=torch.float32)
                b = torch.from_numpy(tensors[nb]).to(self.factor_dtype).to(device=self.device, dtype=torch.float32)
                delta = b @ a
                if self.fan_in_fan_out:
                    delta = delta.T
                name = module_path(mod) + ".weight"
                w = self.original[name].to(torch.float32) + scaling * delta
                self.params[name].copy_(w.to(self.storage[name]).to(self.eval_dtype))

    def restore(self) -> None:
        """Every adapted weight back to the base's."""
        with self.torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.original[name].to(self.eval_dtype))

    @property
    def tokenizer(self) -> Any:
        """The base's tokenizer, loaded on first use (the weights alone need none)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.base))
        return self._tokenizer

    def pair(self) -> tuple[Any, Any]:
        """``(model, tokenizer)`` as `umerge.evaluate.evaluate` takes an in-memory model."""
        return self.model, self.tokenizer


__all__ = ["MergedModel", "merged_scaling", "module_path"]
