"""Synthetic checkpoints for `umerge example`, the tests and the benchmarks, without torch.

`umerge.synthetic` writes Llama-shaped safetensors checkpoints in the Hugging Face layout (shards,
`model.safetensors.index.json`, `config.json`) from a seed: a base model and any number of
"fine-tuned" variants, each the base plus a small random delta. Everything is deterministic (the
values of a tensor depend only on the seed, the variant and the tensor's name) and streamed tensor
by tensor and chunk by chunk, so a 1.1B-parameter bf16 model is written in a few hundred MiB of RAM.

The reader and writer underneath are `umerge.safetensors_io`; the names most callers need
(`load_checkpoint`, `read_header`, ...) are re-exported here.
"""

from __future__ import annotations

from umerge.safetensors_io import (
    DTYPES,
    SafetensorsWriter,
    load_checkpoint,
    read_header,
    tensor_files,
)
from umerge.synthetic.generate import CheckpointSpec, make_family, write_checkpoint, write_model
from umerge.synthetic.shapes import TINY, TINY_ODD, TINYLLAMA, LlamaShape, llama_config, llama_tensors

__all__ = [
    "CheckpointSpec",
    "DTYPES",
    "LlamaShape",
    "SafetensorsWriter",
    "TINY",
    "TINY_ODD",
    "TINYLLAMA",
    "llama_config",
    "llama_tensors",
    "load_checkpoint",
    "make_family",
    "read_header",
    "tensor_files",
    "write_checkpoint",
    "write_model",
]
