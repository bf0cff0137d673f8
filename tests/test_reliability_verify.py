"""`umerge verify`: a merged model checks out; every kind of damage is found and named.

The checksums are compared with sha256 computed here by `hashlib` (an independent reference), and
the NaN/Inf scan with positions planted by the test.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import run_umerge
from umerge.synthetic import TINY_ODD, CheckpointSpec, make_family, write_model

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("verify")
    base, fts = make_family(root / "models", CheckpointSpec(TINY_ODD, "BF16", shards=2, seed=21), 2)
    out = root / "merged"
    r = run_umerge(["ties", *fts, "--base", base, "--density", "0.7", "-o", out, "--quiet", "--max-shard-size", "40000"])
    assert r.returncode == 0, r.stderr
    return out


def copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def shards(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def test_the_recipe_records_each_shard_sha256(merged: Path) -> None:
    recipe = yaml.safe_load((merged / "umerge.yml").read_text())
    recorded = recipe["shards"]
    files = shards(merged)
    assert len(files) >= 2, "the fixture should be sharded"
    assert sorted(recorded) == [p.name for p in files]
    for p in files:
        assert recorded[p.name]["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
        assert recorded[p.name]["bytes"] == p.stat().st_size


def test_a_fresh_merge_verifies(merged: Path) -> None:
    r = run_umerge(["verify", merged, "--scan-nonfinite"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "valid" in r.stdout.splitlines()[0] and "INVALID" not in r.stdout
    assert "checksums match the recipe" in r.stdout
    j = json.loads(run_umerge(["verify", merged, "--json"]).stdout)
    assert j["valid"] and j["recipe_checked"] and j["errors"] == []
    for s in j["shards"]:
        assert s["sha256"] == hashlib.sha256((merged / s["file"]).read_bytes()).hexdigest() == s["recipe_sha256"]


def expect_invalid(path: Path, *mentions: str, extra: tuple[str, ...] = ()) -> dict:  # type: ignore[type-arg]
    r = run_umerge(["verify", path, *extra])
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("umerge: error: "), r.stderr
    report = json.loads(run_umerge(["verify", path, "--json", *extra]).stdout)
    assert not report["valid"]
    text = "\n".join(report["errors"])
    for m in mentions:
        assert m in text, f"{m!r} not in {text}"
    return report


def test_one_flipped_bit_in_the_data_is_caught_by_the_checksum(merged: Path, tmp_path: Path) -> None:
    d = copy(merged, tmp_path / "m")
    victim = shards(d)[-1]
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0x01  # inside the tensor data: the header stays valid
    victim.write_bytes(bytes(data))
    rep = expect_invalid(d, "sha256", victim.name)
    assert len(rep["errors"]) == 1, rep["errors"]


def test_a_truncated_shard_is_named(merged: Path, tmp_path: Path) -> None:
    d = copy(merged, tmp_path / "m")
    victim = shards(d)[0]
    victim.write_bytes(victim.read_bytes()[:-10])
    expect_invalid(d, victim.name)


def test_every_bad_shard_is_reported_not_only_the_first(merged: Path, tmp_path: Path) -> None:
    d = copy(merged, tmp_path / "m")
    for p in shards(d):
        p.write_bytes(p.read_bytes()[:-1])
    rep = expect_invalid(d)
    assert sum("invalid safetensors file" in e for e in rep["errors"]) == len(shards(d))


def test_index_inconsistencies(merged: Path, tmp_path: Path) -> None:
    d = copy(merged, tmp_path / "m")
    index = json.loads((d / INDEX).read_text())
    name = sorted(index["weight_map"])[0]
    del index["weight_map"][name]
    index["metadata"]["total_size"] += 2
    (d / INDEX).write_text(json.dumps(index))
    expect_invalid(d, f"tensor {name} stored in", "total_size")


def test_a_shard_missing_from_disk_is_reported_against_the_recipe(merged: Path, tmp_path: Path) -> None:
    d = copy(merged, tmp_path / "m")
    victim = shards(d)[-1]
    victim.unlink()
    expect_invalid(d, victim.name)


def test_nan_and_inf_scan(tmp_path: Path) -> None:
    w = np.zeros((3, 5), dtype=np.float32)
    w[1, 2] = np.nan
    w[2, 4] = np.inf
    v = np.ones(7, dtype=np.float32)
    v[6] = -np.inf
    d = write_model(tmp_path / "m", {"a.weight": w, "b.weight": v, "c.weight": np.ones(4, np.float32)}, dtype="BF16")
    # Without the scan the file is structurally valid (no recipe: a warning, not an error).
    r = run_umerge(["verify", d])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warning: no umerge.yml" in r.stdout
    rep = expect_invalid(d, "a.weight", "b.weight", extra=("--scan-nonfinite",))
    found = {t["tensor"]: (t["nan"], t["inf"], t["first_index"]) for t in rep["nonfinite"]}
    assert found == {"a.weight": (1, 1, 1 * 5 + 2), "b.weight": (0, 1, 6)}


def test_recipe_tampering_is_caught(merged: Path, tmp_path: Path) -> None:
    d = copy(merged, tmp_path / "m")
    text = (d / "umerge.yml").read_text()
    first = re.search(r"\"sha256\":\s*\"([0-9a-f]{64})\"", text)
    assert first
    (d / "umerge.yml").write_text(text.replace(first.group(1), "0" * 64, 1))
    expect_invalid(d, "sha256")
