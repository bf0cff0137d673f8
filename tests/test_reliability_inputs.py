"""The bad-input catalogue: every kind of broken or hostile input umerge is meant to refuse.

Each case corrupts a fresh copy of a valid synthetic family (or passes bad options) and runs the
real `umerge ties` command. Every case must give exactly one line `umerge: error: ...` on stderr
naming what is wrong (`mention`), exit status 2, no output directory, nothing left beside it
(no temporary directory), and every input byte for byte unchanged. The same catalogue feeds
`benches/reliability.py`, which prints each kind with the error it gives (README, Reliability).

Pickle checkpoints (`pytorch_model.bin`, `.pt`) are part of it: the engine never unpickles (that
can run arbitrary code) and says how to convert them to safetensors.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conftest import Family, run_umerge, tree_digest
from umerge.safetensors_io import load_checkpoint, read_header, write_tensors
from umerge.synthetic import TINY_ODD, CheckpointSpec, make_family, write_model

SHARD1 = "model-00001-of-00003.safetensors"
SHARD2 = "model-00002-of-00003.safetensors"
SHARD3 = "model-00003-of-00003.safetensors"
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Setup:
    """What a case runs: the `umerge` arguments (without -o), the output path, the inputs to watch."""

    args: list[object]
    out: Path
    inputs: list[Path]


@dataclass(frozen=True)
class Case:
    """One kind of bad input: how to make it, and a word the error line must contain."""

    name: str
    make: Callable[[Path, Family], Setup]
    mention: str


def ties_setup(tmp: Path, fam: Family, *extra: object, out: Path | None = None, inputs: list[Path] | None = None) -> Setup:
    args: list[object] = ["ties", *fam.finetuned, "--base", fam.base, "--density", "0.8", *extra]
    return Setup(args, out if out is not None else tmp / "out", inputs if inputs is not None else fam.all)


def rewrite_header(path: Path, edit: Callable[[dict], None], keep_data: bool = True) -> None:  # type: ignore[type-arg]
    """Rewrite a shard's JSON header with `edit` (length prefix recomputed, padded to 8)."""
    header, start = read_header(path)
    data = path.read_bytes()[start:] if keep_data else b""
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def tensors_of(header: dict) -> list[str]:  # type: ignore[type-arg]
    """Tensor names of a header in storage order."""
    return [k for k, _ in sorted(((k, v["data_offsets"][0]) for k, v in header.items() if k != "__metadata__"),
                                  key=lambda kv: kv[1])]


def edit_index(model: Path, edit: Callable[[dict], None]) -> None:  # type: ignore[type-arg]
    p = model / INDEX
    index = json.loads(p.read_text())
    edit(index)
    p.write_text(json.dumps(index))


# --- the cases --------------------------------------------------------------------------------


def truncated_shard(tmp: Path, fam: Family) -> Setup:
    p = fam.finetuned[0] / SHARD2
    p.write_bytes(p.read_bytes()[:-100])
    return ties_setup(tmp, fam)


def shorter_than_8_bytes(tmp: Path, fam: Family) -> Setup:
    (fam.finetuned[0] / SHARD3).write_bytes(b"\x10\x00")
    return ties_setup(tmp, fam)


def empty_shard(tmp: Path, fam: Family) -> Setup:
    (fam.finetuned[1] / SHARD3).write_bytes(b"")
    return ties_setup(tmp, fam)


def header_length_past_end(tmp: Path, fam: Family) -> Setup:
    p = fam.finetuned[1] / SHARD1
    data = bytearray(p.read_bytes())
    data[:8] = struct.pack("<Q", len(data) + 1000)
    p.write_bytes(bytes(data))
    return ties_setup(tmp, fam)


def header_length_huge(tmp: Path, fam: Family) -> Setup:
    p = fam.finetuned[1] / SHARD1
    data = bytearray(p.read_bytes())
    data[:8] = struct.pack("<Q", 2**63 + 5)
    p.write_bytes(bytes(data))
    return ties_setup(tmp, fam)


def header_not_json(tmp: Path, fam: Family) -> Setup:
    p = fam.finetuned[1] / SHARD1
    data = bytearray(p.read_bytes())
    data[8:12] = b"\xff\xfe{["
    p.write_bytes(bytes(data))
    return ties_setup(tmp, fam)


def header_not_an_object(tmp: Path, fam: Family) -> Setup:
    text = b"[1, 2, 3]     "
    text += b" " * (-(8 + len(text)) % 8)
    (fam.finetuned[0] / SHARD1).write_bytes(struct.pack("<Q", len(text)) + text)
    return ties_setup(tmp, fam)


def unknown_dtype(tmp: Path, fam: Family) -> Setup:
    def edit(h: dict) -> None:  # type: ignore[type-arg]
        h[tensors_of(h)[0]]["dtype"] = "F7"
    rewrite_header(fam.finetuned[0] / SHARD1, edit)
    return ties_setup(tmp, fam)


def sub_byte_dtype(tmp: Path, fam: Family) -> Setup:
    # F4 (MXFP4) is a valid safetensors dtype, but half a byte per element: umerge cannot carry it.
    def edit(h: dict) -> None:  # type: ignore[type-arg]
        name = tensors_of(h)[-1]
        h[name]["dtype"] = "F4"
        n = int(np.prod(h[name]["shape"]))
        start = h[name]["data_offsets"][0]
        h[name]["shape"] = [n * 8]   # 4 bytes per f32 element = 8 F4 elements
        h[name]["data_offsets"] = [start, start + n * 4]
    rewrite_header(fam.finetuned[0] / SHARD3, edit)
    return ties_setup(tmp, fam)


def overlapping_offsets(tmp: Path, fam: Family) -> Setup:
    def edit(h: dict) -> None:  # type: ignore[type-arg]
        norms = [k for k in tensors_of(h) if len(h[k]["shape"]) == 1]
        h[norms[1]]["data_offsets"] = list(h[norms[0]]["data_offsets"])
    rewrite_header(fam.finetuned[0] / SHARD2, edit)
    return ties_setup(tmp, fam)


def gap_between_tensors(tmp: Path, fam: Family) -> Setup:
    def edit(h: dict) -> None:  # type: ignore[type-arg]
        names = tensors_of(h)
        first = h[names[0]]
        first["data_offsets"] = [first["data_offsets"][0], first["data_offsets"][1] - 4]
        first["shape"] = [int(np.prod(first["shape"])) - 1]
    rewrite_header(fam.finetuned[0] / SHARD2, edit)
    return ties_setup(tmp, fam)


def offsets_backwards(tmp: Path, fam: Family) -> Setup:
    def edit(h: dict) -> None:  # type: ignore[type-arg]
        name = tensors_of(h)[0]
        a, b = h[name]["data_offsets"]
        h[name]["data_offsets"] = [b, a]
    rewrite_header(fam.finetuned[1] / SHARD2, edit)
    return ties_setup(tmp, fam)


def size_disagrees_with_shape(tmp: Path, fam: Family) -> Setup:
    def edit(h: dict) -> None:  # type: ignore[type-arg]
        name = next(k for k in tensors_of(h) if len(h[k]["shape"]) == 2)
        h[name]["shape"] = [h[name]["shape"][0] + 1, h[name]["shape"][1]]
    rewrite_header(fam.finetuned[0] / SHARD1, edit)
    return ties_setup(tmp, fam)


def trailing_bytes(tmp: Path, fam: Family) -> Setup:
    p = fam.finetuned[1] / SHARD3
    p.write_bytes(p.read_bytes() + b"\0" * 64)
    return ties_setup(tmp, fam)


def duplicate_tensor_across_shards(tmp: Path, fam: Family) -> Setup:
    # shard 3 also stores a tensor of shard 1 (same name, same bytes): which one is meant?
    h1, _ = read_header(fam.finetuned[0] / SHARD1)
    name = tensors_of(h1)[0]
    everything = load_checkpoint(fam.finetuned[0])
    value = everything[name]
    p3 = fam.finetuned[0] / SHARD3
    tensors = {k: v for k, v in everything.items()
               if k in set(tensors_of(read_header(p3)[0]))}
    tensors[name] = value
    write_tensors(p3, tensors)
    return ties_setup(tmp, fam)


def index_not_json(tmp: Path, fam: Family) -> Setup:
    (fam.finetuned[0] / INDEX).write_text('{"weight_map": {')
    return ties_setup(tmp, fam)


def index_without_weight_map(tmp: Path, fam: Family) -> Setup:
    (fam.finetuned[0] / INDEX).write_text('{"metadata": {"total_size": 1}}')
    return ties_setup(tmp, fam)


def index_value_not_a_string(tmp: Path, fam: Family) -> Setup:
    edit_index(fam.finetuned[0], lambda ix: ix["weight_map"].__setitem__("model.norm.weight", 3))
    return ties_setup(tmp, fam)


def index_missing_shard(tmp: Path, fam: Family) -> Setup:
    edit_index(fam.finetuned[1], lambda ix: ix["weight_map"].__setitem__("model.norm.weight", "model-00009-of-00003.safetensors"))
    return ties_setup(tmp, fam)


def _outside_file(tmp: Path) -> Path:
    outside = tmp / "elsewhere"
    outside.mkdir(exist_ok=True)
    write_tensors(outside / "stolen.safetensors", {"model.norm.weight": np.ones(TINY_ODD.hidden, dtype=np.float32)})
    return outside / "stolen.safetensors"


def index_relative_escape(tmp: Path, fam: Family) -> Setup:
    _outside_file(tmp)
    edit_index(fam.finetuned[0], lambda ix: ix["weight_map"].__setitem__("model.norm.weight", "../../elsewhere/stolen.safetensors"))
    return ties_setup(tmp, fam, inputs=[*fam.all, tmp / "elsewhere"])


def index_absolute_path(tmp: Path, fam: Family) -> Setup:
    stolen = _outside_file(tmp)
    edit_index(fam.finetuned[0], lambda ix: ix["weight_map"].__setitem__("model.norm.weight", str(stolen)))
    return ties_setup(tmp, fam, inputs=[*fam.all, tmp / "elsewhere"])


def index_symlink_escape(tmp: Path, fam: Family) -> Setup:
    stolen = _outside_file(tmp)
    os.symlink(stolen, fam.finetuned[0] / "model-link.safetensors")
    edit_index(fam.finetuned[0], lambda ix: ix["weight_map"].__setitem__("model.norm.weight", "model-link.safetensors"))
    return ties_setup(tmp, fam, inputs=[*fam.all, tmp / "elsewhere"])


def index_names_a_fifo(tmp: Path, fam: Family) -> Setup:
    # opening a FIFO blocks until someone writes to it: the reader must refuse it, not hang
    os.mkfifo(fam.finetuned[0] / "model-pipe.safetensors")
    edit_index(fam.finetuned[0], lambda ix: ix["weight_map"].__setitem__("model.norm.weight", "model-pipe.safetensors"))
    return ties_setup(tmp, fam)


def index_tensor_nobody_holds(tmp: Path, fam: Family) -> Setup:
    edit_index(fam.finetuned[0], lambda ix: ix["weight_map"].__setitem__("model.layers.99.ghost.weight", SHARD1))
    return ties_setup(tmp, fam)


def index_wrong_shard(tmp: Path, fam: Family) -> Setup:
    h3, _ = read_header(fam.finetuned[0] / SHARD3)
    name = tensors_of(h3)[0]
    edit_index(fam.finetuned[0], lambda ix: ix["weight_map"].__setitem__(name, SHARD1))
    return ties_setup(tmp, fam)


def directory_without_weights(tmp: Path, fam: Family) -> Setup:
    empty = tmp / "models" / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("no weights here")
    return Setup(["ties", empty, fam.finetuned[0], "--base", fam.base, "--density", "0.5"], tmp / "out", [*fam.all, empty])


def pickle_directory(tmp: Path, fam: Family) -> Setup:
    legacy = tmp / "models" / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text("{}")
    # the bytes of a pickle that would run code if unpickled: never opened as one
    (legacy / "pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR.")
    return Setup(["ties", legacy, fam.finetuned[0], "--base", fam.base, "--density", "0.5"], tmp / "out", [*fam.all, legacy])


def pickle_file(tmp: Path, fam: Family) -> Setup:
    pt = tmp / "models" / "adapter.pt"
    pt.write_bytes(b"PK\x03\x04" + b"\0" * 60)   # torch.save's zip container
    return Setup(["ties", pt, fam.finetuned[0], "--base", fam.base, "--density", "0.5"], tmp / "out", [*fam.all, pt])


def _small_models(tmp: Path, edit: Callable[[dict, dict, dict], None]) -> Setup:  # type: ignore[type-arg]
    rng = np.random.default_rng(0)
    base = {"model.embed_tokens.weight": rng.standard_normal((6, 4)).astype(np.float32),
            "model.layers.0.mlp.up_proj.weight": rng.standard_normal((5, 4)).astype(np.float32),
            "model.norm.weight": np.ones(4, dtype=np.float32)}
    ft1 = {k: v + np.float32(0.1) for k, v in base.items()}
    ft2 = {k: v - np.float32(0.1) for k, v in base.items()}
    dtypes: dict[str, dict[str, str]] = {"base": {}, "ft1": {}, "ft2": {}}
    edit(base, ft1, ft2)
    paths = []
    for name, tensors in (("base", base), ("ft1", ft1), ("ft2", ft2)):
        dt = {k: ("I64" if v.dtype == np.int64 else "F32") for k, v in tensors.items()}
        dtypes[name] = dt
        paths.append(write_model(tmp / "small" / name, tensors, dtype=dt))
    b, f1, f2 = paths
    return Setup(["ties", f1, f2, "--base", b, "--density", "0.5"], tmp / "out", [b, f1, f2])


def shape_mismatch(tmp: Path, fam: Family) -> Setup:
    def edit(base: dict, ft1: dict, ft2: dict) -> None:  # type: ignore[type-arg]
        ft2["model.layers.0.mlp.up_proj.weight"] = ft2["model.layers.0.mlp.up_proj.weight"].T.copy()
    return _small_models(tmp, edit)


def embedding_smaller_than_base(tmp: Path, fam: Family) -> Setup:
    def edit(base: dict, ft1: dict, ft2: dict) -> None:  # type: ignore[type-arg]
        ft1["model.embed_tokens.weight"] = ft1["model.embed_tokens.weight"][:4].copy()
    return _small_models(tmp, edit)


def float_vs_integer(tmp: Path, fam: Family) -> Setup:
    def edit(base: dict, ft1: dict, ft2: dict) -> None:  # type: ignore[type-arg]
        ft1["model.norm.weight"] = np.arange(4, dtype=np.int64)
    return _small_models(tmp, edit)


def integer_tensor_differs(tmp: Path, fam: Family) -> Setup:
    def edit(base: dict, ft1: dict, ft2: dict) -> None:  # type: ignore[type-arg]
        for i, m in enumerate((base, ft1, ft2)):
            m["model.position_ids"] = np.arange(4, dtype=np.int64) + (i == 2)
    return _small_models(tmp, edit)


def nan_in_input(tmp: Path, fam: Family) -> Setup:
    def edit(base: dict, ft1: dict, ft2: dict) -> None:  # type: ignore[type-arg]
        ft2["model.layers.0.mlp.up_proj.weight"][2, 1] = np.nan
    return _small_models(tmp, edit)


def inf_in_base(tmp: Path, fam: Family) -> Setup:
    def edit(base: dict, ft1: dict, ft2: dict) -> None:  # type: ignore[type-arg]
        base["model.norm.weight"][3] = -np.inf
    return _small_models(tmp, edit)


def missing_tensor_strict(tmp: Path, fam: Family) -> Setup:
    def edit(base: dict, ft1: dict, ft2: dict) -> None:  # type: ignore[type-arg]
        del ft2["model.norm.weight"]
    s = _small_models(tmp, edit)
    return Setup([*s.args, "--strict"], s.out, s.inputs)


def no_base(tmp: Path, fam: Family) -> Setup:
    return Setup(["ties", *fam.finetuned, "--density", "0.8"], tmp / "out", fam.all)


def density_zero(tmp: Path, fam: Family) -> Setup:
    return Setup(["ties", *fam.finetuned, "--base", fam.base, "--density", "0"], tmp / "out", fam.all)


def density_above_one(tmp: Path, fam: Family) -> Setup:
    return Setup(["ties", *fam.finetuned, "--base", fam.base, "--density", "1.5"], tmp / "out", fam.all)


def weight_count(tmp: Path, fam: Family) -> Setup:
    return ties_setup(tmp, fam, "--weight", "1.0")


def output_is_input(tmp: Path, fam: Family) -> Setup:
    return ties_setup(tmp, fam, "--overwrite", out=fam.finetuned[0])


def output_inside_input(tmp: Path, fam: Family) -> Setup:
    return ties_setup(tmp, fam, out=fam.base / "merged")


def output_holds_input_overwrite(tmp: Path, fam: Family) -> Setup:
    return ties_setup(tmp, fam, "--overwrite", out=tmp / "models")


def output_not_empty(tmp: Path, fam: Family) -> Setup:
    out = tmp / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    return ties_setup(tmp, fam, out=out, inputs=[*fam.all, out])


def output_is_a_file(tmp: Path, fam: Family) -> Setup:
    out = tmp / "out"
    out.write_text("a file")
    return ties_setup(tmp, fam, "--overwrite", out=out, inputs=[*fam.all, out])


def memory_budget_too_small(tmp: Path, fam: Family) -> Setup:
    return ties_setup(tmp, fam, "--memory-budget", "1MiB")


def max_shard_size_not_a_size(tmp: Path, fam: Family) -> Setup:
    return ties_setup(tmp, fam, "--max-shard-size", "lots")


def model_path_missing(tmp: Path, fam: Family) -> Setup:
    return Setup(["ties", fam.finetuned[0], tmp / "nope", "--base", fam.base, "--density", "0.5"], tmp / "out", fam.all)


CASES: list[Case] = [
    Case("truncated shard (data cut short)", truncated_shard, SHARD2),
    Case("shard shorter than the 8-byte length", shorter_than_8_bytes, SHARD3),
    Case("empty shard file", empty_shard, SHARD3),
    Case("header length past the end of the file", header_length_past_end, SHARD1),
    Case("header length of 2^63", header_length_huge, SHARD1),
    Case("header not UTF-8 JSON", header_not_json, SHARD1),
    Case("header JSON not an object", header_not_an_object, SHARD1),
    Case("unknown dtype in the header", unknown_dtype, SHARD1),
    Case("sub-byte dtype (F4)", sub_byte_dtype, "F4"),
    Case("overlapping tensor offsets", overlapping_offsets, SHARD2),
    Case("gap between tensors", gap_between_tensors, SHARD2),
    Case("data offsets running backwards", offsets_backwards, SHARD2),
    Case("tensor size disagrees with shape x dtype", size_disagrees_with_shape, SHARD1),
    Case("trailing bytes after the data", trailing_bytes, SHARD3),
    Case("same tensor stored in two shards", duplicate_tensor_across_shards, "twice"),
    Case("index is not JSON", index_not_json, INDEX),
    Case("index has no weight_map", index_without_weight_map, "weight_map"),
    Case("index entry is not a string", index_value_not_a_string, "model.norm.weight"),
    Case("index names a missing shard", index_missing_shard, "model-00009-of-00003.safetensors"),
    Case("index path escapes with ..", index_relative_escape, "outside the model directory"),
    Case("index names an absolute path", index_absolute_path, "outside the model directory"),
    Case("index names a symlink leading outside", index_symlink_escape, "outside the model directory"),
    Case("index names a FIFO (would block for ever)", index_names_a_fifo, "not a regular file"),
    Case("index lists a tensor no shard holds", index_tensor_nobody_holds, "model.layers.99.ghost.weight"),
    Case("index puts a tensor in the wrong shard", index_wrong_shard, "stored in"),
    Case("directory without weights", directory_without_weights, "no safetensors weights"),
    Case("pickle checkpoint directory (pytorch_model.bin)", pickle_directory, "pickle"),
    Case("pickle checkpoint file (.pt)", pickle_file, "pickle"),
    Case("shape mismatch on a non-embedding tensor", shape_mismatch, "model.layers.0.mlp.up_proj.weight"),
    Case("embedding smaller than the base's", embedding_smaller_than_base, "model.embed_tokens.weight"),
    Case("float in one model, integer in another", float_vs_integer, "model.norm.weight"),
    Case("integer tensor differs between models", integer_tensor_differs, "model.position_ids"),
    Case("NaN in a fine-tuned model", nan_in_input, "NaN"),
    Case("-Inf in the base", inf_in_base, "NaN or Inf"),
    Case("tensor missing with --strict", missing_tensor_strict, "model.norm.weight"),
    Case("full models without --base", no_base, "ties needs a base model"),
    Case("density 0", density_zero, "density: 0 is outside (0, 1]"),
    Case("density above 1", density_above_one, "density: 1.5 is outside (0, 1]"),
    Case("--weight count differs from the models", weight_count, "1 weights given for 2 models"),
    Case("output equal to an input (even with --overwrite)", output_is_input, "input"),
    Case("output inside an input", output_inside_input, "input"),
    Case("--overwrite of a directory holding the inputs", output_holds_input_overwrite, "input"),
    Case("output exists and is not empty", output_not_empty, "not empty"),
    Case("output is a file", output_is_a_file, "not a directory"),
    Case("memory budget below the minimum", memory_budget_too_small, "budget"),
    Case("max shard size not a size", max_shard_size_not_a_size, "lots"),
    Case("model path does not exist", model_path_missing, "nope"),
]


def fresh_family(tmp: Path) -> Family:
    spec = CheckpointSpec(TINY_ODD, "F32", shards=3, seed=41)
    base, fts = make_family(tmp / "models", spec, 2)
    return Family(spec, base, fts)


def listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def run_case(case: Case, tmp: Path) -> tuple[int, str, list[str]]:
    """Build the case, run it; returns (exit status, stderr, problems found against the promises)."""
    fam = fresh_family(tmp)
    setup = case.make(tmp, fam)
    before = tree_digest(*[p for p in setup.inputs if p.is_dir()])
    before_files = {str(p): p.read_bytes() for p in setup.inputs if p.is_file()}
    parent = setup.out.parent
    before_listing = listing(parent)
    existed = setup.out.exists()
    result = run_umerge([*setup.args, "-o", setup.out, "--quiet"])
    problems = []
    lines = result.stderr.strip().splitlines()
    if result.returncode != 2:
        problems.append(f"exit status {result.returncode}, not 2")
    if len(lines) != 1 or not lines[0].startswith("umerge: error: "):
        problems.append(f"not one `umerge: error:` line: {result.stderr!r}")
    elif case.mention not in lines[0]:
        problems.append(f"error does not mention {case.mention!r}: {lines[0]}")
    if "Traceback" in result.stderr:
        problems.append("traceback printed")
    if not existed and setup.out.exists():
        problems.append(f"output {setup.out} created")
    if listing(parent) != before_listing:
        problems.append(f"left behind in {parent}: {set(listing(parent)) ^ set(before_listing)}")
    if tree_digest(*[p for p in setup.inputs if p.is_dir()]) != before:
        problems.append("an input directory changed")
    for p, data in before_files.items():
        if Path(p).read_bytes() != data:
            problems.append(f"input file {p} changed")
    return result.returncode, (lines[0] if lines else ""), problems


def test_the_uncorrupted_family_merges(tmp_path: Path) -> None:
    # the control: without corruption the same family merges, so each failure below is the corruption's
    fam = fresh_family(tmp_path)
    result = run_umerge([*ties_setup(tmp_path, fam).args, "-o", tmp_path / "out", "--quiet"])
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "umerge.yml").is_file()


@pytest.mark.parametrize("case", CASES, ids=[c.make.__name__ for c in CASES])
def test_bad_input_is_refused_cleanly(case: Case, tmp_path: Path) -> None:
    code, line, problems = run_case(case, tmp_path)
    assert not problems, f"{case.name}: {problems}\n{line}"


def test_pickle_refusal_says_how_to_convert(tmp_path: Path) -> None:
    _, line, problems = run_case(next(c for c in CASES if c.make is pickle_directory), tmp_path)
    assert not problems, problems
    assert "safetensors" in line and "weights_only" in line, line


def test_python_side_torch_load_always_uses_weights_only() -> None:
    # Unpickling runs code: every torch.load in the package must pass weights_only=True
    # (tensors and plain containers only). Found by parsing the sources, not by grepping text.
    import ast

    package = Path(__file__).resolve().parents[1] / "python" / "umerge"
    offenders = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            is_load = (isinstance(f, ast.Attribute) and f.attr == "load"
                       and isinstance(f.value, ast.Name) and f.value.id == "torch")
            if not is_load:
                continue
            ok = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                     for k in node.keywords)
            if not ok:
                offenders.append(f"{path.relative_to(package.parent)}:{node.lineno}")
    assert offenders == [], f"torch.load without weights_only=True: {offenders}"
