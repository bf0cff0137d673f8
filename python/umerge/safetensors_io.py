"""A small, dependency-free safetensors reader and streaming writer (numpy only).

The safetensors format (https://github.com/huggingface/safetensors): 8 bytes little-endian unsigned
header length N, then N bytes of JSON mapping each tensor name to {"dtype", "shape", "data_offsets":
[begin, end]} (offsets relative to the end of the header) plus an optional "__metadata__" map of
strings, then the raw little-endian tensor bytes. The JSON is padded with spaces so the data starts
on an 8-byte boundary, as the reference implementation does.

Why our own: numpy has no bfloat16, and the `safetensors.numpy` API needs whole arrays in memory.
Here the header is written first (all shapes are known) and the data is then appended chunk by
chunk, so a multi-GiB shard needs only one chunk of RAM. bfloat16 is converted from float32 bit
patterns with round-to-nearest-even, so `ml_dtypes` is not needed.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

#: safetensors dtype name -> bytes per element, for the floating-point dtypes merges work on.
DTYPES: dict[str, int] = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}

#: Every safetensors dtype we can read and write, and its element size.
ALL_DTYPES: dict[str, int] = {**DTYPES, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "U16": 2, "U32": 4,
                              "U64": 8, "BOOL": 1}

_NUMPY = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
          "U8": "u1", "U16": "<u2", "U32": "<u4", "U64": "<u8", "BOOL": "?"}

_ALIASES = {
    "f64": "F64", "float64": "F64", "double": "F64",
    "f32": "F32", "float32": "F32", "float": "F32",
    "f16": "F16", "float16": "F16", "half": "F16",
    "bf16": "BF16", "bfloat16": "BF16",
}

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def canonical_dtype(dtype: str) -> str:
    """`"bf16"`, `"bfloat16"` or `"BF16"` -> `"BF16"` (the safetensors spelling)."""
    if dtype in ALL_DTYPES:
        return dtype
    try:
        return _ALIASES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of f32, bf16, f16, f64") from None


def f32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest, ties to even; NaN stays NaN.

    bf16 is the top 16 bits of a float32. Adding 0x7FFF plus the lowest kept bit before dropping the
    low 16 bits rounds to nearest with ties to even (overflow into the exponent gives the right
    result, up to +-inf).
    """
    bits = np.ascontiguousarray(values, dtype="<f4").view("<u4")
    rounded = ((bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16).astype("<u2")
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x0040).astype("<u2")  # keep sign, force a quiet NaN
    return rounded


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 (exact)."""
    return (np.asarray(bits, dtype="<u2").astype("<u4") << 16).view("<f4")


def encode(values: np.ndarray, dtype: str) -> bytes:
    """Array -> the little-endian bytes safetensors stores for `dtype` (BF16 rounds to nearest even)."""
    dtype = canonical_dtype(dtype)
    if dtype == "BF16":
        return f32_to_bf16_bits(np.asarray(values, dtype=np.float32)).tobytes()
    return np.ascontiguousarray(values, dtype=_NUMPY[dtype]).tobytes()


def decode(raw: bytes | np.ndarray, dtype: str, shape: Iterable[int] = (-1,)) -> np.ndarray:
    """safetensors bytes -> numpy array: float32 for F32/F16/BF16, float64 for F64, ints as stored."""
    buf = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, (bytes, bytearray, memoryview)) else raw
    shape = tuple(shape)
    if dtype == "BF16":
        return bf16_bits_to_f32(buf.view("<u2")).reshape(shape)
    if dtype == "F16":
        return buf.view("<f2").astype(np.float32).reshape(shape)
    return buf.view(_NUMPY[dtype]).reshape(shape)


def _padded_header(header: Mapping[str, Any]) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    return text + b" " * (-(8 + len(text)) % 8)


class SafetensorsWriter:
    """Writes one safetensors file whose tensors are all declared up front, then streamed in order.

    >>> with SafetensorsWriter(path, [("w", "BF16", (2, 3))]) as w:   # doctest: +SKIP
    ...     w.write(np.zeros(6, np.float32))                          # any number of chunks
    """

    def __init__(self, path: str | Path, tensors: Iterable[tuple[str, str, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None) -> None:
        self.path = Path(path)
        self._layout: list[tuple[str, str, int]] = []  # (name, dtype, n_elements), in file order
        header: dict[str, Any] = {"__metadata__": dict(metadata if metadata is not None else {"format": "pt"})}
        offset = 0
        for name, dtype, shape in tensors:
            dtype = canonical_dtype(dtype)
            n = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
            size = n * ALL_DTYPES[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._layout.append((name, dtype, n))
            offset += size
        self.data_size = offset
        head = _padded_header(header)
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._file.write(struct.pack("<Q", len(head)) + head)
        self._current = 0  # index into _layout of the tensor being written
        self._written = 0  # elements of that tensor written so far

    def write(self, values: np.ndarray) -> None:
        """Append the next elements (flattened, any chunk size) of the current tensor."""
        values = np.asarray(values).reshape(-1)
        while values.size:
            if self._current >= len(self._layout):
                raise ValueError(f"{self.path}: more data than the declared tensors hold")
            name, dtype, n = self._layout[self._current]
            take = min(n - self._written, values.size)
            self._file.write(encode(values[:take], dtype))
            values = values[take:]
            self._written += take
            if self._written == n:
                self._current, self._written = self._current + 1, 0
        # skip zero-element tensors
        while self._current < len(self._layout) and self._layout[self._current][2] == 0:
            self._current += 1

    def close(self) -> None:
        """Flush and close; raises if some declared tensor was not fully written."""
        if self._file.closed:
            return
        self._file.close()
        if self._current < len(self._layout):
            name = self._layout[self._current][0]
            raise ValueError(f"{self.path}: tensor {name} and later ones were not written")

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()


def write_tensors(path: str | Path, tensors: Mapping[str, np.ndarray], dtype: str | Mapping[str, str] = "F32",
                  metadata: Mapping[str, str] | None = None) -> None:
    """Write a dict of whole arrays to one safetensors file; `dtype` is one for all, or per name."""
    layout = [(name, dtype if isinstance(dtype, str) else dtype[name], tuple(np.shape(a)))
              for name, a in tensors.items()]
    with SafetensorsWriter(path, layout, metadata) as w:
        for a in tensors.values():
            w.write(np.asarray(a))


def read_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """(header JSON as a dict, byte offset where the data starts) of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def tensor_files(path: str | Path) -> dict[str, Path]:
    """Tensor name -> the file holding it, for a directory (index json or single file) or a file."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif (path / INDEX_NAME).exists():
        weight_map = json.loads((path / INDEX_NAME).read_text())["weight_map"]
        return {name: path / shard for name, shard in weight_map.items()}
    else:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no safetensors file in {path}")
    out: dict[str, Path] = {}
    for f in files:
        header, _ = read_header(f)
        out.update({name: f for name in header if name != "__metadata__"})
    return out


def read_tensor(path: str | Path, name: str, raw: bool = False) -> np.ndarray:
    """One tensor of a safetensors file, decoded (see `decode`), or its raw bytes as uint8 if `raw`."""
    header, start = read_header(path)
    info = header[name]
    begin, end = info["data_offsets"]
    with open(path, "rb") as f:
        f.seek(start + begin)
        data = f.read(end - begin)
    if raw:
        return np.frombuffer(data, dtype=np.uint8)
    return decode(data, info["dtype"], info["shape"])


def load_checkpoint(path: str | Path, raw: bool = False) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint (directory or file) in memory: for small test models only."""
    by_file: dict[Path, list[str]] = {}
    for name, f in tensor_files(path).items():
        by_file.setdefault(f, []).append(name)
    out: dict[str, np.ndarray] = {}
    for f, names in by_file.items():
        header, start = read_header(f)
        data = np.fromfile(f, dtype=np.uint8)
        for name in names:
            info = header[name]
            begin, end = info["data_offsets"]
            chunk = data[start + begin:start + end]
            out[name] = chunk.copy() if raw else decode(chunk, info["dtype"], info["shape"])
    return out


def checkpoint_dtypes(path: str | Path) -> dict[str, str]:
    """Tensor name -> safetensors dtype string for a checkpoint (directory or file)."""
    out: dict[str, str] = {}
    for f in set(tensor_files(path).values()):
        header, _ = read_header(f)
        out.update({k: v["dtype"] for k, v in header.items() if k != "__metadata__"})
    return out
