"""A LoRA adapter in memory: its config and, per targeted module, the factors A and B.

Adapters are small (a few hundred MB at most for 7B models at r = 64), so the factor-wise
merges load them whole as float32 numpy arrays; the base model is never loaded here (folding
streams it in Rust, see `umerge.adapters.folding`). Also writes an adapter directory that
`PeftModel.from_pretrained` loads, built in a temporary directory and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from umerge.adapters.config import CONFIG_NAME, WEIGHTS_NAME, AdapterConfig, PathLike, read_config, weights_path
from umerge.errors import InputError
from umerge.safetensors_io import decode, read_header, write_tensors

_A, _B = ".lora_A.weight", ".lora_B.weight"


@dataclass
class LoraModule:
    """One targeted module: A is [r, in], B is [out, r] (float32), with the names they had on disk."""

    a: np.ndarray
    b: np.ndarray


@dataclass
class LoraAdapter:
    """A whole adapter: config, modules in file order, and the storage dtype of its factors."""

    config: AdapterConfig
    modules: dict[str, LoraModule]
    dtype: str

    @property
    def path(self) -> Path:
        return self.config.path


def load_adapter(path: PathLike) -> LoraAdapter:
    """Reads and checks an adapter directory (config, then every factor's name and shape)."""
    cfg = read_config(path)
    wfile = weights_path(path)
    try:
        header, start = read_header(wfile)
        data = np.fromfile(wfile, dtype=np.uint8)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"cannot read {wfile}: {e}") from None
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    factors: dict[str, dict[str, np.ndarray]] = {}
    dtypes = set()
    for k in names:
        if k.endswith(_A) or k.endswith(_B):
            mod, which = k[: -len(_A)], k[-len(_A):]
        else:
            what = "embedding LoRA" if "lora_embedding" in k else "tensors other than lora_A/lora_B weights"
            raise InputError(f"{what} are not supported: {k} ({wfile})")
        info = header[k]
        if info["dtype"] not in ("F32", "F16", "BF16", "F64"):
            raise InputError(f"tensor {k} has dtype {info['dtype']}, not a float ({wfile})")
        if len(info["shape"]) != 2:
            raise InputError(f"tensor {k} has shape {info['shape']}: only 2-D (linear-layer) LoRA is supported ({wfile})")
        begin, end = info["data_offsets"]
        if start + end > data.size:
            raise InputError(f"tensor {k} runs past the end of the file (truncated?) ({wfile})")
        arr = decode(data[start + begin:start + end], info["dtype"], info["shape"]).astype(np.float32, copy=False)
        factors.setdefault(mod, {})[which] = arr
        dtypes.add(info["dtype"])
    if not factors:
        raise InputError(f"adapter has no lora_A/lora_B tensors ({wfile})")
    modules: dict[str, LoraModule] = {}
    for mod, f in factors.items():
        if _A not in f or _B not in f:
            missing = "lora_B" if _A in f else "lora_A"
            raise InputError(f"module {mod} has no {missing} weight ({wfile})")
        a, bm = f[_A], f[_B]
        if a.shape[0] != cfg.r or bm.shape[1] != cfg.r:
            raise InputError(
                f"module {mod} has rank {a.shape[0]} (lora_A {list(a.shape)}, lora_B {list(bm.shape)}) "
                f"but adapter_config.json says r = {cfg.r} ({wfile})"
            )
        modules[mod] = LoraModule(a=a, b=bm)
    dtype = "F32" if len(dtypes) != 1 else dtypes.pop()
    return LoraAdapter(config=cfg, modules=modules, dtype=dtype)


def check_same_modules(adapters: Sequence[LoraAdapter]) -> None:
    """All adapters must target the same modules with the same in/out shapes."""
    first = adapters[0]
    for other in adapters[1:]:
        a, b = set(first.modules), set(other.modules)
        if a != b:
            only = sorted(a - b)[:2] or sorted(b - a)[:2]
            where = first.path if only and only[0] in a else other.path
            raise InputError(
                f"adapters {first.path} and {other.path} target different modules "
                f"({len(a ^ b)} differ, e.g. {only[0]} only in {where}); merge adapters trained on the same target_modules"
            )
        for m, x in first.modules.items():
            y = other.modules[m]
            if (x.a.shape[1], x.b.shape[0]) != (y.a.shape[1], y.b.shape[0]):
                raise InputError(
                    f"module {m} maps {x.a.shape[1]} -> {x.b.shape[0]} in {first.path} but "
                    f"{y.a.shape[1]} -> {y.b.shape[0]} in {other.path}: adapters of different base models"
                )


def check_output(out: PathLike, inputs: Sequence[PathLike], overwrite: bool) -> Path:
    """Refuses an output that is an input, lies inside one, or exists non-empty without overwrite."""
    target = Path(out).absolute().resolve()
    for i in inputs:
        ip = Path(i).absolute().resolve()
        if target == ip or ip in target.parents or (overwrite and target in ip.parents):
            raise InputError(f"the output {out} is, holds, or lies inside the input {i}: choose another -o")
    if target.exists():
        if not target.is_dir():
            raise InputError(f"the output {out} exists and is not a directory")
        if any(target.iterdir()) and not overwrite:
            raise InputError(f"the output directory {out} exists and is not empty (pass --overwrite / overwrite=True to replace it)")
    if not target.parent.is_dir():
        raise InputError(f"the output's parent directory {target.parent} does not exist")
    return target


def write_adapter(
    out: Path,
    config: Mapping[str, Any],
    tensors: Mapping[str, np.ndarray],
    dtype: str,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Writes `adapter_config.json` and `adapter_model.safetensors` into a temporary directory
    beside `out` and renames it into place (an existing `out` is replaced)."""
    tmp = out.parent / f".umerge-tmp-{out.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        (tmp / CONFIG_NAME).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
        write_tensors(tmp / WEIGHTS_NAME, tensors, dtype=dtype, metadata={"format": "pt"})
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def factor_names(module: str) -> tuple[str, str]:
    """The on-disk names of a module's A and B factors."""
    return module + _A, module + _B


__all__ = ["LoraAdapter", "LoraModule", "check_output", "check_same_modules", "factor_names", "load_adapter", "write_adapter"]
