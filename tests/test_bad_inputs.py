"""Bad inputs and bad options: each gives one line `umerge: error: ...` on stderr, exit status 2, no
output directory (nor any leftover temporary directory beside it), and leaves every input byte for
byte as it was.

Corrupt checkpoints are made by editing copies of a valid synthetic family: truncating a shard,
lying about the header length, overlapping tensor offsets, pointing the index at a missing shard
or outside the model directory, changing a tensor's shape.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from conftest import Family, run_umerge, tree_digest
from umerge.safetensors_io import read_header, write_tensors
from umerge.synthetic import TINY_ODD, CheckpointSpec, make_family, write_model

SHARD1 = "model-00001-of-00003.safetensors"
SHARD2 = "model-00002-of-00003.safetensors"
INDEX = "model.safetensors.index.json"


@pytest.fixture
def fam(tmp_path: Path) -> Family:
    spec = CheckpointSpec(TINY_ODD, "F32", shards=3, seed=41)
    base, fts = make_family(tmp_path / "models", spec, 2)
    return Family(spec, base, fts)


def expect_input_error(tmp_path: Path, args: list[object], inputs: list[Path], must_mention: str = "",
                       out: Path | None = None) -> str:
    """Run `umerge ARGS -o OUT --quiet`; check the one-line error, exit 2, no output, inputs unchanged."""
    out = out if out is not None else tmp_path / "out"
    before = tree_digest(*inputs)
    parent = out.parent
    listing = sorted(p.name for p in parent.iterdir()) if parent.exists() else []
    result = run_umerge([*args, "-o", out, "--quiet"])
    assert result.returncode == 2, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert lines[0].startswith("umerge: error: "), lines[0]
    assert "Traceback" not in result.stderr
    if must_mention:
        assert must_mention in lines[0], lines[0]
    if out.exists() and out.resolve() not in {p.resolve() for p in inputs}:
        pytest.fail(f"output {out} was created")
    after_listing = sorted(p.name for p in parent.iterdir()) if parent.exists() else []
    assert after_listing == listing, f"left behind in {parent}: {set(after_listing) - set(listing)}"
    assert tree_digest(*inputs) == before, "an input was modified"
    return lines[0]


def ties_args(fam: Family, *extra: object) -> list[object]:
    return ["ties", *fam.finetuned, "--base", fam.base, "--density", "0.8", *extra]


def test_a_valid_family_merges(fam: Family, tmp_path: Path) -> None:
    # the control: the same family without corruption merges fine (so the failures below are the corruption's)
    result = run_umerge([*ties_args(fam), "-o", tmp_path / "out", "--quiet"])
    assert result.returncode == 0, result.stderr


def test_truncated_shard(fam: Family, tmp_path: Path) -> None:
    shard = fam.finetuned[0] / SHARD2
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    expect_input_error(tmp_path, ties_args(fam), fam.all, must_mention=SHARD2)


def test_header_length_past_the_end_of_the_file(fam: Family, tmp_path: Path) -> None:
    shard = fam.finetuned[1] / SHARD1
    data = bytearray(shard.read_bytes())
    data[:8] = struct.pack("<Q", len(data) + 1000)
    shard.write_bytes(bytes(data))
    expect_input_error(tmp_path, ties_args(fam), fam.all, must_mention=SHARD1)


def test_header_that_is_not_json(fam: Family, tmp_path: Path) -> None:
    shard = fam.finetuned[1] / SHARD1
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\xff\xfe{["
    shard.write_bytes(bytes(data))
    expect_input_error(tmp_path, ties_args(fam), fam.all, must_mention=SHARD1)


def _rewrite_header(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    header, start = read_header(path)
    data = path.read_bytes()[start:]
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_overlapping_tensor_offsets(fam: Family, tmp_path: Path) -> None:
    shard = fam.finetuned[0] / SHARD2

    def overlap(header: dict) -> None:  # type: ignore[type-arg]
        # the two 1-D norm weights of one layer (same size): give the second the first one's bytes
        names = sorted((v["data_offsets"][0], k) for k, v in header.items()
                       if k != "__metadata__" and len(v["shape"]) == 1)
        first, second = names[0][1], names[1][1]
        header[second]["data_offsets"] = list(header[first]["data_offsets"])

    _rewrite_header(shard, overlap)
    expect_input_error(tmp_path, ties_args(fam), fam.all, must_mention=SHARD2)


def test_tensor_size_disagrees_with_its_shape(fam: Family, tmp_path: Path) -> None:
    def lie(header: dict) -> None:  # type: ignore[type-arg]
        name = next(k for k, v in header.items() if k != "__metadata__" and len(v["shape"]) == 2)
        header[name]["shape"] = [header[name]["shape"][0] + 1, header[name]["shape"][1]]

    _rewrite_header(fam.finetuned[0] / SHARD1, lie)
    expect_input_error(tmp_path, ties_args(fam), fam.all)


def test_index_names_a_missing_shard(fam: Family, tmp_path: Path) -> None:
    index_path = fam.finetuned[1] / INDEX
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = "model-00009-of-00003.safetensors"
    index_path.write_text(json.dumps(index))
    expect_input_error(tmp_path, ties_args(fam), fam.all, must_mention="model-00009-of-00003.safetensors")


@pytest.mark.parametrize("kind", ["relative", "absolute"])
def test_index_points_outside_the_model_directory(fam: Family, tmp_path: Path, kind: str) -> None:
    # a perfectly valid file holding the tensor, but outside the model directory: still refused
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    norm = np.ones(TINY_ODD.hidden, dtype=np.float32)
    write_tensors(outside / "stolen.safetensors", {"model.norm.weight": norm})
    index_path = fam.finetuned[0] / INDEX
    index = json.loads(index_path.read_text())
    target = "../../elsewhere/stolen.safetensors" if kind == "relative" else str(outside / "stolen.safetensors")
    index["weight_map"]["model.norm.weight"] = target
    index_path.write_text(json.dumps(index))
    expect_input_error(tmp_path, ties_args(fam), [*fam.all, outside])


def test_shape_mismatch_on_a_non_embedding_tensor(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    base = {"model.embed_tokens.weight": rng.standard_normal((6, 4)).astype(np.float32),
            "model.layers.0.mlp.up_proj.weight": rng.standard_normal((5, 4)).astype(np.float32)}
    ft1 = {k: v + np.float32(0.1) for k, v in base.items()}
    ft2 = dict(ft1)
    ft2["model.layers.0.mlp.up_proj.weight"] = ft1["model.layers.0.mlp.up_proj.weight"].T.copy()  # [4, 5]
    b = write_model(tmp_path / "m" / "base", base)
    f1 = write_model(tmp_path / "m" / "ft1", ft1)
    f2 = write_model(tmp_path / "m" / "ft2", ft2)
    line = expect_input_error(tmp_path, ["ties", f1, f2, "--base", b, "--density", "0.5"], [b, f1, f2],
                              must_mention="model.layers.0.mlp.up_proj.weight")
    assert "ft2" in line  # names the file that disagrees


@pytest.mark.parametrize("density", ["0", "-0.5", "1.5", "nan", "abc"])
def test_density_outside_zero_one(fam: Family, tmp_path: Path, density: str) -> None:
    args = ["ties", *fam.finetuned, "--base", fam.base, "--density", density]
    expect_input_error(tmp_path, args, fam.all)


def test_density_is_required(fam: Family, tmp_path: Path) -> None:
    expect_input_error(tmp_path, ["ties", *fam.finetuned, "--base", fam.base], fam.all)


@pytest.mark.parametrize("which", ["base", "ft1"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_output_equal_to_an_input(fam: Family, tmp_path: Path, which: str, overwrite: bool) -> None:
    target = fam.base if which == "base" else fam.finetuned[0]
    extra = ["--overwrite"] if overwrite else []
    expect_input_error(tmp_path, ties_args(fam, *extra), fam.all, out=target)
    assert target.is_dir() and any(target.iterdir())


def test_output_inside_an_input(fam: Family, tmp_path: Path) -> None:
    inside = fam.base / "merged"
    expect_input_error(tmp_path, ties_args(fam), fam.all, out=inside)
    assert not inside.exists()


def test_existing_output_is_refused_without_overwrite(fam: Family, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    expect_input_error(tmp_path, ties_args(fam), [*fam.all, out], out=out)
    assert (out / "keep.txt").read_text() == "mine"


def test_full_models_without_a_base(fam: Family, tmp_path: Path) -> None:
    line = expect_input_error(tmp_path, ["ties", *fam.finetuned, "--density", "0.8"], fam.all)
    assert "base" in line


def test_weight_count_must_match_the_models(fam: Family, tmp_path: Path) -> None:
    expect_input_error(tmp_path, ties_args(fam, "--weight", "1.0"), fam.all)


def test_missing_input_directory(fam: Family, tmp_path: Path) -> None:
    missing = tmp_path / "models" / "nope"
    expect_input_error(tmp_path, ["ties", fam.finetuned[0], missing, "--base", fam.base, "--density", "0.8"],
                       fam.all, must_mention="nope")


def test_directory_without_weights(fam: Family, tmp_path: Path) -> None:
    empty = tmp_path / "models" / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    expect_input_error(tmp_path, ["ties", fam.finetuned[0], empty, "--base", fam.base, "--density", "0.8"],
                       [*fam.all, empty], must_mention="empty")


def test_unknown_preset(fam: Family, tmp_path: Path) -> None:
    expect_input_error(tmp_path, ties_args(fam, "--preset", "magic"), fam.all)


def test_error_without_quiet_is_still_one_line(fam: Family, tmp_path: Path) -> None:
    shard = fam.finetuned[0] / SHARD2
    shard.write_bytes(shard.read_bytes()[:-4])
    result = run_umerge([*ties_args(fam), "-o", tmp_path / "out"])
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("umerge: error: ") and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(fam: Family, tmp_path: Path) -> None:
    shard = fam.finetuned[0] / SHARD2
    shard.write_bytes(shard.read_bytes()[:-4])
    result = run_umerge([*ties_args(fam), "-o", tmp_path / "out", "--quiet", "--debug"])
    assert result.returncode != 0 and "Traceback" in result.stderr
    assert not (tmp_path / "out").exists()
