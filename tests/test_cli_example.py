"""`umerge example`: the README's main job. It must generate, merge, explain, and refuse to clobber."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import reference_merge as ref
from conftest import run_umerge
from ties_support import load, task_vectors


def test_example_generates_merges_and_explains(tmp_path: Path) -> None:
    out = tmp_path / "ex"
    result = run_umerge(["example", "-o", out])
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for fragment in ("ties", "density 0.8", "sign conflicts", str(out / "merged"), "umerge ties"):
        assert fragment in text, fragment
    models = out / "models"
    assert {p.name for p in models.iterdir()} == {"base", "ft1", "ft2"}
    merged = out / "merged"
    assert (merged / "config.json").exists() and (merged / "umerge.yml").exists()
    # the merge it ran is a real TIES merge: spot-check one tensor against the numpy reference
    base, fts = load(models / "base"), [load(models / "ft1"), load(models / "ft2")]
    name = "model.layers.1.self_attn.o_proj.weight"
    deltas = [d[name] for d in task_vectors(base, fts)]
    expected = ref.mergekit_ties(base[name], deltas, 0.8)
    got = load(merged)[name]
    assert np.mean(np.abs(got - expected) <= np.abs(expected) * 2.0**-7 + 1e-12) > 0.999


def test_example_refuses_a_non_empty_directory_without_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "ex"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    refused = run_umerge(["example", "-o", out])
    assert refused.returncode == 2 and refused.stderr.startswith("umerge: error: ")
    assert "--overwrite" in refused.stderr
    again = run_umerge(["example", "-o", out, "--overwrite"])
    assert again.returncode == 0, again.stderr
    assert (out / "notes.txt").read_text() == "keep me"  # only what the example makes is replaced
    twice = run_umerge(["example", "-o", out, "--overwrite"])
    assert twice.returncode == 0, twice.stderr
