"""Determinism: the same inputs and options give the same output bytes whatever the thread count or
memory budget (the budget changes the chunking, so tensors here are larger than a chunk).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import Family, run_umerge
from ties_support import weight_files
from umerge.synthetic import CheckpointSpec, LlamaShape

# One layer, 11M parameters; embeddings of 4.1M elements (8 MiB in bf16): several chunks each.
MEDIUM = LlamaShape(hidden=512, intermediate=1376, layers=1, heads=8, kv_heads=2, vocab=8003)


@pytest.fixture(scope="module")
def medium_bf16(tmp_path_factory: pytest.TempPathFactory) -> Family:
    from umerge.synthetic import make_family

    spec = CheckpointSpec(MEDIUM, "BF16", shards=2, seed=31)
    base, fts = make_family(tmp_path_factory.mktemp("medium"), spec, 2)
    return Family(spec, base, fts)


def _merge(fam: Family, out: Path, *options: str) -> dict[str, bytes]:
    result = run_umerge(["ties", *fam.finetuned, "--base", fam.base, "--density", "0.8", "-o", out, "--quiet",
                         *options])
    assert result.returncode == 0, result.stderr
    files = weight_files(out)
    assert any(name.endswith(".safetensors") for name in files)
    return files


@pytest.mark.parametrize("preset", ["mergekit", "paper"])
def test_same_bytes_for_one_and_two_threads(medium_bf16: Family, tmp_path: Path, preset: str) -> None:
    one = _merge(medium_bf16, tmp_path / "t1", "--threads", "1", "--preset", preset)
    two = _merge(medium_bf16, tmp_path / "t2", "--threads", "2", "--preset", preset)
    assert one == two


def test_same_bytes_for_different_memory_budgets(medium_bf16: Family, tmp_path: Path) -> None:
    small = _merge(medium_bf16, tmp_path / "small", "--memory-budget", "24MiB", "--threads", "2")
    large = _merge(medium_bf16, tmp_path / "large", "--memory-budget", "2GiB", "--threads", "2")
    assert small == large


def test_same_bytes_with_weights_and_sharded_output(medium_bf16: Family, tmp_path: Path) -> None:
    opts = ("--weight", "0.7", "--weight", "1.1", "--lambda", "0.9", "--max-shard-size", "10MB")
    a = _merge(medium_bf16, tmp_path / "a", "--threads", "1", "--memory-budget", "32MiB", *opts)
    b = _merge(medium_bf16, tmp_path / "b", "--threads", "2", "--memory-budget", "1GiB", *opts)
    assert a == b
    assert sum(name.endswith(".safetensors") for name in a) > 1


#: The methods whose coefficients come from per-tensor sums, per row, element-wise or from a score
#: selection, as command lines ({b} base, {a} and {c} the fine-tunes).
METHOD_ARGS = {
    "nuslerp-columns": ["nuslerp", "{a}", "{c}", "--base", "{b}", "--no-flatten", "--row-wise", "--weight", "0.3",
                        "--weight", "0.9"],
    "nuslerp-rows": ["nuslerp", "{a}", "{c}", "--no-flatten"],
    "nuslerp-tensor": ["nuslerp", "{a}", "{c}", "--base", "{b}"],
    "multislerp": ["multislerp", "{a}", "{c}", "--base", "{b}", "--weight", "0.4", "--weight", "0.6"],
    "karcher": ["karcher", "{b}", "{a}", "{c}"],
    "nearswap": ["nearswap", "{a}", "--base", "{b}", "--t", "0.002"],
    "model-stock-filter-wise": ["model-stock", "{a}", "{c}", "--base", "{b}", "--filter-wise"],
    "ties-no-normalize": ["ties", "{a}", "{c}", "--base", "{b}", "--density", "0.8", "--no-normalize"],
    # score selections (exact order statistics over each tensor; bf16 variances tie often)
    "sce": ["sce", "{a}", "{c}", "--base", "{b}", "--select-topk", "0.3"],
    "arcee-fusion": ["arcee-fusion", "{a}", "--base", "{b}"],
    "ram": ["ram", "{a}", "{c}", "--base", "{b}", "--epsilon", "0.002"],
    "ramplus-tl": ["ramplus-tl", "{a}", "{c}", "--base", "{b}", "--epsilon", "0.002", "--r", "0.5"],
}


@pytest.mark.parametrize("case", sorted(METHOD_ARGS))
def test_same_bytes_for_threads_and_budgets_per_method(medium_bf16: Family, tmp_path: Path, case: str) -> None:
    names = {"b": medium_bf16.base, "a": medium_bf16.finetuned[0], "c": medium_bf16.finetuned[1]}
    args = [x.format(**names) for x in METHOD_ARGS[case]]
    outs = []
    runs = (("--threads", "1", "--memory-budget", "24MiB"), ("--threads", "2", "--memory-budget", "2GiB"))
    for k, opts in enumerate(runs):
        result = run_umerge([*args, "-o", tmp_path / f"o{k}", "--quiet", *opts])
        assert result.returncode == 0, result.stderr
        outs.append(weight_files(tmp_path / f"o{k}"))
    assert outs[0] == outs[1]
