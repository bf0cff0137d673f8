"""`umerge.quantize`: fake-quantize a model (int4 or int8, round to nearest, group-wise symmetric).

Why: an unlearned model can look as if it forgot at full precision and remember again once
quantized. Zhang et al. ("Catastrophic Failure of LLM Unlearning via Quantization", ICLR 2025,
arXiv:2410.16454) found an unlearned model that kept 21% of the forgotten knowledge at full
precision keep 83% after 4-bit quantization: the unlearning updates are smaller than a
quantization step, so rounding undoes them. This module writes the quantized model so that any
evaluation (`umerge eval --quantize int4`) can check whether the forgetting survives.

What it computes (the engine's `umerge_core::quantize`, streamed, in float32): for each chosen
weight W of shape [out, in], per row and per group of `group_size` consecutive input columns (the
last group shorter when `in` is not a multiple; ``group_size=-1``: one group per row)::

    scale = max|w| / qmax            qmax = 7 (int4), 127 (int8)
    q     = clamp(round(w / scale), -qmax, qmax)     round to nearest, ties to even
    w'    = q * scale                written back in W's dtype (rounded to nearest even)

A group whose scale is 0 becomes zeros. This is AWQ's symmetric round-to-nearest
(``pseudo_quantize_tensor`` with ``zero_point=False``, Lin et al. 2024) with its scale and its
rounding (``torch.round``): AWQ clamps to -8..7, but no value of w / (max|w| / 7) lies beyond ±7,
so the grids are the same. The integers are not stored: the output is a full-precision
checkpoint of the dequantized values, which transformers loads as any other.

Which tensors (`select_tensors`): every 2-D float tensor whose name matches `include` (default
`DEFAULT_INCLUDE`: names ending in ``.weight``) and does not match `exclude` (default
`DEFAULT_EXCLUDE`: token and position embeddings and the output head, which the usual 4-bit
schemes keep in full precision). 1-D tensors (norms, biases) and integer tensors are never
quantized. Both patterns are Python regular expressions found anywhere in the name
(`re.search`); ``exclude=""`` excludes nothing. Every tensor not chosen is copied unchanged.
The groups run along the stored tensor's last dimension, the input features of an
``nn.Linear``; GPT-2's ``Conv1D`` stores [in, out], so there they run along the outputs.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from umerge.errors import InputError
from umerge.merge import MergeReport, PathLike, ProgressArg, output_options, require_local, run_engine

#: The bit widths, and what `umerge eval --quantize` calls them.
BITS = {"int4": 4, "int8": 8}
#: Tensors considered for quantization: weights (not biases).
DEFAULT_INCLUDE = r"\.weight$"
#: Tensors kept in full precision although 2-D: token and position embeddings, the output head.
DEFAULT_EXCLUDE = (r"(^|\.)(embed_tokens|embed_positions|embed_out|tok_embeddings|wte|wpe|word_embeddings"
                   r"|position_embeddings|token_type_embeddings|lm_head)\.weight$")
DEFAULT_GROUP_SIZE = 128
_FLOATS = {"F32", "F16", "BF16", "F64"}


def _pattern(value: str | None, default: str, what: str) -> re.Pattern[str] | None:
    text = default if value is None else value
    if text == "":
        return None
    try:
        return re.compile(text)
    except re.error as exc:
        raise InputError(f"--{what} {text!r} is not a regular expression ({exc})") from None


def _tensors(model: PathLike) -> list[dict[str, Any]]:
    """The model's tensors (name, dtype, shape) from its headers, or a one-line error."""
    from umerge import _core

    require_local(model)
    info = json.loads(_core.inspect(os.fspath(model)))
    if not info.get("valid"):
        raise InputError(str(info.get("error", f"{os.fspath(model)}: not a safetensors checkpoint")))
    tensors: list[dict[str, Any]] = info["tensors"]
    return tensors


def select_tensors(model: PathLike, include: str | None = None, exclude: str | None = None) -> list[str]:
    """The names of the tensors `quantize` quantizes (see the module docstring for the rule), in
    checkpoint order."""
    inc = _pattern(include, DEFAULT_INCLUDE, "include")
    exc = _pattern(exclude, DEFAULT_EXCLUDE, "exclude")
    chosen = []
    for t in _tensors(model):
        name = t["name"]
        if t["dtype"] not in _FLOATS or len(t["shape"]) != 2:
            continue
        if (inc is None or inc.search(name)) and not (exc is not None and exc.search(name)):
            chosen.append(name)
    return chosen


def group_size_value(group_size: int | None) -> int | None:
    """The engine's group size: a positive number of columns, or None (-1 or None: per row)."""
    if group_size is None or group_size == -1:
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise InputError(f"group size {group_size!r} is not a positive number of columns (use -1 for one group per row)")
    return group_size


def bits_value(bits: int | str) -> int:
    """4 or 8 from 4, 8, "int4" or "int8"."""
    b = BITS.get(bits, bits) if isinstance(bits, str) else bits
    if b not in BITS.values():
        raise InputError(f"bits {bits!r} is not supported: use 4 (int4) or 8 (int8)")
    return int(b)


def quantize(
    model: PathLike,
    out: PathLike = "quantized",
    *,
    bits: int | str = 4,
    group_size: int | None = DEFAULT_GROUP_SIZE,
    include: str | None = None,
    exclude: str | None = None,
    out_dtype: str | None = None,
    threads: int | None = None,
    memory_budget: str | int | None = None,
    max_shard_size: str | int | None = None,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    progress: ProgressArg = True,
    page_cache: str | None = None,
) -> MergeReport:
    """Writes `model` with its linear weights quantized to `bits` (4 or 8) and dequantized, in
    groups of `group_size` input columns (-1: per row); config and tokenizer copied. The same
    bytes for any `threads` and `memory_budget`.
    Example: ``umerge.quantize("unlearned/", "unlearned-int4/", bits=4, group_size=128)``."""
    b = bits_value(bits)
    g = group_size_value(group_size)
    names = select_tensors(model, include, exclude)
    if not names:
        raise InputError(f"no tensor of {os.fspath(model)} matches --include {include or DEFAULT_INCLUDE!r} "
                         f"outside --exclude {DEFAULT_EXCLUDE if exclude is None else exclude!r}: nothing to quantize")
    spec = output_options(out, out_dtype, threads, memory_budget, max_shard_size, overwrite, allow_nonfinite,
                          page_cache)
    spec.update(model=os.fspath(model), bits=b, group_size=g, tensors=names)
    from umerge import _core

    return run_engine(_core.quantize, spec, progress)


__all__ = ["BITS", "DEFAULT_EXCLUDE", "DEFAULT_GROUP_SIZE", "DEFAULT_INCLUDE", "quantize", "select_tensors"]
