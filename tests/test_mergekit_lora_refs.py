"""mergekit's ``model+lora`` references, folded inside the merge: no merged copy written.

mergekit 0.1.5 loads ``MODEL+ADAPTER`` with transformers and PEFT, `merge_and_unload`s it, saves the
merged model in its LoRA cache and merges that copy. umerge folds ``W + scaling * B @ A`` as the
merge reads each targeted weight (`umerge.fold.FoldedSource`, the spec's ``lora``). Checked here on
tiny float32 Llama checkpoints with random PEFT adapters (B non-zero):

- against mergekit itself (the same YAML): within 1 ulp of each tensor's scale. Measured: every
  tensor bit-identical (the rank-8 products are summed in the same order by torch's matmul and
  the engine's sgemm here; another BLAS could order them differently, hence the ulp);
- against an independent float64 computation (numpy: the fold, then the method's formula): within
  4 ulp of each tensor's scale (measured: at most 3.3, task arithmetic over a folded base, the
  same as mergekit's), and never more than 1 ulp less accurate than mergekit;
- as a model, as base_model, and as a slice's source of a passthrough (the copy path);
- that the run writes nothing besides its output (TMPDIR and the working directory stay empty);
- bad references: one line, exit 2, nothing written.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest

from adapters_support import make_adapter, save_base, torch, transformers
from conftest import run_umerge
from mergekit_runner import run_mergekit
from umerge.safetensors_io import load_checkpoint

R, ALPHA = 8, 16.0

def _finetune(base: Path, out: Path, seed: int) -> Path:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), torch_dtype=torch.float32)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora_refs")
    base = save_base("llama", root / "base")
    ft1, ft2 = _finetune(base, root / "ft1", 1), _finetune(base, root / "ft2", 2)
    return {"base": base, "ft1": ft1, "ft2": ft2,
            "lora1": make_adapter(ft1, root / "lora1", R, ALPHA, seed=3),
            "lora_base": make_adapter(base, root / "lora_base", R, ALPHA, seed=4, targets=["q_proj", "down_proj"])}


def _configs(f: dict[str, Path]) -> dict[str, str]:
    return {
        "linear": f"""
            merge_method: linear
            models:
              - model: {f['ft1']}+{f['lora1']}
                parameters: {{weight: 0.7}}
              - model: {f['ft2']}
                parameters: {{weight: 0.3}}
            dtype: float32
        """,
        "task_arithmetic_base": f"""
            merge_method: task_arithmetic
            base_model: {f['base']}+{f['lora_base']}
            models:
              - model: {f['ft1']}+{f['lora1']}
                parameters: {{weight: 0.5}}
              - model: {f['ft2']}
                parameters: {{weight: 0.8}}
            dtype: float32
        """,
        "passthrough_slices": f"""
            merge_method: passthrough
            slices:
              - sources:
                  - model: {f['ft1']}+{f['lora1']}
                    layer_range: [0, 2]
              - sources:
                  - model: {f['ft2']}
                    layer_range: [1, 2]
            dtype: float32
        """,
    }


def _folded(model: Path, adapter: Path | None) -> dict[str, np.ndarray]:
    """float64 W + (alpha / r) B @ A, by hand from the adapter's file."""
    w = {k: v.astype(np.float64) for k, v in load_checkpoint(model).items()}
    if adapter is None:
        return w
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / cfg["r"]
    ad = load_checkpoint(adapter / "adapter_model.safetensors")
    for k, a in ad.items():
        if ".lora_A." in k:
            module = k.removeprefix("base_model.model.").replace(".lora_A.weight", "")
            b = ad[k.replace(".lora_A.", ".lora_B.")]
            w[f"{module}.weight"] = w[f"{module}.weight"] + s * (b.astype(np.float64) @ a.astype(np.float64))
    return w


def _reference(case: str, f: dict[str, Path], lora: bool = True) -> dict[str, np.ndarray]:
    """The case's merge in float64, with the adapters folded in (or, `lora=False`, without them)."""
    m1, m2 = _folded(f["ft1"], f["lora1"] if lora else None), _folded(f["ft2"], None)
    if case == "linear":
        return {k: 0.7 * m1[k] + 0.3 * m2[k] for k in m1}
    if case == "task_arithmetic_base":
        b = _folded(f["base"], f["lora_base"] if lora else None)
        return {k: b[k] + 0.5 * (m1[k] - b[k]) + 0.8 * (m2[k] - b[k]) for k in b}
    out = {k: v for k, v in m1.items()}  # layers 0, 1 of ft1+lora1, then layer 1 of ft2 as layer 2
    for k, v in m2.items():
        if k.startswith("model.layers.1."):
            out[k.replace("model.layers.1.", "model.layers.2.")] = v
        elif "layers" not in k and k not in ("model.embed_tokens.weight",):
            out[k] = v  # final norm and lm_head from the last slice
    return out


@pytest.fixture(scope="module")
def mergekit_outputs(peers: Path, family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mk_lora_refs")
    cache = root / "lora_cache"
    outputs, _ = run_mergekit(peers, root, _configs(family), lora_merge_cache=cache)
    assert any(cache.iterdir()), "mergekit is expected to write merged copies into its LoRA cache"
    return outputs


def _run_clean(cfg: Path, out: Path, tmp_path: Path) -> None:
    """`umerge run` with an empty TMPDIR and working directory, which must stay empty."""
    scratch, cwd = tmp_path / "tmpdir", tmp_path / "cwd"
    scratch.mkdir()
    cwd.mkdir()
    result = run_umerge(["run", cfg, "-o", out, "--quiet"], cwd=cwd, env={"TMPDIR": str(scratch)})
    assert result.returncode == 0, result.stderr
    assert list(scratch.iterdir()) == [] and list(cwd.iterdir()) == [], "umerge wrote something besides its output"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["linear", "task_arithmetic_base", "passthrough_slices"])
def test_lora_reference_is_folded_in_the_merge(case: str, family: dict[str, Path], mergekit_outputs: dict[str, Path],
                                               tmp_path: Path) -> None:
    theirs_dir = mergekit_outputs[case]
    out = tmp_path / "out"
    _run_clean(theirs_dir.parent / f"{case}.yml", out, tmp_path)
    ours, theirs = load_checkpoint(out), load_checkpoint(theirs_dir)
    exact = _reference(case, family)
    assert sorted(ours) == sorted(theirs) == sorted(exact)
    touched = identical = 0
    for name, b in theirs.items():
        a = ours[name]
        assert a.dtype == np.float32 and a.shape == b.shape, name
        scale = np.spacing(np.float32(np.abs(exact[name]).max()))
        err_ours, err_theirs = np.abs(a - exact[name]).max(), np.abs(b - exact[name]).max()
        assert np.abs(a.astype(np.float64) - b).max() <= scale, f"{case} {name}: over 1 ulp of the scale from mergekit"
        assert err_ours <= err_theirs + scale, f"{case} {name}: less accurate than mergekit by over 1 ulp"
        assert err_ours <= 4 * scale, f"{case} {name}: {err_ours / scale:.2f} ulp of the scale from float64"
        identical += int(np.array_equal(a.view(np.uint32), b.view(np.uint32)))
        touched += ".self_attn." in name or ".mlp." in name
    assert touched
    print(f"\n{case}: {identical} of {len(theirs)} tensors bit-identical to mergekit's")
    # The adapter must have changed the result: without it the merge differs.
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not np.allclose(exact[name], _reference(case, family, lora=False)[name])


def test_spec_carries_the_adapter_beside_its_model(family: dict[str, Path], tmp_path: Path) -> None:
    cfg = tmp_path / "c.yml"
    cfg.write_text(textwrap.dedent(_configs(family)["task_arithmetic_base"]))
    result = run_umerge(["run", cfg, "-o", tmp_path / "out", "--print-spec"])
    assert result.returncode == 0, result.stderr
    spec = json.loads(result.stdout)
    assert spec["base"] == str(family["base"])
    assert spec["base_lora"]["path"].startswith(str(family["lora_base"]))
    assert spec["base_lora"]["scaling"] == ALPHA / R
    assert spec["models"][0]["path"] == str(family["ft1"]) and "lora" in spec["models"][0]
    assert "lora" not in spec["models"][1]
    assert not (tmp_path / "out").exists()


def _bad_adapter_dora(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("what, needle", [
    ("missing", "no such LoRA adapter directory"),
    ("three_parts", "MODEL+ADAPTER"),
    ("wrong_base", "does not fit"),
    ("dora", "DoRA"),
])
def test_bad_lora_reference_is_one_line_exit_2_nothing_written(what: str, needle: str, family: dict[str, Path],
                                                               tmp_path: Path) -> None:
    ref = {
        "missing": f"{family['ft1']}+{tmp_path / 'nope'}",
        "three_parts": f"{family['ft1']}+{family['lora1']}+{family['lora1']}",
        "wrong_base": f"{tmp_path / 'small'}+{family['lora1']}",
        "dora": f"{family['ft1']}+{tmp_path / 'dora'}",
    }[what]
    if what == "wrong_base":  # a model whose q_proj has another shape than the adapter's base
        cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
        transformers.LlamaForCausalLM(cfg).save_pretrained(str(tmp_path / "small"))
    if what == "dora":
        _bad_adapter_dora(family["lora1"], tmp_path / "dora")
    cfg_path = tmp_path / "c.yml"
    cfg_path.write_text(f"merge_method: linear\nmodels:\n  - model: {ref}\n  - model: {family['ft2']}\ndtype: float32\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run_umerge(["run", cfg_path, "-o", tmp_path / "out", "--quiet"])
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert needle in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_directory_named_with_a_plus_is_taken_literally(family: dict[str, Path], tmp_path: Path) -> None:
    plus = tmp_path / "ft1+v2"
    os.symlink(family["ft1"], plus)
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {plus}\n  - model: {family['ft2']}\ndtype: float32\n")
    result = run_umerge(["run", cfg, "-o", tmp_path / "out", "--print-spec"])
    assert result.returncode == 0, result.stderr
    spec = json.loads(result.stdout)
    assert spec["models"][0] == {"path": str(plus)} or spec["models"][0]["path"] == str(plus)
    assert "lora" not in spec["models"][0]
