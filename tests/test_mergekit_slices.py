"""Layer stacking (`slices:`), `passthrough` and multi-document configs, against mergekit 0.1.5.

The same YAML runs through mergekit (`run_merge`, what `mergekit-yaml` calls; `mergekit-multi` for
the multi-document config) in the peer venv and through `umerge run`, on float32 Llama-shaped
checkpoints with 6 layers. Passthrough copies (and multiplies by `scale`, one float32 product per
element, as torch does), so every tensor must be bit-identical, and config.json's layer count the
same; the task-arithmetic slices are held to test_methods_parity's 1-ulp rule. By hand: which
source layer each output layer holds, and that a scale filter naming a layer matches the source's
layer number, not the output's (mergekit resolves a model's parameters on its own tensor names).
Bad configs: one line, exit 2, nothing written (no output, no stage, no temporary).
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import Family, run_umerge
from mergekit_runner import run_mergekit
from umerge import mergekit_yaml as mk
from umerge.safetensors_io import load_checkpoint
from umerge.synthetic import TINY_ODD, CheckpointSpec, make_family

LAYERS = 6


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """A float32 base and two fine-tunes with 6 layers (odd sizes, 2 shards)."""
    spec = CheckpointSpec(TINY_ODD.with_layers(LAYERS), dtype="F32", shards=2, seed=31)
    base, fts = make_family(tmp_path_factory.mktemp("six_layers"), spec, 2)
    return Family(spec, base, fts)


def _configs(fam: Family) -> dict[str, str]:
    b, (a, c) = fam.base, fam.finetuned
    return {
        # 2-model frankenmerge, ranges overlapping (a's layers 0-3, then c's 2-5: 8 layers); a
        # filter on c's own layer 2 (output layer 4) and a scale that is not a power of two.
        "frankenmerge_overlap": f"""
            merge_method: passthrough
            slices:
              - sources:
                  - model: {a}
                    layer_range: [0, 4]
              - sources:
                  - model: {c}
                    layer_range: [2, 6]
                    parameters:
                      scale:
                        - filter: layers.2.
                          value: 0.5
                        - filter: mlp.up_proj
                          value: 0.7
            dtype: float32
        """,
        # The per-filter scale of the usual layer-pruning recipe, per slice, three slices.
        "passthrough_scale_filters": f"""
            merge_method: passthrough
            slices:
              - sources:
                  - model: {a}
                    layer_range: [0, 3]
              - sources:
                  - model: {c}
                    layer_range: [1, 3]
                parameters:
                  scale:
                    - filter: o_proj
                      value: 0.0
                    - filter: down_proj
                      value: 0.0
                    - value: 1.0
              - sources:
                  - model: {b}
                    layer_range: [3, 6]
                    parameters: {{scale: 0.3}}
            dtype: float32
        """,
        "single_passthrough": f"""
            merge_method: passthrough
            models:
              - model: {a}
                parameters:
                  scale:
                    - filter: mlp
                      value: 0.25
            dtype: float32
        """,
        # A merge method over slices whose sources take different layers of each model.
        "task_arithmetic_remapped": f"""
            merge_method: task_arithmetic
            base_model: {b}
            slices:
              - sources:
                  - model: {b}
                    layer_range: [0, 3]
                  - model: {a}
                    layer_range: [0, 3]
                    parameters: {{weight: 0.6}}
                  - model: {c}
                    layer_range: [3, 6]
                    parameters: {{weight: [1.0, 0.2]}}
              - sources:
                  - model: {b}
                    layer_range: [2, 4]
                  - model: {c}
                    layer_range: [0, 2]
                    parameters: {{weight: 0.9}}
                parameters: {{lambda: 0.5}}
            dtype: float32
        """,
    }


def _multi_config(fam: Family) -> str:
    b, (a, c) = fam.base, fam.finetuned
    # Stage 1 (named): a frankenmerge of a and c (7 layers); the final (unnamed) document stacks
    # 6 of the stage's layers, attention scaled, on 2 of the base's.
    return textwrap.dedent(f"""
        name: stacked
        merge_method: passthrough
        slices:
          - sources:
              - model: {a}
                layer_range: [0, 4]
          - sources:
              - model: {c}
                layer_range: [3, 6]
        dtype: float32
        ---
        merge_method: passthrough
        slices:
          - sources:
              - model: stacked
                layer_range: [1, 7]
                parameters:
                  scale:
                    - filter: self_attn
                      value: 0.9
          - sources:
              - model: {b}
                layer_range: [4, 6]
        dtype: float32
    """)


@pytest.fixture(scope="module")
def mergekit_outputs(peers: Path, six_layers: Family, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mk_slices")
    out, _ = run_mergekit(peers, root, _configs(six_layers))
    multi = root / "multi.yml"
    multi.write_text(_multi_config(six_layers))
    proc = subprocess.run([str(peers / "bin" / "mergekit-multi"), str(multi), "--intermediate-dir", str(root / "mk_stages"),
                           "--out-path", str(root / "mk_multi"), "--no-copy-tokenizer", "--no-write-model-card",
                           "--quiet"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"mergekit-multi failed:\n{proc.stderr[-3000:]}"
    out["multi"] = root / "mk_multi"
    out["multi_stage"] = root / "mk_stages" / "stacked"
    return out


def _layers(path: Path) -> int:
    return int(json.loads((path / "config.json").read_text())["num_hidden_layers"])


def _assert_bit_identical(ours_dir: Path, theirs_dir: Path) -> None:
    ours, theirs = load_checkpoint(ours_dir), load_checkpoint(theirs_dir)
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        a, b = ours[name], theirs[name]
        assert a.shape == b.shape and a.dtype == b.dtype == np.float32, name
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), f"{name}: not bit-identical"
    assert _layers(ours_dir) == _layers(theirs_dir)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["frankenmerge_overlap", "passthrough_scale_filters", "single_passthrough"])
def test_passthrough_is_bit_identical_to_mergekit(case: str, mergekit_outputs: dict[str, Path], tmp_path: Path) -> None:
    theirs = mergekit_outputs[case]
    r = run_umerge(["run", theirs.parent / f"{case}.yml", "-o", tmp_path / "out", "--quiet"])
    assert r.returncode == 0, r.stderr
    _assert_bit_identical(tmp_path / "out", theirs)


@pytest.mark.slow
def test_task_arithmetic_over_remapped_slices_matches_mergekit(mergekit_outputs: dict[str, Path],
                                                                tmp_path: Path) -> None:
    theirs_dir = mergekit_outputs["task_arithmetic_remapped"]
    r = run_umerge(["run", theirs_dir.parent / "task_arithmetic_remapped.yml", "-o", tmp_path / "out", "--quiet"])
    assert r.returncode == 0, r.stderr
    ours, theirs = load_checkpoint(tmp_path / "out"), load_checkpoint(theirs_dir)
    assert sorted(ours) == sorted(theirs) and _layers(tmp_path / "out") == _layers(theirs_dir) == 5
    for name in theirs:
        ok = np.abs(ours[name].astype(np.float64) - theirs[name]) <= np.spacing(np.abs(theirs[name]))
        assert ok.mean() >= 0.999, f"{name}: only {ok.mean():.4%} within 1 ulp"


@pytest.mark.slow
def test_multi_document_config_is_bit_identical_to_mergekit_multi(mergekit_outputs: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    cfg = mergekit_outputs["multi"].parent / "multi.yml"
    r = run_umerge(["run", cfg, "-o", tmp_path / "final", "--quiet", "--keep-intermediate",
                    "--intermediate-dir", tmp_path / "stages"])
    assert r.returncode == 0, r.stderr
    _assert_bit_identical(tmp_path / "final", mergekit_outputs["multi"])
    _assert_bit_identical(tmp_path / "stages" / "stacked", mergekit_outputs["multi_stage"])
    # Without --keep-intermediate the stage is removed once the final output is written.
    r = run_umerge(["run", cfg, "-o", tmp_path / "again", "--quiet"])
    assert r.returncode == 0, r.stderr
    _assert_bit_identical(tmp_path / "again", mergekit_outputs["multi"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "final", "stages"]


def test_frankenmerge_layers_by_hand(six_layers: Family, tmp_path: Path) -> None:
    """Which layer each output layer holds, and the scale filter on the source's own layer number."""
    cfg = tmp_path / "frank.yml"
    cfg.write_text(textwrap.dedent(_configs(six_layers)["frankenmerge_overlap"]))
    r = run_umerge(["run", cfg, "-o", tmp_path / "out", "--quiet"])
    assert r.returncode == 0, r.stderr
    out = load_checkpoint(tmp_path / "out")
    a, c = (load_checkpoint(p) for p in six_layers.finetuned)
    assert _layers(tmp_path / "out") == 8
    assert {n for n in out if ".layers." in n} == {n.replace(".0.", f".{j}.", 1) for n in a if ".layers.0." in n
                                                    for j in range(8)}
    for j in range(8):
        src, layer = (a, j) if j < 4 else (c, j - 2)
        for part in ("self_attn.q_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight"):
            want = src[f"model.layers.{layer}.{part}"]
            if src is c and layer == 2:
                want = want * np.float32(0.5)  # "layers.2." names c's layer 2, written as output layer 4
            elif src is c and part == "mlp.up_proj.weight":
                want = want * np.float32(0.7)
            got = out[f"model.layers.{j}.{part}"]
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (j, part)
    # embeddings from the first slice's model, final norm and lm_head from the last slice's
    for name, src in (("model.embed_tokens.weight", a), ("model.norm.weight", c), ("lm_head.weight", c)):
        assert np.array_equal(out[name], src[name]), name


def test_sliced_config_becomes_engine_slices(six_layers: Family, tmp_path: Path) -> None:
    b, (a, c) = six_layers.base, six_layers.finetuned
    cfg = mk.parse_config(textwrap.dedent(_configs(six_layers)["task_arithmetic_remapped"]))
    spec, _ = mk.to_spec(cfg, tmp_path / "o")
    assert spec["base"] == str(b) and [m["path"] for m in spec["models"]] == [str(a), str(c)]
    assert spec["slices"] == [
        {"sources": [{"model": 0, "layer_range": [0, 3]}, {"model": 1, "layer_range": [3, 6]}],
         "base_layer_range": [0, 3]},
        {"sources": [{"model": 1, "layer_range": [0, 2]}], "base_layer_range": [2, 4]},
    ]
    # c's weight is a gradient over its first slice (t = 0, 0.5, 1 -> 1.0, 0.6, 0.2) and 0.9 in the
    # second; lambda is 0.5 in the second slice only (the global default 1 elsewhere).
    rules = {r["filter"]: r["value"] for r in spec["models"][1]["params"]["weight"]}
    assert rules["model.layers.0.mlp.up_proj.weight"] == 1.0
    assert rules["model.layers.1.mlp.up_proj.weight"] == pytest.approx(0.6)
    assert rules["model.layers.2.mlp.up_proj.weight"] == pytest.approx(0.2)
    assert rules["model.layers.3.mlp.up_proj.weight"] == 0.9
    # a takes part in the first slice only, with one weight there: a plain number (the engine
    # applies a model's parameters to the tensors it takes part in)
    assert spec["models"][0]["params"]["weight"] == 0.6
    lam = {r["filter"]: r["value"] for r in spec["params"]["lambda"]}
    assert lam["model.layers.4.mlp.up_proj.weight"] == 0.5 and "model.layers.0.mlp.up_proj.weight" not in lam


MULTI_BAD = {
    "cycle": ("name: x\nmerge_method: passthrough\nmodels:\n  - model: y\n---\n"
              "name: y\nmerge_method: passthrough\nmodels:\n  - model: x\n---\n"
              "merge_method: passthrough\nmodels:\n  - model: y\n", "cycle: "),
    "unknown name": ("name: x\nmerge_method: passthrough\nmodels:\n  - model: {a}\n---\n"
                     "merge_method: passthrough\nmodels:\n  - model: z\n",
                     "z is neither a local path nor the name of a document"),
    "duplicate name": ("name: x\nmerge_method: passthrough\nmodels:\n  - model: {a}\n---\n"
                       "name: x\nmerge_method: passthrough\nmodels:\n  - model: {a}\n", "each document needs its own name"),
    "two unnamed": ("merge_method: passthrough\nmodels:\n  - model: {a}\n---\n"
                    "merge_method: passthrough\nmodels:\n  - model: {a}\n", "at most one document"),
    "bad later document": ("name: x\nmerge_method: passthrough\nmodels:\n  - model: {a}\n---\n"
                           "merge_method: passthrough\nmodels:\n  - model: x\n    parameters: {{wieght: 1}}\n",
                           "document 2"),
    "path name": ("name: ../x\nmerge_method: passthrough\nmodels:\n  - model: {a}\n", "plain directory name"),
    # found only once the stage it reads has run: the stage is removed again
    "range past a stage's layers": ("name: x\nmerge_method: passthrough\nmodels:\n  - model: {a}\n---\n"
                                    "merge_method: passthrough\nslices:\n  - sources:\n      - model: x\n"
                                    "        layer_range: [0, 9]\n", "goes past the 6 layers"),
}


@pytest.mark.parametrize("case", sorted(MULTI_BAD))
def test_bad_multi_document_config_one_line_exit_2_nothing_written(six_layers: Family, tmp_path: Path,
                                                                    case: str) -> None:
    text, needle = MULTI_BAD[case]
    cfg = tmp_path / "multi.yml"
    cfg.write_text(text.format(a=six_layers.finetuned[0]))
    r = run_umerge(["run", cfg, "-o", tmp_path / "out"], cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("umerge: error: ") and needle in lines[-1], r.stderr
    assert [ln for ln in lines if not ln.startswith("umerge: document")] == lines[-1:], r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["multi.yml"]


def test_intermediate_options_need_a_multi_document_config(six_layers: Family, tmp_path: Path) -> None:
    cfg = tmp_path / "one.yml"
    cfg.write_text(f"merge_method: passthrough\nmodels:\n  - model: {six_layers.finetuned[0]}\n")
    r = run_umerge(["run", cfg, "-o", tmp_path / "out", "--keep-intermediate"])
    assert r.returncode == 2 and "multi-document" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def _two_stage(a: Path) -> str:
    return (f"name: first\nmerge_method: passthrough\nmodels:\n  - model: {a}\n---\n"
            "merge_method: passthrough\nslices:\n  - sources:\n      - model: first\n        layer_range: [0, 2]\n")


def test_multi_document_run_refuses_an_existing_output_before_any_stage(six_layers: Family, tmp_path: Path) -> None:
    cfg = tmp_path / "multi.yml"
    cfg.write_text(_two_stage(six_layers.finetuned[0]))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("kept")
    r = run_umerge(["run", cfg, "-o", tmp_path / "out"])
    assert r.returncode == 2 and "exists and is not empty" in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi.yml", "out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]


def test_print_spec_of_a_multi_document_config_lists_its_stages_in_order(six_layers: Family, tmp_path: Path) -> None:
    cfg = tmp_path / "multi.yml"
    # the final (unnamed) document first in the file: it still runs last
    first, final = _two_stage(six_layers.finetuned[0]).split("---\n")
    cfg.write_text(final + "---\n" + first)
    r = run_umerge(["run", cfg, "-o", tmp_path / "out", "-I", tmp_path / "st", "--print-spec"])
    assert r.returncode == 0, r.stderr
    stages = json.loads(r.stdout)
    assert [(s["document"], s["name"], s["needs"]) for s in stages] == [(2, "first", []), (1, None, ["first"])]
    assert stages[0]["out"] == str(tmp_path / "st" / "first") and stages[1]["out"] == str(tmp_path / "out")
    assert stages[1]["config"]["slices"][0]["sources"][0]["model"] == str(tmp_path / "st" / "first")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi.yml"]
