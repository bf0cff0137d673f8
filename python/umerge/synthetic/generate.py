"""Seeded synthetic checkpoints: a base model and fine-tuned variants (base + small random deltas).

Values (all drawn as float32, then stored in the checkpoint's dtype):

- base, 2-D weights: `base_std * N(0, 1)`; base, 1-D norm weights: `1 + base_std * N(0, 1)`;
- variant v >= 1 ("fine-tuned"): `base + delta_std * N(0, 1)`, an independent delta per variant.

Each tensor is generated in fixed chunks of `CHUNK` elements, every chunk from its own generator
keyed by (seed, role, tensor name, chunk index). So a tensor's values depend only on the seed, the
variant and its name, never on the order of generation, the shape of other tensors or the dtype; and
memory stays at a few chunks whatever the model size. With `grid`, values are rounded to multiples
of `grid`: then `finetuned - base` is exact in float32 and magnitude ties are frequent, which
exercises tie-breaking.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from umerge.safetensors_io import ALL_DTYPES, INDEX_NAME, SINGLE_NAME, SafetensorsWriter, canonical_dtype
from umerge.synthetic.shapes import LlamaShape, llama_config, llama_tensors

#: Elements generated at once (16 MiB of float32): bounds the generator's memory use.
CHUNK = 1 << 22


@dataclass(frozen=True)
class CheckpointSpec:
    """Everything that determines a synthetic model family (base and variants) byte for byte."""

    shape: LlamaShape
    dtype: str = "F32"
    shards: int = 1
    seed: int = 0
    base_std: float = 0.02
    delta_std: float = 0.002
    grid: float | None = None


def _rng(seed: int, role: int, name: str, chunk: int) -> np.random.Generator:
    return np.random.default_rng([seed, role, zlib.crc32(name.encode()), chunk])


def tensor_chunks(spec: CheckpointSpec, name: str, shape: tuple[int, ...], variant: int) -> Iterator[np.ndarray]:
    """The float32 values of one tensor of `variant` (0 = base), flattened, chunk by chunk."""
    n = int(np.prod(shape, dtype=np.int64))
    is_norm = len(shape) == 1
    for c, start in enumerate(range(0, n, CHUNK)):
        size = min(CHUNK, n - start)
        values = _rng(spec.seed, 0, name, c).standard_normal(size, dtype=np.float32)
        values *= np.float32(spec.base_std)
        if is_norm:
            values += np.float32(1.0)
        if spec.grid is not None:
            values = _to_grid(values, spec.grid)
        if variant:
            delta = _rng(spec.seed, variant, name, c).standard_normal(size, dtype=np.float32)
            delta *= np.float32(spec.delta_std)
            if spec.grid is not None:
                delta = _to_grid(delta, spec.grid)
            values += delta
        yield values


def _to_grid(values: np.ndarray, grid: float) -> np.ndarray:
    return (np.round(values.astype(np.float64) / grid) * grid).astype(np.float32)


def plan_shards(tensors: list[tuple[str, tuple[int, ...]]], itemsize: int | list[int], shards: int) -> list[list[int]]:
    """Split tensors (kept in order) into `shards` runs of about equal bytes; each run is non-empty.

    `itemsize` is the bytes per element of every tensor, or a list with one per tensor.
    """
    if shards < 1 or shards > len(tensors):
        raise ValueError(f"cannot split {len(tensors)} tensors into {shards} shards")
    items = itemsize if isinstance(itemsize, list) else [itemsize] * len(tensors)
    sizes = [int(np.prod(s, dtype=np.int64)) * b for (_, s), b in zip(tensors, items)]
    total = max(1, sum(sizes))
    runs: list[list[int]] = [[] for _ in range(shards)]
    start, prev = 0, 0
    for j, size in enumerate(sizes):
        k = min(shards - 1, (2 * start + size) * shards // (2 * total))  # where the tensor's middle falls
        k = max(k, prev, shards - (len(tensors) - j))  # in order, and enough tensors left for later shards
        k = min(k, prev + 1) if j else 0  # no empty shard in between
        runs[k].append(j)
        start, prev = start + size, k
    return runs


def shard_names(shards: int) -> list[str]:
    """Hugging Face shard file names: model.safetensors, or model-0000i-of-0000N.safetensors."""
    if shards == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]


def write_sharded(out_dir: str | Path, layout: list[tuple[str, tuple[int, ...]]], dtype: str | Mapping[str, str],
                  shards: int,
                  chunks: Mapping[str, Iterable[np.ndarray]] | None = None,
                  values: Mapping[str, np.ndarray] | None = None,
                  config: Mapping[str, object] | None = None, index: bool | None = None) -> Path:
    """Write tensors in Hugging Face layout: shards, index json (when sharded), config.json.

    Tensor data comes from `chunks` (name -> iterable of flat chunks, generated lazily) or `values`
    (name -> whole array). `dtype` is one for all tensors or one per name. `index=True` writes an
    index even for a single shard.
    """
    dtypes = {name: canonical_dtype(dtype if isinstance(dtype, str) else dtype[name]) for name, _ in layout}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = plan_shards(layout, [ALL_DTYPES[dtypes[name]] for name, _ in layout], shards)
    files = shard_names(len(runs))
    if index and len(runs) == 1:
        files = ["model-00001-of-00001.safetensors"]
    weight_map: dict[str, str] = {}
    total = 0
    for run, fname in zip(runs, files):
        tensors = [(layout[j][0], dtypes[layout[j][0]], layout[j][1]) for j in run]
        with SafetensorsWriter(out / fname, tensors) as w:
            total += w.data_size
            for name, _, _ in tensors:
                weight_map[name] = fname
                if chunks is not None:
                    for chunk in chunks[name]:
                        w.write(chunk)
                else:
                    assert values is not None
                    w.write(np.asarray(values[name]))
    if len(files) > 1 or index:
        index_doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_NAME).write_text(json.dumps(index_doc, indent=2) + "\n")
    if config is not None:
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def write_checkpoint(out_dir: str | Path, spec: CheckpointSpec, variant: int = 0) -> Path:
    """Write variant `variant` (0 = the base) of the family `spec` to `out_dir`; returns the dir."""
    layout = llama_tensors(spec.shape)
    lazy = _LazyChunks(spec, dict(layout), variant)
    config = llama_config(spec.shape, canonical_dtype(spec.dtype).lower() if spec.dtype != "BF16" else "bf16")
    out = write_sharded(out_dir, layout, spec.dtype, spec.shards, chunks=lazy, config=config)
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
    return out


def write_model(out_dir: str | Path, tensors: Mapping[str, np.ndarray], dtype: str | Mapping[str, str] = "F32",
                shards: int = 1, config: Mapping[str, object] | None = None, index: bool | None = None) -> Path:
    """Hand-built tensors (whole arrays, in dict order) in Hugging Face layout, for edge-case tests.

    Without `config`, a minimal `{"architectures": ["LlamaForCausalLM"], ...}` config.json is written
    so the directory looks like a model to every tool.
    """
    layout = [(name, tuple(np.shape(a))) for name, a in tensors.items()]
    if config is None:
        config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32"}
    return write_sharded(out_dir, layout, dtype, shards, values=tensors, config=config, index=index)


class _LazyChunks(Mapping[str, Iterable[np.ndarray]]):
    """name -> generator of chunks, created only when the writer asks for the tensor."""

    def __init__(self, spec: CheckpointSpec, shapes: dict[str, tuple[int, ...]], variant: int) -> None:
        self._spec, self._shapes, self._variant = spec, shapes, variant

    def __getitem__(self, name: str) -> Iterable[np.ndarray]:
        return tensor_chunks(self._spec, name, self._shapes[name], self._variant)

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)


def make_family(root: str | Path, spec: CheckpointSpec, n_finetuned: int = 2) -> tuple[Path, list[Path]]:
    """Write `root/base` and `root/ft1` ... `root/ftN`; returns (base dir, fine-tuned dirs)."""
    root = Path(root)
    base = write_checkpoint(root / "base", spec, 0)
    fts = [write_checkpoint(root / f"ft{v}", spec, v) for v in range(1, n_finetuned + 1)]
    return base, fts
