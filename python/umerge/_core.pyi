"""Type stub of the native engine module `umerge._core` (Rust, PyO3)."""

from collections.abc import Callable

__all__ = [
    "UmergeError",
    "InputError",
    "merge",
    "fold",
    "quantize",
    "extract_lora",
    "inspect",
    "verify",
    "merge_arrays",
    "version",
    "methods",
    "method_info",
]

class UmergeError(Exception):
    """Base class of every error umerge raises on purpose."""

class InputError(UmergeError, ValueError):
    """Bad input or options: a message saying what is wrong and where."""

def merge(spec_json: str, progress: Callable[[int, int, int, int], None] | None = None) -> str:
    """Runs the merge described by the JSON spec (see umerge.merge); returns the report as JSON.
    `progress(tensors_done, tensors_total, bytes_done, bytes_total)` is called after each tensor."""

def fold(spec_json: str, progress: Callable[[int, int, int, int], None] | None = None) -> str:
    """Folds LoRA adapters into their base (W + scaling * B @ A per targeted module) as described by
    the JSON fold spec (see umerge.adapters.folding); returns the report as JSON. Progress as in merge."""

def quantize(spec_json: str, progress: Callable[[int, int, int, int], None] | None = None) -> str:
    """Fake-quantizes the tensors the JSON quantize spec lists (int4/int8, round to nearest, group-wise
    symmetric, written back in their dtype; see umerge.quantization); returns the report as JSON."""

def extract_lora(spec_json: str, progress: Callable[[int, int, int, int], None] | None = None) -> str:
    """Extracts a PEFT LoRA adapter from a fine-tune and its base (truncated SVD of each task vector)
    as described by the JSON extraction spec (see umerge.adapters.extract); returns the report as JSON
    (the merge report's fields plus `modules` and `skipped`). Progress as in merge."""

def verify(path: str, scan_nonfinite: bool = False, hash: bool = True) -> str:
    """Verifies a checkpoint (headers, index, sizes, NaN/Inf scan, sha256 against the recipe); returns
    the report as JSON (`valid`, `shards`, `errors`, `warnings`, ...)."""

def inspect(path: str) -> str:
    """Describes a checkpoint as JSON: format, shards, tensors, totals, validity."""

def merge_arrays(
    method: str,
    params_json: str,
    base: bytes | None,
    models: list[bytes],
    threads: int | None = None,
) -> bytes:
    """Merges little-endian float32 buffers as one tensor; returns float32 bytes."""

def version() -> str:
    """The engine's version."""

def methods() -> list[str]:
    """Names of the merge methods this build knows."""

def method_info() -> str:
    """The methods and their parameters as JSON: [{name, base, params: [{name, per_model, default, doc}]}]."""
