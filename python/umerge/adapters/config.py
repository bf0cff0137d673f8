"""Reading and checking a PEFT LoRA adapter directory: `adapter_config.json` + weights.

A PEFT adapter directory (what `PeftModel.save_pretrained` writes) holds `adapter_config.json`
and `adapter_model.safetensors`. The weights are named
``base_model.model.<module>.lora_A.weight`` (shape ``[r, in]``) and ``...lora_B.weight``
(``[out, r]``), where ``<module>`` is the targeted module's path in the base model, so its base
weight is ``<module>.weight``.

The update a module receives is ``delta W = scaling * B @ A`` (transposed when
``fan_in_fan_out``, as for GPT-2's Conv1D layers), with ``scaling = lora_alpha / r``, or
``lora_alpha / sqrt(r)`` with rank-stabilised LoRA (``use_rslora``) — PEFT's
`LoraLayer.update_layer`.

Only plain LoRA is accepted. Anything whose meaning umerge does not reproduce is refused with a
one-line error rather than merged wrongly: DoRA, per-module rank or alpha patterns, LoRA biases,
`modules_to_save`, targeted parameters, embedding or convolution LoRA, pickled weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from umerge.errors import InputError
from umerge.merge import PathLike

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"


def is_adapter_dir(path: PathLike) -> bool:
    """True when `path` is a directory that looks like a PEFT adapter (config or adapter weights)."""
    p = Path(path)
    return p.is_dir() and any((p / n).exists() for n in (CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME))


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of `adapter_config.json` a merge or a fold depends on (`raw` keeps the rest)."""

    path: Path
    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: list[str] | str | None
    fan_in_fan_out: bool
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def scaling(self) -> float:
        """PEFT's scaling of B @ A: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def target_set(self) -> frozenset[str] | str | None:
        """target_modules as PEFT compares them: a set for lists, the regex string otherwise."""
        if isinstance(self.target_modules, list):
            return frozenset(self.target_modules)
        return self.target_modules


def _empty(v: Any) -> bool:
    return v is None or v is False or v == {} or v == [] or v == ""


def read_config(path: PathLike) -> AdapterConfig:
    """Reads and checks `<path>/adapter_config.json`; raises InputError saying what is wrong."""
    d = Path(path)
    if not d.is_dir():
        raise InputError(f"adapter {d} is not a directory")
    cfg_path = d / CONFIG_NAME
    if not cfg_path.is_file():
        raise InputError(f"{d} has no {CONFIG_NAME}: not a PEFT adapter directory (save it with PeftModel.save_pretrained)")
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {cfg_path}: {e}") from None
    if not isinstance(raw, dict):
        raise InputError(f"{cfg_path} is not a JSON object")
    where = f"({cfg_path})"
    peft_type = str(raw.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise InputError(f"adapter type {peft_type} is not supported, only LoRA {where}")
    unsupported = {
        "use_dora": "DoRA adapters",
        "rank_pattern": "per-module ranks (rank_pattern)",
        "alpha_pattern": "per-module alphas (alpha_pattern)",
        "lora_bias": "LoRA biases (lora_bias)",
        "modules_to_save": "modules_to_save (fully trained extra modules)",
        "target_parameters": "targeted parameters (target_parameters)",
        "layer_replication": "layer replication",
    }
    for key, what in unsupported.items():
        if not _empty(raw.get(key)):
            raise InputError(f"{what} are not supported by umerge's adapter merging {where}")
    try:
        r = int(raw["r"])
        alpha = float(raw.get("lora_alpha", 8))
    except (KeyError, TypeError, ValueError):
        raise InputError(f"adapter config has no valid integer r {where}") from None
    if r <= 0:
        raise InputError(f"adapter rank r = {r} must be positive {where}")
    tm = raw.get("target_modules")
    if tm is not None and not isinstance(tm, (str, list)):
        raise InputError(f"target_modules must be a list or a string {where}")
    return AdapterConfig(
        path=d,
        r=r,
        lora_alpha=alpha,
        use_rslora=bool(raw.get("use_rslora", False)),
        target_modules=sorted(tm) if isinstance(tm, list) else tm,
        fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        raw=raw,
    )


def weights_path(path: PathLike) -> Path:
    """The adapter's safetensors file; pickled `adapter_model.bin` weights are refused."""
    d = Path(path)
    w = d / WEIGHTS_NAME
    if w.is_file():
        return w
    if (d / PICKLE_NAME).is_file():
        raise InputError(
            f"{d} holds pickled weights ({PICKLE_NAME}); umerge reads only {WEIGHTS_NAME} "
            "(re-save with PeftModel.save_pretrained(..., safe_serialization=True))"
        )
    raise InputError(f"{d} has no {WEIGHTS_NAME}")


__all__ = ["AdapterConfig", "CONFIG_NAME", "WEIGHTS_NAME", "is_adapter_dir", "read_config", "weights_path"]
