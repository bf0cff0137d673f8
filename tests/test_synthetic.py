"""The synthetic checkpoint generator (`umerge.synthetic`): layout, values, determinism, dtypes.

These run without the native engine, so they also check the ground the merge tests stand on.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from umerge.safetensors_io import bf16_bits_to_f32, f32_to_bf16_bits, read_header
from umerge.synthetic import TINY, TINY_ODD, TINYLLAMA, CheckpointSpec, llama_tensors, load_checkpoint, write_checkpoint
from umerge.synthetic.generate import plan_shards, tensor_chunks


def test_tinyllama_has_the_published_parameter_count() -> None:
    assert TINYLLAMA.n_params() == 1_100_048_384
    names = dict(llama_tensors(TINYLLAMA))
    assert names["model.layers.21.self_attn.k_proj.weight"] == (256, 2048)
    assert names["model.layers.0.mlp.down_proj.weight"] == (2048, 5632)
    assert names["model.norm.weight"] == (2048,)
    assert TINYLLAMA.with_layers(44).n_params() == 1_100_048_384 + 22 * 44_044_288


def test_sharded_layout_and_index(tmp_path: Path) -> None:
    spec = CheckpointSpec(TINY_ODD, dtype="F32", shards=3, seed=1)
    out = write_checkpoint(tmp_path / "m", spec, variant=1)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["config.json", "generation_config.json", "model-00001-of-00003.safetensors",
                     "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors",
                     "model.safetensors.index.json"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {n for n, _ in llama_tensors(TINY_ODD)}
    data_bytes = 0
    for shard in ("model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                  "model-00003-of-00003.safetensors"):
        header, start = read_header(out / shard)
        assert start % 8 == 0 and header["__metadata__"] == {"format": "pt"}
        ends = sorted(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
        assert ends[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ends, ends[1:]))  # contiguous
        assert (out / shard).stat().st_size == start + ends[-1][1]
        data_bytes += ends[-1][1]
    assert index["metadata"]["total_size"] == data_bytes == 4 * TINY_ODD.n_params()
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_size"] == 42 and config["num_key_value_heads"] == 1


def test_readable_by_the_safetensors_package(tmp_path: Path) -> None:
    st = pytest.importorskip("safetensors.numpy")
    out = write_checkpoint(tmp_path / "m", CheckpointSpec(TINY, dtype="F32", shards=1), variant=0)
    theirs = st.load_file(out / "model.safetensors")
    ours = load_checkpoint(out)
    assert theirs.keys() == ours.keys()
    for name in ours:
        np.testing.assert_array_equal(theirs[name], ours[name])


def test_values_are_seeded_and_independent_of_sharding_and_dtype(tmp_path: Path) -> None:
    a = load_checkpoint(write_checkpoint(tmp_path / "a", CheckpointSpec(TINY, "F32", shards=1, seed=5), 2))
    b = load_checkpoint(write_checkpoint(tmp_path / "b", CheckpointSpec(TINY, "F32", shards=3, seed=5), 2))
    c = load_checkpoint(write_checkpoint(tmp_path / "c", CheckpointSpec(TINY, "BF16", shards=2, seed=5), 2))
    d = load_checkpoint(write_checkpoint(tmp_path / "d", CheckpointSpec(TINY, "F32", shards=1, seed=6), 2))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
        np.testing.assert_array_equal(c[name], bf16_bits_to_f32(f32_to_bf16_bits(a[name])))
        assert not np.array_equal(a[name], d[name])


def test_finetuned_is_base_plus_small_delta(tmp_path: Path) -> None:
    spec = CheckpointSpec(TINY, "F32", seed=2, base_std=0.02, delta_std=0.002)
    base = load_checkpoint(write_checkpoint(tmp_path / "base", spec, 0))
    ft1 = load_checkpoint(write_checkpoint(tmp_path / "ft1", spec, 1))
    ft2 = load_checkpoint(write_checkpoint(tmp_path / "ft2", spec, 2))
    norm = base["model.norm.weight"]
    assert abs(norm.mean() - 1.0) < 0.01  # 1-D norm weights start near one
    w = base["model.layers.0.mlp.up_proj.weight"]
    assert abs(w.std() - 0.02) < 0.002 and abs(w.mean()) < 0.002
    d1 = (ft1["model.layers.0.mlp.up_proj.weight"] - w).ravel()
    d2 = (ft2["model.layers.0.mlp.up_proj.weight"] - w).ravel()
    assert abs(d1.std() - 0.002) < 0.0002 and abs(d2.std() - 0.002) < 0.0002
    assert abs(np.corrcoef(d1, d2)[0, 1]) < 0.05  # independent deltas per variant


def test_grid_makes_deltas_exact_in_float32(tmp_path: Path) -> None:
    spec = CheckpointSpec(TINY, "F32", seed=3, grid=2.0 ** -14)
    base = load_checkpoint(write_checkpoint(tmp_path / "base", spec, 0))
    ft = load_checkpoint(write_checkpoint(tmp_path / "ft", spec, 1))
    for name in base:
        delta = ft[name] - base[name]  # float32 subtraction
        scaled = delta.astype(np.float64) * 2.0 ** 14
        np.testing.assert_array_equal(scaled, np.round(scaled))  # on the grid, so nothing was rounded
    mags = np.abs(ft["model.embed_tokens.weight"] - base["model.embed_tokens.weight"])
    assert np.unique(mags).size < mags.size // 10  # many magnitude ties


def test_bf16_rounds_to_nearest_even() -> None:
    values = np.array([1.0, 1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, 1 + 2.0 ** -8 + 2.0 ** -20, -2.0, np.inf, 3.4e38],
                      dtype=np.float32)
    # 1 + 2^-8 is halfway between 0x3F80 and 0x3F81: to even (0x3F80); 1 + 3*2^-8: to even (0x3F82);
    # just above halfway rounds up; 3.4e38 rounds past the largest bf16 to +inf (0x7F80)
    assert f32_to_bf16_bits(values).tolist() == [0x3F80, 0x3F80, 0x3F82, 0x3F81, 0xC000, 0x7F80, 0x7F80]
    nan_bits = f32_to_bf16_bits(np.array([np.nan], dtype=np.float32))
    assert np.isnan(bf16_bits_to_f32(nan_bits)).all()


def test_plan_shards_keeps_order_and_fills_every_shard() -> None:
    tensors = [("a", (1,)), ("b", (1000,)), ("c", (1,))]
    assert plan_shards(tensors, 4, 3) == [[0], [1], [2]]
    runs = plan_shards(llama_tensors(TINYLLAMA), 2, 3)
    assert [j for run in runs for j in run] == list(range(len(llama_tensors(TINYLLAMA))))
    sizes = [sum(int(np.prod(llama_tensors(TINYLLAMA)[j][1])) for j in run) for run in runs]
    assert max(sizes) < 1.1 * min(sizes)


def test_generation_streams_in_bounded_chunks() -> None:
    spec = CheckpointSpec(TINYLLAMA, "BF16")
    chunks = tensor_chunks(spec, "model.embed_tokens.weight", (32000, 2048), 1)
    first = next(chunks)
    assert first.dtype == np.float32 and first.size == 1 << 22  # 16 MiB at a time, not 262 MB
