"""`umerge.extract_lora`: a PEFT LoRA adapter extracted from a fine-tune and its base, with the
semantics of mergekit 0.1.5's `mergekit-extract-lora`.

For every linear weight the task vector delta = W_ft - W_base is approximated by its truncated SVD
delta ~ U_r S_r V_r^T, written as lora_B = U_r S_r^(1/2) and lora_A = S_r^(1/2) V_r^T
(`distribute_scale`, mergekit's default) or lora_B = U_r and lora_A = S_r V_r^T, with
lora_alpha = r so that PEFT's scaling is 1 and B @ A is the approximation itself.

This module plans the extraction the way mergekit does, so that the include/exclude patterns are
Python regular expressions applied with `re.search` to module names, as in mergekit. It walks the
fine-tune's modules (a tensor `<module>.weight` makes a module) in storage order:

1. without `embed_lora`, an embedding (input embeddings such as `embed_tokens`, `wte`, `wpe`,
   `word_embeddings`; output embeddings `lm_head`, `embed_out`) that no exclude pattern matches
   joins `modules_to_save` (by its last name, as mergekit keys them);
2. a module in `modules_to_save` (by full or last name, `save_modules` included) is saved at full
   size;
3. otherwise, a module that passes the filters (it matches an include pattern, when there are any,
   and no exclude pattern) is decomposed when its weight is a 2-D float tensor: as PEFT's
   embedding LoRA (`lora_embedding_A/B`) for an input embedding under `embed_lora`, as a linear
   LoRA otherwise (`lm_head` too); any other weight (norms, convolutions) cannot be decomposed and
   is saved at full size (its last name joins `modules_to_save`), or left out with
   `skip_undecomposable`.

When the vocabularies differ (the fine-tune's input embedding has more rows than the base's),
`embed_lora` is turned off with a warning and the embeddings are saved at full size, as mergekit
does; the base must then be resized (`resize_token_embeddings`) before the adapter is loaded.

The engine (`umerge_core::extract`) then does the numerics and writes the adapter: randomized SVD
(oversampling `oversample`, `power_iters` power iterations, seeded by `seed` and each tensor's name;
the exact SVD where rank + oversample >= the smaller dimension), streamed tensor by tensor through
the memory-mapped checkpoints within `memory_budget`, the same bytes for any thread count. Modules
whose weights equal the base's are left out (mergekit writes them), and so are modules with no
singular value above `sv_epsilon`; `target_modules` and `modules_to_save` name exactly the modules
written. The output directory is built beside `out` and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from umerge.errors import InputError
from umerge.merge import MergeReport, PathLike, ProgressArg, _progress_fn, output_options, require_local

#: Last names of input embedding modules (nn.Embedding in the architectures mergekit knows).
INPUT_EMBEDDINGS = frozenset({"embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings",
                              "token_type_embeddings", "embed_in", "tok_embeddings", "embed_positions"})
#: Last names of output embedding modules (the LM head, an nn.Linear).
OUTPUT_EMBEDDINGS = frozenset({"lm_head", "embed_out"})

_FLOATS = ("BF16", "F16", "F32", "F64")


@dataclass(frozen=True)
class ExtractedModule:
    """One module of the adapter: decomposed (`lora`, `embedding`) at `rank`, with the relative
    Frobenius error ||delta - B @ A|| / ||delta|| before rounding to the output dtype (estimated from
    the singular values, so reliable down to about 1e-3), or saved at full size (`save`)."""

    module: str
    kind: str
    rank: int
    relative_error: float | None
    exact: bool


@dataclass(frozen=True)
class ExtractReport(MergeReport):
    """What an extraction did: the engine's counts, bytes, time and memory, every module written,
    and the modules left out because they equal the base."""

    modules: tuple[ExtractedModule, ...] = field(default_factory=tuple)
    skipped: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_json(cls, text: str) -> "ExtractReport":
        d = json.loads(text)
        base = MergeReport.from_json(json.dumps({k: v for k, v in d.items() if k not in ("modules", "skipped")}))
        return cls(**{f.name: getattr(base, f.name) for f in fields(MergeReport)},
                   modules=tuple(ExtractedModule(**m) for m in d.get("modules", ())),
                   skipped=tuple(d.get("skipped", ())))

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["modules"] = [asdict(m) for m in self.modules]
        d["skipped"] = list(self.skipped)
        return d

    def summary(self) -> str:
        lora = [m for m in self.modules if m.kind != "save"]
        saved = len(self.modules) - len(lora)
        errs = sorted(m.relative_error for m in lora if m.relative_error is not None)
        mid = errs[len(errs) // 2] if errs else None
        median = "" if mid is None else f", median relative error {mid:.3g}" if mid >= 1e-3 else ", median relative error below 1e-3"
        rank = max((m.rank for m in lora), default=0)
        return (f"extracted {len(lora)} modules at rank <= {rank}{median}; {saved} saved at full size, "
                f"{len(self.skipped)} unchanged left out ({self.bytes_read / 1e9:.2f} GB read) in {self.seconds:.1f} s, "
                f"peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB, {self.threads} threads -> {self.output}")


def _tensors(path: PathLike, what: str) -> list[dict[str, Any]]:
    from umerge.merge import inspect

    require_local(path, what)
    info = inspect(path)
    if not info.get("valid", False):
        raise InputError(str(info.get("error", f"{path} is not a readable safetensors checkpoint")))
    tensors: list[dict[str, Any]] = info["tensors"]
    return tensors


def _compile(patterns: Sequence[str], what: str) -> list[re.Pattern[str]]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise InputError(f"{what} pattern {p!r} is not a regular expression: {e}") from None
    return out


def plan_modules(
    finetuned: list[dict[str, Any]],
    base: list[dict[str, Any]],
    *,
    embed_lora: bool = False,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    save_modules: Sequence[str] = (),
    skip_undecomposable: bool = False,
) -> tuple[list[dict[str, str]], list[str]]:
    """mergekit's plan (module docs) over the tensors of both checkpoints (as `umerge.inspect`
    lists them): the engine's module list ``[{"module", "kind"}]`` and the warnings."""
    inc, exc = _compile(include, "include"), _compile(exclude, "exclude")
    weights = {t["name"][: -len(".weight")]: t for t in finetuned if t["name"].endswith(".weight")}
    base_shapes = {t["name"]: t["shape"] for t in base}
    warnings: list[str] = []

    def last(module: str) -> str:
        return module.rsplit(".", 1)[-1]

    inputs = [m for m in weights if last(m) in INPUT_EMBEDDINGS]
    if embed_lora:
        resized = [m for m in inputs if base_shapes.get(m + ".weight", weights[m]["shape"])[:1] != weights[m]["shape"][:1]]
        if resized:
            m = resized[0]
            warnings.append(f"the vocabulary differs ({m}.weight has {weights[m]['shape'][0]} rows in the fine-tune, "
                            f"{base_shapes[m + '.weight'][0]} in the base): embeddings are saved at full size instead of "
                            "--embed-lora, as mergekit does (resize the base's embeddings before loading the adapter)")
            embed_lora = False
    to_save = list(save_modules)
    plan: list[dict[str, str]] = []
    for module, w in weights.items():
        key = last(module)
        embedding = key in INPUT_EMBEDDINGS or key in OUTPUT_EMBEDDINGS
        if not embed_lora and embedding and not any(r.search(module) for r in exc) and key not in to_save:
            to_save.append(key)
        if module in to_save or key in to_save:
            plan.append({"module": module, "kind": "save"})
            continue
        if (inc and not any(r.search(module) for r in inc)) or any(r.search(module) for r in exc):
            continue
        if len(w["shape"]) == 2 and w["dtype"] in _FLOATS:
            kind = "embedding" if key in INPUT_EMBEDDINGS else "lora"
            plan.append({"module": module, "kind": kind})
        elif not skip_undecomposable:
            if key not in to_save:
                to_save.append(key)
            plan.append({"module": module, "kind": "save"})
    return plan, warnings


def extract_lora(
    finetuned: PathLike,
    base: PathLike,
    out: PathLike = "lora",
    *,
    rank: int = 128,
    distribute_scale: bool = True,
    sv_epsilon: float = 0.0,
    embed_lora: bool = False,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    save_modules: Sequence[str] = (),
    skip_undecomposable: bool = False,
    oversample: int = 10,
    power_iters: int = 2,
    seed: int = 0,
    out_dtype: str | None = None,
    threads: int | None = None,
    memory_budget: str | int | None = None,
    overwrite: bool = False,
    progress: ProgressArg = True,
) -> ExtractReport:
    """Extracts a PEFT LoRA adapter of rank at most `rank` from `finetuned` and its `base` (module
    docs): ``PeftModel.from_pretrained(base_model, out)`` then approximates the fine-tune.

    Example: ``umerge.extract_lora("ft/", base="base/", out="lora/", rank=32)``."""
    if isinstance(include, str) or isinstance(exclude, str) or isinstance(save_modules, str):
        raise InputError("include, exclude and save_modules are lists of patterns or names, not a string")
    if int(rank) < 1:
        raise InputError(f"rank must be at least 1, got {rank}")
    if not (float(sv_epsilon) >= 0.0):
        raise InputError(f"sv_epsilon must be a non-negative number, got {sv_epsilon}")
    if int(oversample) < 0 or int(power_iters) < 0:
        raise InputError("oversample and power_iters must be non-negative")
    ft_tensors = _tensors(finetuned, "fine-tuned model")
    base_tensors = _tensors(base, "base model")
    modules, warnings = plan_modules(ft_tensors, base_tensors, embed_lora=embed_lora, include=include,
                                     exclude=exclude, save_modules=save_modules,
                                     skip_undecomposable=skip_undecomposable)
    if not any(m["kind"] != "save" for m in modules):
        raise InputError(f"no module of {finetuned} is left to decompose (check the include/exclude patterns "
                         "and --save-module)")
    spec: dict[str, Any] = output_options(out, out_dtype, threads, memory_budget, None, overwrite, False, None)
    spec.update(finetuned=os.fspath(finetuned), base=os.fspath(base), rank=int(rank),
                distribute_scale=bool(distribute_scale), sv_epsilon=float(sv_epsilon), oversample=int(oversample),
                power_iters=int(power_iters), seed=int(seed), modules=modules,
                base_model_name_or_path=os.fspath(base))
    from umerge import _core

    fn, bar = _progress_fn(progress)
    try:
        text = _core.extract_lora(json.dumps(spec), fn)
    finally:
        if bar is not None:
            bar.close()
    report = ExtractReport.from_json(text)
    if warnings:
        report = replace(report, warnings=tuple(warnings) + report.warnings)
    return report


__all__ = ["INPUT_EMBEDDINGS", "OUTPUT_EMBEDDINGS", "ExtractReport", "ExtractedModule", "extract_lora", "plan_modules"]
