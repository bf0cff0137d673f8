"""Bounded memory: a merge whose inputs are many times the memory budget stays within the budget.

Peak RSS of the `umerge` process is the kernel's high-water mark (exact, not sampled), read by a
tiny intermediate Python that spawns the command and reports `getrusage(RUSAGE_CHILDREN)`: spawned
straight from pytest, the child's `ru_maxrss` would start at pytest's own size (Linux keeps the
pre-exec high-water mark across exec; benches/measure.py does the same for the benchmark). Memory-mapped
input pages count towards RSS while resident, so an engine that did not release consumed windows
would show the inputs' size here (330 MB), far above the bound checked (the baseline RSS of the
command, plus the budget, plus 48 MiB of slack for buffers and thread stacks).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, Family, umerge_command
from umerge.synthetic import CheckpointSpec, LlamaShape, make_family

# 55M parameters, 110 MB per bf16 checkpoint; embeddings of 16.4M elements (many chunks each).
LARGE = LlamaShape(hidden=1024, intermediate=2816, layers=2, heads=8, kv_heads=2, vocab=16000)
BUDGET_MIB = 32
SLACK_MIB = 48


_RUNNER = (
    "import os, resource, sys\n"
    "status = os.waitpid(os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ), 0)[1]\n"
    "print(os.waitstatus_to_exitcode(status), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
)


def peak_rss_mib(args: list[str | os.PathLike[str]]) -> float:
    """Peak RSS in MiB of `umerge ARGS` (stdout of the command itself must be empty: use --quiet)."""
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO / "python"))}
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", _RUNNER, *umerge_command(), *map(str, args)],
                          capture_output=True, text=True, env=env, check=False)
    rc, maxrss_kib = proc.stdout.split()[-2:]
    assert rc == "0", proc.stderr
    return int(maxrss_kib) / 1024


@pytest.fixture(scope="module")
def large_family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    spec = CheckpointSpec(LARGE, "BF16", shards=3, seed=51)
    base, fts = make_family(tmp_path_factory.mktemp("large"), spec, 2)
    return Family(spec, base, fts)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["mergekit", "paper"])
def test_peak_rss_stays_within_the_budget(large_family: Family, tmp_path: Path, preset: str) -> None:
    inputs_mib = sum(f.stat().st_size for d in large_family.all for f in d.glob("*.safetensors")) / 2**20
    assert inputs_mib > 8 * BUDGET_MIB
    baseline = peak_rss_mib(["--version"])
    peak = peak_rss_mib(["ties", *large_family.finetuned, "--base", large_family.base, "--density", "0.8",
                         "--preset", preset, "--memory-budget", f"{BUDGET_MIB}MiB", "-o", tmp_path / "out", "--quiet"])
    print(f"\n{preset}: inputs {inputs_mib:.0f} MiB, budget {BUDGET_MIB} MiB, baseline {baseline:.0f} MiB, "
          f"peak RSS {peak:.0f} MiB")
    assert peak <= baseline + BUDGET_MIB + SLACK_MIB
