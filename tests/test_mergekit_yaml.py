"""`umerge run` (mergekit YAML -> spec), the method commands' errors, and `umerge methods`.

- parameter resolution against hand-computed values (gradients as mergekit interpolates them,
  filter rules, rule lists falling through to the global value, mergekit's defaults made explicit);
- bad configs and bad method arguments: one-line error, exit 2, no output directory.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import Family, run_umerge
from umerge import mergekit_yaml as mk
from umerge.errors import InputError
from umerge.safetensors_io import load_checkpoint


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "merge.yml"
    p.write_text(textwrap.dedent(text))
    return p


def test_evaluate_matches_mergekit_rules_by_hand() -> None:
    # gradient [0, 1, 0.5] at t = 0.25: scaled 0.5 between 0 and 1 -> 0.5; at t = 0.75 -> 0.75
    assert mk.evaluate([0.0, 1.0, 0.5], "x", 0.25) == 0.5
    assert mk.evaluate([0.0, 1.0, 0.5], "x", 0.75) == 0.75
    rules = mk._normalize_setting([{"filter": "mlp", "value": [0.0, 1.0]}, {"filter": "*", "value": 0.3}], "t", "c")
    assert mk.evaluate(rules, "model.layers.1.mlp.up_proj.weight", 0.5) == 0.5
    assert mk.evaluate(rules, "model.layers.1.self_attn.q_proj.weight", 0.5) == 0.3
    only_mlp = mk._normalize_setting({"filter": "mlp", "value": 0.2}, "w", "c")
    assert mk.evaluate(only_mlp, "attn", 0.0) is None


def test_simple_config_passes_filters_through_and_makes_mergekit_defaults_explicit(odd_f32_family: Family,
                                                                                   tmp_path: Path) -> None:
    b, (a, c) = odd_f32_family.base, odd_f32_family.finetuned
    cfg = {
        "merge_method": "dare_ties", "base_model": str(b),
        "models": [{"model": str(a), "parameters": {"weight": [{"filter": "mlp", "value": 0.5}]}},
                   {"model": str(c), "parameters": {"weight": 0.7, "density": 0.4}}],
        "parameters": {"weight": 0.9, "int8_mask": True},
    }
    spec, tok = mk.to_spec(cfg, tmp_path / "o")
    assert tok is None
    assert spec["method"] == "dare_ties" and spec["base"] == str(b)
    # mergekit: rescale true (L1), density 1.0 where not given, normalize false; int8_mask dropped
    assert spec["params"]["rescale"] == "l1" and spec["params"]["normalize"] is False
    assert "int8_mask" not in spec["params"]
    m0, m1 = (m.get("params", {}) for m in spec["models"])
    # model 0's rule list has no default: it falls through to the global weight, as in mergekit
    assert m0["weight"] == [{"filter": "mlp", "value": 0.5}, {"value": 0.9}]
    assert m1["weight"] == 0.7 and m1["density"] == 0.4
    assert m0.get("density", spec["params"].get("density")) == 1.0


@pytest.mark.parametrize(("method", "normalize"), [("della", True), ("della_linear", False)])
def test_della_config_gets_mergekit_defaults_and_runs(odd_f32_family: Family, tmp_path: Path, method: str,
                                                      normalize: bool) -> None:
    b, (a, c) = odd_f32_family.base, odd_f32_family.finetuned
    cfg = {"merge_method": method, "base_model": str(b),
           "models": [{"model": str(a), "parameters": {"weight": 1.0, "epsilon": 0.05}}, {"model": str(c)}],
           "parameters": {"density": 0.5, "weight": 0.5}}
    spec, _ = mk.to_spec(cfg, tmp_path / "o", seed=3)
    # mergekit: rescale true (L1), normalize true for della only, epsilon 0.15 where not given
    assert spec["params"]["rescale"] == "l1" and spec["params"]["normalize"] is normalize
    assert spec["params"]["seed"] == 3
    eps = [m.get("params", {}).get("epsilon", spec["params"].get("epsilon")) for m in spec["models"]]
    assert eps == [0.05, 0.15]
    cfg_path = tmp_path / "della.yml"
    cfg_path.write_text(json.dumps(cfg))  # JSON is YAML
    r = run_umerge(["run", cfg_path, "-o", tmp_path / "out", "--quiet", "--seed", "3"])
    assert r.returncode == 0, r.stderr
    assert f"method: \"{method}\"" in (tmp_path / "out" / "umerge.yml").read_text()


def test_gradient_is_resolved_per_tensor_as_mergekit_does(odd_f32_family: Family, tmp_path: Path) -> None:
    b, (a, c) = odd_f32_family.base, odd_f32_family.finetuned
    cfg = {"merge_method": "task_arithmetic", "base_model": str(b),
           "models": [{"model": str(a)}, {"model": str(c)}], "parameters": {"lambda": [0.0, 1.0]}}
    spec, _ = mk.to_spec(cfg, tmp_path / "o")
    rules = {r["filter"]: r["value"] for r in spec["params"]["lambda"]}
    # 3 layers: t = 0, 0.5, 1; tensors outside the layers sit at t = 0 (mergekit), lm_head included
    assert rules["model.layers.0.mlp.up_proj.weight"] == 0.0
    assert rules["model.layers.1.mlp.up_proj.weight"] == 0.5
    assert rules["model.layers.2.mlp.up_proj.weight"] == 1.0
    assert rules["lm_head.weight"] == 0.0 and rules["model.norm.weight"] == 0.0
    names = [r["filter"] for r in spec["params"]["lambda"]]
    assert names == sorted(names, key=len, reverse=True)  # each tensor's own rule matches first


def test_run_linear_with_base_model_merges_the_base_as_an_input(odd_f32_family: Family, tmp_path: Path) -> None:
    b, (a, _) = odd_f32_family.base, odd_f32_family.finetuned
    cfg = _write(tmp_path, f"""
        merge_method: linear
        base_model: {b}
        models:
          - model: {a}
            parameters: {{weight: 3.0}}
        parameters: {{weight: 1.0}}
        dtype: float32
    """)
    r = run_umerge(["run", cfg, "-o", tmp_path / "out", "--quiet"])
    assert r.returncode == 0, r.stderr
    got, xa, xb = load_checkpoint(tmp_path / "out"), load_checkpoint(a), load_checkpoint(b)
    for n in got:
        np.testing.assert_allclose(got[n], (3 * xa[n].astype(np.float64) + xb[n]) / 4, rtol=1e-6, atol=1e-7)


def test_tokenizer_source_model_copies_its_tokenizer(make_family_at, tmp_path: Path) -> None:
    from umerge.synthetic import TINY, CheckpointSpec

    fam = make_family_at(CheckpointSpec(TINY, dtype="F32", shards=1, seed=2), 1)
    (fam.finetuned[0] / "tokenizer.json").write_text('{"from": "ft"}')
    cfg = _write(tmp_path, f"""
        merge_method: task_arithmetic
        base_model: {fam.base}
        models:
          - model: {fam.finetuned[0]}
        tokenizer_source: {fam.finetuned[0]}
    """)
    r = run_umerge(["run", cfg, "-o", tmp_path / "out", "--quiet"])
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "out" / "tokenizer.json").read_text()) == {"from": "ft"}


def test_configs_of_the_added_methods_become_their_specs(odd_f32_family: Family, tmp_path: Path) -> None:
    b, (a, c) = odd_f32_family.base, odd_f32_family.finetuned
    o = tmp_path / "o"
    # ties normalize: false is passed on (and only then); dare_ties takes it as before
    spec, _ = mk.to_spec({"merge_method": "ties", "base_model": str(b), "models": [{"model": str(a)}],
                          "parameters": {"density": 0.5, "normalize": False}}, o)
    assert spec["params"]["normalize"] is False and spec["params"]["preset"] == "mergekit"
    spec, _ = mk.to_spec({"merge_method": "ties", "base_model": str(b), "models": [{"model": str(a)}],
                          "parameters": {"density": 0.5}}, o)
    assert "normalize" not in spec["params"]
    # model_stock filter_wise, nuslerp's flags, multislerp's options: passed through as flags
    spec, _ = mk.to_spec({"merge_method": "model_stock", "base_model": str(b), "models": [{"model": str(a)},
                          {"model": str(c)}], "parameters": {"filter_wise": True}}, o)
    assert spec["params"] == {"filter_wise": True}
    spec, _ = mk.to_spec({"merge_method": "nuslerp", "base_model": str(b),
                          "models": [{"model": str(b)}, {"model": str(a), "parameters": {"weight": 0.3}},
                                     {"model": str(c), "parameters": {"weight": 0.7}}],
                          "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}}, o)
    assert spec["base"] == str(b) and [m["path"] for m in spec["models"]] == [str(a), str(c)]
    assert spec["params"] == {"nuslerp_flatten": False, "nuslerp_row_wise": True}
    assert [m["params"]["weight"] for m in spec["models"]] == [0.3, 0.7]
    spec, _ = mk.to_spec({"merge_method": "multislerp", "models": [{"model": str(a)}, {"model": str(c)}],
                          "parameters": {"weight": 1.0, "normalize_weights": False, "eps": "1e-6"}}, o)
    assert spec.get("base") is None and spec["params"] == {"weight": 1.0, "normalize_weights": False, "eps": 1e-6}
    # karcher: base_model is one more input, appended when not listed (mergekit's order)
    spec, _ = mk.to_spec({"merge_method": "karcher", "base_model": str(b), "models": [{"model": str(a)},
                          {"model": str(c)}], "parameters": {"max_iter": 5, "tol": 1e-6}}, o)
    assert spec.get("base") is None and [m["path"] for m in spec["models"]] == [str(a), str(c), str(b)]
    assert spec["params"] == {"max_iter": 5, "tol": 1e-6}
    spec, _ = mk.to_spec({"merge_method": "nearswap", "base_model": str(b), "models": [{"model": str(a)}],
                          "parameters": {"t": 0.001}}, o)
    assert spec["base"] == str(b) and spec["params"] == {"t": 0.001}
    # sce: select_topk passed on (a gradient stays one), int8_mask (mask storage only) dropped
    spec, _ = mk.to_spec({"merge_method": "sce", "base_model": str(b), "models": [{"model": str(a)}, {"model": str(c)}],
                          "parameters": {"select_topk": 0.3, "int8_mask": True}}, o)
    assert spec["base"] == str(b) and spec["params"] == {"select_topk": 0.3}
    # arcee_fusion: no parameters; the base listed among the models is the base
    spec, _ = mk.to_spec({"merge_method": "arcee_fusion", "base_model": str(b),
                          "models": [{"model": str(b)}, {"model": str(a)}]}, o)
    assert spec["base"] == str(b) and [m["path"] for m in spec["models"]] == [str(a)] and spec["params"] == {}
    # ram, ramplus_tl: epsilon (per model in della, shared here), r, alpha passed on
    spec, _ = mk.to_spec({"merge_method": "ramplus_tl", "base_model": str(b),
                          "models": [{"model": str(a)}, {"model": str(c)}],
                          "parameters": {"epsilon": 0.001, "r": 0.5, "alpha": 0.3}}, o)
    assert spec["params"] == {"epsilon": 0.001, "r": 0.5, "alpha": 0.3}
    spec, _ = mk.to_spec({"merge_method": "ram", "base_model": str(b), "models": [{"model": str(a)}]}, o)
    assert spec["method"] == "ram" and spec["params"] == {}


BAD_CONFIGS = {
    "unknown top-level key": ("merge_method: ties\nbase_model: {b}\nmodels:\n  - model: {a}\nfoo: 1\n", "'foo'"),
    "unknown model key": ("merge_method: linear\nmodels:\n  - model: {a}\n    weight: 1\n", "'weight'"),
    "unknown parameter": ("merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{wieght: 1}}\n", "wieght"),
    "unsupported method": ("merge_method: bogus\nbase_model: {b}\nmodels:\n  - model: {a}\n", "'bogus'"),
    "breadcrumbs gamma out of range": ("merge_method: breadcrumbs\nbase_model: {b}\nmodels:\n  - model: {a}\n"
                                       "parameters: {{density: 0.5, gamma: 1.5}}\n", "gamma"),
    "breadcrumbs rescale": ("merge_method: breadcrumbs_ties\nbase_model: {b}\nmodels:\n  - model: {a}\n"
                            "parameters: {{density: 0.5, rescale: true}}\n", "rescale"),
    "della epsilon too wide": ("merge_method: della\nbase_model: {b}\nmodels:\n  - model: {a}\n"
                               "parameters: {{density: 0.9, epsilon: 0.2}}\n", "epsilon"),
    "modules": ("merge_method: linear\nmodules: {{x: {{}}}}\nmodels:\n  - model: {a}\n", "modules"),
    "missing slerp t": ("merge_method: slerp\nbase_model: {b}\nmodels:\n  - model: {a}\n", "t"),
    "zero weight sum": ("merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1.0}}\n"
                        "  - model: {c}\n    parameters: {{weight: -1.0}}\n", "sum to 0"),
    "nuslerp with one model": ("merge_method: nuslerp\nbase_model: {b}\nmodels:\n  - model: {a}\n",
                               "nuslerp takes exactly two models besides base_model, got 1"),
    "nearswap without base": ("merge_method: nearswap\nmodels:\n  - model: {a}\nparameters: {{t: 0.1}}\n",
                              "nearswap needs base_model"),
    "nearswap with two models": ("merge_method: nearswap\nbase_model: {b}\nmodels:\n  - model: {a}\n  - model: {c}\n"
                                 "parameters: {{t: 0.1}}\n", "nearswap takes base_model and exactly one other model"),
    "sce without base": ("merge_method: sce\nmodels:\n  - model: {a}\n  - model: {c}\n", "sce needs base_model"),
    "sce select_topk out of range": ("merge_method: sce\nbase_model: {b}\nmodels:\n  - model: {a}\n"
                                     "parameters: {{select_topk: 0}}\n", "select_topk: 0 is outside (0, 1]"),
    "arcee_fusion with two models": ("merge_method: arcee_fusion\nbase_model: {b}\nmodels:\n  - model: {a}\n"
                                     "  - model: {c}\n", "arcee_fusion takes base_model and exactly one other model"),
    "ram per-model epsilon": ("merge_method: ram\nbase_model: {b}\nmodels:\n  - model: {a}\n"
                              "    parameters: {{epsilon: 0.1}}\n  - model: {c}\n    parameters: {{epsilon: 0.2}}\n",
                              "epsilon: is global"),
    "filter_wise not a flag": ("merge_method: model_stock\nbase_model: {b}\nmodels:\n  - model: {a}\n  - model: {c}\n"
                               "parameters: {{filter_wise: [true, false]}}\n", "filter_wise"),
    "karcher max_iter": ("merge_method: karcher\nmodels:\n  - model: {a}\n  - model: {c}\nparameters: {{max_iter: 2.5}}\n",
                         "max_iter"),
    "union tokenizer": ("merge_method: linear\nmodels:\n  - model: {a}\ntokenizer_source: union\n", "union"),
    "layer_range out of bounds": ("merge_method: passthrough\nslices:\n  - sources:\n      - model: {a}\n"
                                  "        layer_range: [1, 4]\n", "goes past the 3 layers"),
    "reversed layer_range": ("merge_method: passthrough\nslices:\n  - sources:\n      - model: {a}\n"
                             "        layer_range: [2, 1]\n", "reversed or empty"),
    "two models in a passthrough slice": ("merge_method: passthrough\nslices:\n  - sources:\n      - model: {a}\n"
                                          "        layer_range: [0, 2]\n      - model: {c}\n        layer_range: [0, 2]\n",
                                          "passthrough copies each tensor from one model"),
    "two models in passthrough models": ("merge_method: passthrough\nmodels:\n  - model: {a}\n  - model: {c}\n",
                                         "passthrough copies one model, got 2"),
    "passthrough with another base": ("merge_method: passthrough\nbase_model: {b}\nmodels:\n  - model: {a}\n",
                                      "is not it"),
    "slice sources of different lengths": ("merge_method: linear\nslices:\n  - sources:\n      - model: {a}\n"
                                           "        layer_range: [0, 2]\n      - model: {c}\n        layer_range: [0, 3]\n",
                                           "the same number of layers"),
    "base missing from a slice": ("merge_method: ties\nbase_model: {b}\nparameters: {{density: 0.5}}\nslices:\n"
                                  "  - sources:\n      - model: {a}\n        layer_range: [0, 3]\n",
                                  "does not list base_model"),
    "passthrough parameter typo": ("merge_method: passthrough\nmodels:\n  - model: {a}\n    parameters: {{scael: 0.5}}\n",
                                   "has no parameter 'scael'"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_one_line_exit_2_no_output(odd_f32_family: Family, tmp_path: Path, case: str) -> None:
    b, (a, c) = odd_f32_family.base, odd_f32_family.finetuned
    text, needle = BAD_CONFIGS[case]
    cfg = tmp_path / "bad.yml"
    cfg.write_text(text.format(a=a, b=b, c=c))
    r = run_umerge(["run", cfg, "-o", tmp_path / "out"])
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("umerge: error: ") and needle in lines[0], r.stderr
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name not in ("bad.yml",)]  # no temporary left either


@pytest.mark.parametrize(("args", "needle"), [
    (["linear", "{a}", "{c}", "--weight", "1", "--weight", "-1"], "sum to 0"),
    (["magnitude_prune", "{a}", "{c}", "--base", "{b}"], "--density"),
    (["dare_ties", "{a}", "--base", "{b}", "--density", "0"], "density"),
    (["breadcrumbs", "{a}", "--base", "{b}", "--density", "0.5", "--gamma", "1"], "gamma"),
    (["della_linear", "{a}", "--base", "{b}", "--density", "0.1", "--epsilon", "0.1"], "epsilon"),
    (["della", "{a}", "{c}", "--density", "0.5"], "base"),
    (["slerp", "{a}", "--base", "{b}"], "--t"),
    (["task_arithmetic", "{a}"], "base"),
    (["model_stock", "{a}", "--base", "{b}"], "at least 2"),
    (["nuslerp", "{a}", "--base", "{b}"], "takes 2 values"),
    (["nearswap", "{a}", "--t", "0.1"], "base"),
    (["nearswap", "{a}", "--base", "{b}", "--t", "-1"], "t: -1 is negative"),
    (["multislerp", "{a}", "{c}", "--weight", "1", "--weight", "-1"], "sum to 0"),
    (["multislerp", "{a}", "{c}", "--eps", "0"], "eps: 0 is not positive"),
    (["karcher", "{a}", "{c}", "--tol", "-1"], "tol"),
])
def test_method_commands_refuse_bad_arguments(odd_f32_family: Family, tmp_path: Path, args: list[str],
                                              needle: str) -> None:
    b, (a, c) = odd_f32_family.base, odd_f32_family.finetuned
    r = run_umerge([x.format(a=a, b=b, c=c) for x in args] + ["-o", tmp_path / "out"])
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith(("umerge: error: ", "Error: ")) or "umerge: error" in r.stderr, r.stderr
    assert needle in r.stderr
    assert not (tmp_path / "out").exists()


def test_methods_command_lists_every_method() -> None:
    r = run_umerge(["methods"])
    assert r.returncode == 0, r.stderr
    for m in ["ties", "linear", "task_arithmetic", "magnitude_prune", "dare_linear", "dare_ties", "breadcrumbs",
              "breadcrumbs_ties", "della", "della_linear", "slerp", "model_stock", "nuslerp", "multislerp", "karcher",
              "nearswap", "sce", "arcee_fusion", "ram", "ramplus_tl"]:
        assert m in r.stdout.split()
    info = {m["name"]: m for m in json.loads(run_umerge(["methods", "--json"]).stdout)}
    assert {p["name"] for p in info["dare_ties"]["params"]} >= {"density", "weight", "seed", "rescale"}
    assert {p["name"] for p in info["della"]["params"]} >= {"density", "epsilon", "weight", "seed", "rescale"}
    assert next(p for p in info["breadcrumbs"]["params"] if p["name"] == "gamma")["default"] == "0.01"
    assert next(p for p in info["slerp"]["params"] if p["name"] == "t")["default"] == "required"
    assert info["linear"]["base"] == "unused" and info["ties"]["base"] == "required"
    assert info["nuslerp"]["base"] == "optional" and info["karcher"]["base"] == "unused"
    assert {p["name"] for p in info["nuslerp"]["params"]} == {"weight", "nuslerp_flatten", "nuslerp_row_wise"}
    assert next(p for p in info["model_stock"]["params"] if p["name"] == "filter_wise")["default"] == "false"
    assert [p["name"] for p in info["sce"]["params"]] == ["select_topk"] and info["sce"]["base"] == "required"
    assert info["arcee_fusion"]["params"] == [] and info["arcee_fusion"]["base"] == "required"
    assert [p["name"] for p in info["ramplus_tl"]["params"]] == ["r", "alpha", "epsilon"]


def test_translate_rejects_non_mapping(tmp_path: Path) -> None:
    p = tmp_path / "x.yml"
    p.write_text("- a\n- b\n")
    with pytest.raises(InputError, match="mapping"):
        mk.load_config(p)


def test_the_method_table_is_mergekits(peers: Path) -> None:
    """Every merge method mergekit 0.1.5 registers is one `umerge run` takes, with mergekit's own
    parameter names (passthrough, which merges nothing, is the one not taken here), and
    MERGEKIT_PARAMS is the union of them all."""
    code = ("import json; from mergekit.merge_methods.registry import registered_methods; "
            "print(json.dumps({m.spec.name: [p.name for p in m.spec.parameters] for m in registered_methods()}))")
    proc = subprocess.run([str(peers / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    theirs = {name: set(params) for name, params in json.loads(proc.stdout).items()}
    assert set(theirs) - set(mk.METHOD_PARAMS) <= {"passthrough"}, sorted(set(theirs) - set(mk.METHOD_PARAMS))
    for name, params in mk.METHOD_PARAMS.items():
        assert params == theirs[name], name
    assert mk.MERGEKIT_PARAMS == set().union(*theirs.values())
