"""The `umerge ties` and `umerge inspect` commands: help, options, output layout, progress/quiet,
exit codes. The numbers themselves are checked in test_ties_parity.py; here, the contract.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import Family, run_umerge
from ties_support import dtypes_of, load
from umerge.safetensors_io import read_header
from umerge.synthetic import TINY_ODD, llama_tensors

TIES_OPTIONS = ["--base", "--density", "--weight", "--lambda", "--preset", "-o", "--out-dtype", "--threads",
                "--memory-budget", "--max-shard-size", "--strict", "--overwrite", "--quiet"]


def test_top_level_help_lists_the_commands() -> None:
    result = run_umerge(["--help"])
    assert result.returncode == 0
    for command in ("ties", "inspect", "example"):
        assert command in result.stdout


def test_ties_help_documents_every_option() -> None:
    result = run_umerge(["ties", "--help"])
    assert result.returncode == 0, result.stderr
    for option in TIES_OPTIONS:
        assert option in result.stdout, option
    for preset in ("mergekit", "peft", "paper"):
        assert preset in result.stdout


def test_unknown_option_is_a_usage_error() -> None:
    result = run_umerge(["ties", "--no-such-option"])
    assert result.returncode == 2 and result.stderr.startswith("umerge: error: ")


@pytest.fixture(scope="module")
def merged(odd_f32_family: Family, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One default CLI merge (no -o: the output goes to ./merged in the working directory)."""
    cwd = tmp_path_factory.mktemp("cwd")
    result = run_umerge(["ties", *odd_f32_family.finetuned, "--base", odd_f32_family.base, "--density", "0.8"],
                        cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd / "merged", result.stderr


def test_default_output_is_merged_in_the_working_directory(merged: tuple[Path, str]) -> None:
    out, _ = merged
    assert out.is_dir()
    names = {n for n, _ in llama_tensors(TINY_ODD)}
    assert set(load(out)) == names


def test_output_layout(merged: tuple[Path, str], odd_f32_family: Family) -> None:
    out, _ = merged
    files = {p.name for p in out.iterdir()}
    # 290 KB of float32 weights fit the default 5GB shard: one model.safetensors, no index
    assert "model.safetensors" in files and "model.safetensors.index.json" not in files, files
    header, _ = read_header(out / "model.safetensors")
    assert header["__metadata__"]["format"] == "pt"
    assert {"config.json", "generation_config.json", "umerge.yml"} <= files
    config = json.loads((out / "config.json").read_text())
    base_config = json.loads((odd_f32_family.base / "config.json").read_text())
    assert config["hidden_size"] == base_config["hidden_size"]
    assert not any(p.name.startswith(".") or "tmp" in p.name for p in out.parent.iterdir() if p != out)


def test_recipe_records_method_inputs_and_parameters(merged: tuple[Path, str], odd_f32_family: Family) -> None:
    out, _ = merged
    recipe = yaml.safe_load((out / "umerge.yml").read_text())
    text = json.dumps(recipe)
    assert "ties" in text and "0.8" in text
    assert str(odd_f32_family.base.name) in text and odd_f32_family.finetuned[0].name in text
    import umerge

    assert umerge.__version__ in text or "version" in text


def test_summary_on_stdout_unless_quiet(merged: tuple[Path, str], odd_f32_family: Family, tmp_path: Path) -> None:
    fam = odd_f32_family
    args = ["ties", *fam.finetuned, "--base", fam.base, "--density", "0.8"]
    loud = run_umerge([*args, "-o", tmp_path / "loud"])
    assert loud.returncode == 0 and f"{len(llama_tensors(TINY_ODD))} tensors" in loud.stdout, loud.stdout
    quiet = run_umerge([*args, "-o", tmp_path / "quiet", "--quiet"])
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == "", quiet


def test_progress_bar_on_stderr_unless_quiet(odd_f32_family: Family, tmp_path: Path) -> None:
    # The bar is drawn when stderr is a terminal; UMERGE_PROGRESS=1 forces it on a pipe, as here.
    fam = odd_f32_family
    args = ["ties", *fam.finetuned, "--base", fam.base, "--density", "0.8"]
    bar = run_umerge([*args, "-o", tmp_path / "bar"], env={"UMERGE_PROGRESS": "1"})
    assert bar.returncode == 0 and "%" in bar.stderr, bar.stderr  # a tqdm bar: "merging:  40%|..."
    quiet = run_umerge([*args, "-o", tmp_path / "quiet", "--quiet"], env={"UMERGE_PROGRESS": "1"})
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


def test_out_dtype_changes_the_weights_and_the_config(odd_f32_family: Family, tmp_path: Path) -> None:
    result = run_umerge(["ties", *odd_f32_family.finetuned, "--base", odd_f32_family.base, "--density", "0.8",
                         "--out-dtype", "bf16", "-o", tmp_path / "out", "--quiet"])
    assert result.returncode == 0, result.stderr
    assert set(dtypes_of(tmp_path / "out").values()) == {"BF16"}
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config.get("torch_dtype", config.get("dtype")) == "bfloat16"


def test_max_shard_size_is_byte_accurate(odd_f32_family: Family, tmp_path: Path) -> None:
    limit = 60_000  # bytes of tensor data per shard; the largest tensor (embeddings) is 22 KB
    result = run_umerge(["ties", *odd_f32_family.finetuned, "--base", odd_f32_family.base, "--density", "0.8",
                         "--max-shard-size", str(limit), "-o", tmp_path / "out", "--quiet"])
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    total = 0
    for shard in shards:
        header, start = read_header(out / shard)
        data = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
        assert data <= limit, f"{shard} holds {data} bytes of tensors > {limit}"
        assert (out / shard).stat().st_size == start + data
        total += data
    assert index["metadata"]["total_size"] == total == 4 * TINY_ODD.n_params()


def test_overwrite_replaces_an_existing_output(odd_f32_family: Family, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    result = run_umerge(["ties", *odd_f32_family.finetuned, "--base", odd_f32_family.base, "--density", "0.8",
                         "-o", out, "--overwrite", "--quiet"])
    assert result.returncode == 0, result.stderr
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()


def test_empty_existing_output_directory_is_accepted(odd_f32_family: Family, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    result = run_umerge(["ties", *odd_f32_family.finetuned, "--base", odd_f32_family.base, "--density", "0.8",
                         "-o", out, "--quiet"])
    assert result.returncode == 0, result.stderr


def test_python_api_report(odd_f32_family: Family, tmp_path: Path) -> None:
    import umerge

    report = umerge.ties([str(p) for p in odd_f32_family.finetuned], base=str(odd_f32_family.base), density=0.8,
                         out=str(tmp_path / "out"), progress=False)
    fields = report if isinstance(report, dict) else vars(report) if hasattr(report, "__dict__") else {
        k: getattr(report, k) for k in dir(report) if not k.startswith("_")}
    text = " ".join(fields)
    assert "tensors" in text and "seconds" in text
    assert any("read" in k for k in fields) and any("written" in k or "write" in k for k in fields)
    assert any("peak" in k or "memory" in k for k in fields)
    n_tensors = fields.get("tensors") if isinstance(fields, dict) else None
    if isinstance(n_tensors, int):
        assert n_tensors == len(llama_tensors(TINY_ODD))


def test_inspect_json(odd_f32_family: Family) -> None:
    result = run_umerge(["inspect", odd_f32_family.base, "--json"])
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    text = json.dumps(info)
    for name, _ in llama_tensors(TINY_ODD):
        assert name in text
    assert "model-00002-of-00003.safetensors" in text
    assert "F32" in text
    assert info.get("valid") is True, info


def test_inspect_human_readable(odd_f32_family: Family) -> None:
    result = run_umerge(["inspect", odd_f32_family.base])
    assert result.returncode == 0, result.stderr
    assert "model.layers.2.mlp.down_proj.weight" in result.stdout
    assert "F32" in result.stdout


def test_inspect_reports_an_invalid_checkpoint(odd_f32_family: Family, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(odd_f32_family.base, bad)
    shard = bad / "model-00003-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-16])
    result = run_umerge(["inspect", bad, "--json"])
    assert result.returncode in (0, 2), result.stderr
    info = json.loads(result.stdout)
    assert info.get("valid") is False
    assert "model-00003-of-00003.safetensors" in json.dumps(info)  # says which file is broken


def test_cli_weights_are_applied_in_model_order(odd_f32_family: Family, tmp_path: Path) -> None:
    # weight 1 on ft1 and a tiny weight on ft2 differs from the swapped order
    fam = odd_f32_family
    common = ["ties", *fam.finetuned, "--base", fam.base, "--density", "1", "--quiet"]
    a = run_umerge([*common, "--weight", "1", "--weight", "0.001", "-o", tmp_path / "a"])
    b = run_umerge([*common, "--weight", "0.001", "--weight", "1", "-o", tmp_path / "b"])
    assert a.returncode == 0 and b.returncode == 0
    name = "model.layers.0.mlp.up_proj.weight"
    base, ft1, ft2 = load(fam.base)[name], load(fam.finetuned[0])[name], load(fam.finetuned[1])[name]
    d1, d2 = ft1 - base, ft2 - base
    got_a = load(tmp_path / "a")[name]
    # where both deltas agree: (d1 + 0.001 d2) / 1.001 = d1 + 0.001 (d2 - d1) / 1.001
    agree = np.sign(d1) == np.sign(d2)
    close = np.abs((got_a - base) - d1)[agree] <= 0.0011 * (np.abs(d1) + np.abs(d2))[agree] + 1e-7
    assert close.mean() > 0.999
    assert not np.array_equal(got_a, load(tmp_path / "b")[name])
