"""`benches/gpu/reproduce.sh` at its CPU size (`SIZE=tiny`) end to end on the LUME data.

The recipe is meant for a GPU; here it runs the same steps with a tiny model on the CPU: the demo on
one LUME document per task, the batched-generation check on the vanilla model and the TIES merge,
and the report. On the CPU in float32 the check must pass on both models. The recipe's refusals
(a bad SIZE, no data) are checked too, since they are what a user on a GPU machine meets first, and
so is the failing path: with batched generation corrupted on purpose the recipe must exit 1 and
its report must say FAILED.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import IN_CI, REPO

try:
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
except ImportError as exc:  # under CI the train extra is required: fail, do not skip
    if IN_CI:
        raise
    pytest.skip(f"needs the train extra (torch, transformers, peft): {exc}", allow_module_level=True)

SCRIPT = REPO / "benches" / "gpu" / "reproduce.sh"

#: Put on PYTHONPATH, this makes every batched generation differ (a "~" before the first prompt's
#: text when the batch size is above 1), so the check must fail and the recipe must say so.
CORRUPT_BATCHED = """
import umerge.evaluate.generate as g

_real = g.generate


def generate(model, tokenizer, prompts, **kwargs):
    texts, stats = _real(model, tokenizer, prompts, **kwargs)
    if kwargs.get("batch_size", 8) > 1 and texts:
        texts = ["~" + texts[0], *texts[1:]]
    return texts, stats


g.generate = generate
"""


def _run(out: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """reproduce.sh on the CPU (no CUDA device visible, even on a GPU machine: this is the CPU size,
    where float32 must make batched and single generation agree)."""
    return subprocess.run(["bash", str(SCRIPT), str(out)],
                          env={**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", **env},
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, lume_dir: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("gpu-recipe") / "gpu-tiny"
    start = time.perf_counter()
    res = _run(out, SIZE="tiny", LUME=str(lume_dir))
    print(f"SIZE=tiny reproduce.sh took {time.perf_counter() - start:.0f}s")
    return out, res


@pytest.mark.train
@pytest.mark.slow
def test_tiny_size_end_to_end(tiny_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, res = tiny_run
    assert res.returncode == 0, res.stderr[-4000:]
    report = json.loads((out / "gpu-report.json").read_text())
    md = (out / "gpu-report.md").read_text()
    assert report["size"] == "tiny" and report["subset"] == 1
    bc = report["batched_check"]
    assert bc["passed"] is True
    assert list(bc["models"]) == ["vanilla", "merge-ties-factorwise"]
    for name, c in bc["models"].items():
        assert c["n"] > 0 and c["n_equal"] == c["n"] and c["all_equal"] is True, name
        assert (c["device"], c["dtype"]) == ("cpu", "float32")
        detail = json.loads((out / "checks" / f"{name}.json").read_text())
        assert detail["mismatches"] == [] and detail["n"] == c["n"]
        assert detail["data"] == str(out / "demo" / "data")  # the prompts of the demo's own subset
    assert [s["step"] for s in report["steps"]] == ["demo", "check vanilla", "check merge-ties-factorwise"]
    assert all(s["rc"] == 0 and s["seconds"] > 0 for s in report["steps"])
    assert report["environment"]["torch"] == torch.__version__ and report["environment"]["cuda_available"] is False
    assert report["demo"] is not None and report["demo"]["timings_s"]["total"] > 0
    assert set(report["demo"]["scores"]) == {"vanilla", "merge-ties-factorwise"}
    assert "**PASSED**" in md and "| vanilla | " in md and "| merge-ties-factorwise | " in md
    assert "--subset 1" in report["demo_command"] and "--data" in report["demo_command"]
    assert "PASS batched generation" in res.stdout
    # the demo recorded what it drew (--subset 1: one document per task and split, three tasks)
    demo = json.loads((out / "demo" / "report.json").read_text())
    sub = demo["data"]["subset"]
    assert sub["docs_per_task"] == 1 and sub["mia"] == {"members": 3, "nonmembers": 3} and "documents" not in sub
    assert "1 documents per task and split drawn (seed 0)" in (out / "demo" / "report.md").read_text()


@pytest.mark.train
@pytest.mark.slow
def test_a_batched_difference_fails_the_recipe(tiny_run: tuple[Path, subprocess.CompletedProcess[str]],
                                               tmp_path: Path) -> None:
    """The tiny run's models again (REUSE_DEMO), with batched generation corrupted: exit 1, report FAILED."""
    demo, first = tiny_run
    assert first.returncode == 0, first.stderr[-4000:]
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(CORRUPT_BATCHED)
    pythonpath = os.pathsep.join(p for p in (str(inject), os.environ.get("PYTHONPATH", "")) if p)
    out = tmp_path / "out"
    res = _run(out, SIZE="tiny", REUSE_DEMO=str(demo / "demo"), PYTHONPATH=pythonpath)
    assert res.returncode == 1, res.stderr[-4000:]
    assert "batched generation differed" in res.stderr
    report = json.loads((out / "gpu-report.json").read_text())
    assert report["batched_check"]["passed"] is False
    assert [s["step"] for s in report["steps"]] == ["check vanilla", "check merge-ties-factorwise"]
    assert report["demo_command"].startswith("reused ")
    for name, c in report["batched_check"]["models"].items():
        assert c["n_equal"] == c["n"] - 1, name
        (m,) = json.loads((out / "checks" / f"{name}.json").read_text())["mismatches"]
        assert m["batched"] == "~" + m["single"] and m["common_prefix_chars"] == 0
    assert "**FAILED**" in (out / "gpu-report.md").read_text()
    assert not (out / "demo").exists()


def test_bad_size_is_refused(tmp_path: Path) -> None:
    res = _run(tmp_path / "o", SIZE="huge")
    assert res.returncode == 2 and "SIZE must be gpu or tiny" in res.stderr
    assert not (tmp_path / "o").exists()


def test_missing_data_is_refused(tmp_path: Path) -> None:
    res = _run(tmp_path / "o", SIZE="tiny", LUME=str(tmp_path / "nowhere"))
    assert res.returncode == 2 and "no LUME data at" in res.stderr and "set LUME=DIR" in res.stderr
    assert not (tmp_path / "o").exists()
