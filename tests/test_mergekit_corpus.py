"""mergekit's own configs, unchanged, through `umerge run` and mergekit 0.1.5: the corpus.

Two sources, both from mergekit's repository: the six configs of its ``examples/`` directory, and
every merge configuration its test suite builds (``tests/test_basic_merges.py``; the tokenizer and
chat-template configs are `test_mergekit_tokenizer.py`'s). The hub ids of the examples and the
models of the tests are pointed at stand-ins of the same architectures, built here with
transformers from small configs (Llama with 2 and with 40 layers, Mistral, Granite, GPT-2, LLaVA):
the examples' fine-tunes are their base plus noise, the tests' models independent random inits (as
mergekit's tests make them). Every config runs through mergekit's `run_merge` (what `mergekit-yaml`
calls, one peer-venv process for all) and through `umerge run`, with the configs' ``dtype`` set to
float32 so the comparison is of float32 arithmetic (umerge's arithmetic is float32 whatever the
dtype; `test_mergekit_compat.py` compares the configs' own bf16/f16 dtypes).

What must agree: the same tensor names, shapes and dtypes and the same config.json (layer counts
of stacked slices included); the values as `test_methods_parity.py` holds each method to, on the
same grounds (bit-identical for copies and element-wise methods without a trim, 1 ulp on 99.9% of
the elements where magnitude ties may break differently, 8 ulp of the scale where umerge's
per-tensor coefficients come from float64 sums, 4 for sce, arcee_fusion's threshold rule). The
random methods (dare_ties, della) draw different masks from mergekit's by design: there the check
is that each output element is what the method allows (the base plus a rescaled subset of the
task vectors' entries is tested by `test_methods_random.py`; here: finite, and the same tensors).
A config mergekit refuses (della with epsilon past its bound) must be refused by umerge too, in one
line, exit 2, nothing written.
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import reference_merge as ref
from conftest import run_umerge
from mergekit_runner import run_mergekit
from test_methods_parity import ARCEE_FUSION, SCE_ULPS, _check_arcee_fusion
from umerge.safetensors_io import load_checkpoint

torch = pytest.importorskip("torch", reason="the stand-ins are built with transformers (the train extra)")
transformers = pytest.importorskip("transformers")

# --- stand-ins -------------------------------------------------------------------------------------------

def _save(model: object, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)  # type: ignore[attr-defined]
    return path


def _llama(layers: int, vocab: int = 64) -> object:
    return transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                    num_key_value_heads=4, num_hidden_layers=layers)


def _build(kind: str, path: Path, seed: int, base: Path | None = None) -> Path:
    """A stand-in of architecture `kind`; with `base`, that model plus N(0, 0.01) noise (a "fine-tune")."""
    torch.manual_seed(seed)
    if kind == "llama2":
        model = transformers.LlamaForCausalLM(_llama(2))
    elif kind == "llama40":
        model = transformers.LlamaForCausalLM(_llama(40))
    elif kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=3))
    elif kind == "granite":
        model = transformers.GraniteForCausalLM(transformers.GraniteConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=2,
            num_hidden_layers=2))
    elif kind == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=32, n_head=4, n_layer=12, n_positions=64, n_ctx=64, vocab_size=64))
    elif kind == "llava":
        model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
            vision_config=transformers.CLIPVisionConfig(image_size=32, patch_size=4, num_hidden_layers=2,
                                                        num_attention_heads=2, hidden_size=64, intermediate_size=128),
            text_config=_llama(2), image_seq_length=16))
    else:
        raise ValueError(kind)
    if base is not None:
        ref = type(model).from_pretrained(base)  # type: ignore[attr-defined]
        with torch.no_grad():
            for (_, p), (_, q) in zip(model.state_dict().items(), ref.state_dict().items()):
                p.copy_(q + 0.01 * torch.randn_like(q))
    return _save(model, path)


#: The examples' hub ids -> (stand-in architecture, role): the base of each family first.
EXAMPLE_MODELS = {
    "TheBloke/Llama-2-13B-fp16": ("llama40", None),
    "psmathur/orca_mini_v3_13b": ("llama40", "TheBloke/Llama-2-13B-fp16"),
    "garage-bAInd/Platypus2-13B": ("llama40", "TheBloke/Llama-2-13B-fp16"),
    "WizardLM/WizardLM-13B-V1.2": ("llama40", "TheBloke/Llama-2-13B-fp16"),
    "WizardLM/WizardMath-13B-V1.0": ("llama40", "TheBloke/Llama-2-13B-fp16"),
    "mistralai/Mistral-7B-v0.1": ("mistral", None),
    "mistralai/Mistral-7B-Instruct-v0.2": ("mistral", "mistralai/Mistral-7B-v0.1"),
    "BioMistral/BioMistral-7B": ("mistral", "mistralai/Mistral-7B-v0.1"),
    "model_a": ("llama2", None),
    "model_b": ("llama2", "model_a"),
}
#: The test suite's fixtures -> architecture (independent random inits, as its tests make them).
TEST_MODELS = {"model_a": "llama2", "model_b": "llama2", "model_c": "llama2", "granite_a": "granite",
               "granite_b": "granite", "gpt2_like": "gpt2", "vlm_a": "llava", "vlm_b": "llava", "vlm_c": "llava"}


# --- the corpus ------------------------------------------------------------------------------------------

#: mergekit's examples/, as written (each `model:` hub id is replaced by its stand-in's path).
EXAMPLES = {
    "example_arcee_fusion": """
        models:
          - model: model_a
          - model: model_b
        merge_method: arcee_fusion
        base_model: model_a
        dtype: bfloat16
    """,
    "example_bio_merge": """
        models:
          - model: mistralai/Mistral-7B-Instruct-v0.2
            parameters:
              density: 0.5
              weight: 0.5
          - model: BioMistral/BioMistral-7B
            parameters:
              density: 0.5
              weight: 0.5
        merge_method: ties
        base_model: mistralai/Mistral-7B-v0.1
        parameters:
          normalize: false
          int8_mask: true
        dtype: float16
    """,
    "example_gradient_slerp": """
        slices:
          - sources:
              - model: psmathur/orca_mini_v3_13b
                layer_range: [0, 40]
              - model: garage-bAInd/Platypus2-13B
                layer_range: [0, 40]
        merge_method: slerp
        base_model: psmathur/orca_mini_v3_13b
        parameters:
          t:
            - filter: self_attn
              value: [0, 0.5, 0.3, 0.7, 1]
            - filter: mlp
              value: [1, 0.5, 0.7, 0.3, 0]
            - value: 0.5 # fallback for rest of tensors
        dtype: float16
    """,
    "example_linear": """
        models:
          - model: psmathur/orca_mini_v3_13b
            parameters:
              weight: 1.0
          - model: WizardLM/WizardLM-13B-V1.2
            parameters:
              weight: 0.3
          - model: garage-bAInd/Platypus2-13B
            parameters:
              weight: 0.5
        merge_method: linear
        dtype: float16
    """,
    "example_orcamini_platy_44layer": """
        slices:
          - sources:
            - model: psmathur/orca_mini_v3_13b
              layer_range: [0, 24]
          - sources:
            - model: garage-bAInd/Platypus2-13B
              layer_range: [20, 40]
        merge_method: passthrough
        dtype: float16
    """,
    "example_ties": """
        models:
          - model: psmathur/orca_mini_v3_13b
            parameters:
              density: [1, 0.7, 0.1] # density gradient
              weight: 1.0
          - model: garage-bAInd/Platypus2-13B
            parameters:
              density: 0.5
              weight: [0, 0.3, 0.7, 1] # weight gradient
          - model: WizardLM/WizardMath-13B-V1.0
            parameters:
              density: 0.33
              weight:
                - filter: mlp
                  value: 0.5
                - value: 0
        merge_method: ties
        base_model: TheBloke/Llama-2-13B-fp16
        parameters:
          normalize: true
          int8_mask: true
        dtype: float16
    """,
}


def _two(a: str, b: str, method: str, base: str | None = None, params: dict[str, object] | None = None,
         weights: tuple[float, float] = (0.6, 0.4)) -> str:
    """test_basic_merges.py's `two_model_config`: weights 0.6 / 0.4, bfloat16."""
    doc: dict[str, object] = {"merge_method": method,
                              "models": [{"model": f"<{a}>", "parameters": {"weight": weights[0]}},
                                         {"model": f"<{b}>", "parameters": {"weight": weights[1]}}],
                              "dtype": "bfloat16"}
    if base:
        doc["base_model"] = f"<{base}>"
    if params:
        doc["parameters"] = params
    return json.dumps(doc)  # JSON is YAML


def _test_suite() -> dict[str, str]:
    """Every merge configuration of mergekit's tests/test_basic_merges.py, by test name."""
    cases: dict[str, str] = {
        "granite_copy": json.dumps({"merge_method": "passthrough", "models": [{"model": "<granite_a>"}],
                                    "dtype": "bfloat16"}),
        "granite_linear_merge": json.dumps({
            "merge_method": "linear", "dtype": "bfloat16",
            "models": [{"model": "<granite_a>", "parameters": {"weight": 0.6}},
                       {"model": "<granite_b>", "parameters": {"weight": 0.4}}]}),
        "granite_slerp": json.dumps({"merge_method": "slerp", "base_model": "<granite_a>",
                                     "models": [{"model": "<granite_a>"}, {"model": "<granite_b>"}],
                                     "parameters": {"t": 0.5}, "dtype": "bfloat16"}),
        "gpt2_copy": json.dumps({"merge_method": "passthrough", "models": [{"model": "<gpt2_like>"}],
                                 "dtype": "bfloat16"}),
        "gpt2_stack": json.dumps({"merge_method": "passthrough", "dtype": "bfloat16",
                                  "slices": [{"sources": [{"model": "<gpt2_like>", "layer_range": [0, 12]}]}] * 2}),
        "passthrough_scale": json.dumps({"merge_method": "passthrough", "models": [{
            "model": "<model_a>", "parameters": {"scale": [{"filter": "o_proj", "value": 0}, {"value": 1}]}}]}),
    }
    for prefix, (a, b, c) in (("", ("model_a", "model_b", "model_c")), ("VLM_", ("vlm_a", "vlm_b", "vlm_c"))):
        if not prefix:
            cases.update({
                "sce_merge": _two(a, b, "sce", c, {"select_topk": 0.5}),
                "ram_merge": _two(a, b, "ram", c),
                "ramplus_tl_merge": _two(a, b, "ramplus_tl", c, {"r": 0.05, "alpha": 1.0}),
                "multislerp_merge": _two(a, b, "multislerp", c),
                "arcee_fusion_merge": _two(a, b, "arcee_fusion", a),
                "nearswap_merge": _two(a, b, "nearswap", a, {"t": 0.0001}),
                "della_merge": _two(a, b, "della", c, {"density": 0.66, "epsilon": 0.05, "lambda": 0.5}),
                "della_invalid_epsilon": _two(a, b, "della", c, {"density": 0.66, "epsilon": 1.35, "lambda": 0.5}),
                "karcher_merge": _two(a, b, "karcher", c, {"max_iter": 5, "tol": 1e-5}),
            })
        cases.update({
            f"linear_{prefix}merge": _two(a, b, "linear"),
            f"slerp_{prefix}merge": _two(a, b, "slerp", a, {"t": 0.35}),
            f"task_arithmetic_{prefix}merge": _two(a, b, "task_arithmetic", c),
            f"breadcrumbs_{prefix}merge": _two(a, b, "breadcrumbs", c),
            f"ties_{prefix}merge": _two(a, b, "ties", c, {"density": 0.3}),
            f"dare_ties_{prefix}merge": _two(a, b, "dare_ties", c, {"density": 0.66}),
            f"model_stock_{prefix}merge": _two(b, c, "model_stock", a),
            f"model_stock_filterwise_{prefix}merge": _two(b, c, "model_stock", a, {"filter_wise": True}),
            f"nuslerp_{prefix}weights_sum_to_zero": _two(a, b, "nuslerp", c, {"nuslerp_row_wise": False,
                                                                                "nuslerp_flatten": False},
                                                          weights=(-0.5, 0.5)),
        })
        for base in (None, c):
            for row_wise in (False, True):
                for flatten in (False, True):
                    name = f"nuslerp_{prefix}{'base' if base else 'nobase'}_row{int(row_wise)}_flat{int(flatten)}"
                    cases[name] = _two(a, b, "nuslerp", base, {"nuslerp_row_wise": row_wise,
                                                                "nuslerp_flatten": flatten})
    return cases


TESTS = _test_suite()
CORPUS = {**EXAMPLES, **{f"test_{k}": v for k, v in TESTS.items()}}
#: mergekit refuses these; so must umerge.
REFUSED = {"test_della_invalid_epsilon"}


@dataclass(frozen=True)
class Case:
    config: Path
    theirs: Path
    method: str


def _as_float32(text: str) -> str:
    """The config with its dtype set to float32 (the comparison is of float32 arithmetic)."""
    text = textwrap.dedent(text).strip()
    if text.startswith("{"):  # a test-suite config (JSON)
        return json.dumps({**json.loads(text), "dtype": "float32"})
    return re.sub(r"^dtype: \w+", "dtype: float32", text, flags=re.M) + "\n"


@pytest.fixture(scope="module")
def corpus(peers: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    root = tmp_path_factory.mktemp("mk_corpus")
    paths: dict[str, Path] = {}
    for i, (hub_id, (kind, base)) in enumerate(EXAMPLE_MODELS.items()):
        paths[hub_id] = _build(kind, root / "examples" / re.sub(r"\W", "_", hub_id), 100 + i,
                               paths[base] if base else None)
    for i, (name, kind) in enumerate(TEST_MODELS.items()):
        paths[f"test:{name}"] = _build(kind, root / "tests" / name, 200 + i)
    texts, cases = {}, {}
    for name, text in CORPUS.items():
        names = {k: str(v) for k, v in paths.items() if not k.startswith("test:")} if name.startswith("example_") \
            else {k[5:]: str(v) for k, v in paths.items() if k.startswith("test:")}
        if name.startswith("example_"):
            body = re.sub(r"(?<=model: )(\S+)", lambda m, names=names: names[m.group(1)], _as_float32(text))
        else:
            body = re.sub(r"<([^<>]+)>", lambda m, names=names: names[m.group(1)], _as_float32(text))
        texts[name] = body
    outputs, refused = run_mergekit(peers, root, texts, record_refusals=True, timeout=1500)
    for name, theirs in outputs.items():
        cfg = root / f"{name}.yml"
        cases[name] = Case(cfg, theirs, str(_yaml(cfg)["merge_method"]))
    assert refused == REFUSED, f"mergekit refused {sorted(refused)}, expected {sorted(REFUSED)}"
    return cases


def _yaml(path: Path) -> dict[str, object]:
    import yaml

    return yaml.safe_load(path.read_text())


BIT_EXACT_METHODS = {"passthrough", "nearswap", "ram", "ramplus_tl"}
COEFFICIENT_METHODS = {"slerp", "model_stock", "nuslerp", "multislerp", "karcher"}
RANDOM_METHODS = {"dare_ties", "dare_linear", "della", "della_linear"}


def _comparison(case: Case) -> Callable[[str, np.ndarray, np.ndarray], None]:
    """How element values are held to mergekit's for this case's method (see the module docs)."""
    cfg = _yaml(case.config)
    params = cfg.get("parameters") or {}
    method = case.method
    if method in BIT_EXACT_METHODS or (method == "ties" and isinstance(params, dict)
                                       and params.get("normalize") is False):
        def exact(name: str, a: np.ndarray, b: np.ndarray) -> None:
            assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), f"{name}: not bit-identical"
        return exact
    if method in COEFFICIENT_METHODS or method == "sce":
        ulps = SCE_ULPS if method == "sce" else 8

        def scaled(name: str, a: np.ndarray, b: np.ndarray) -> None:
            diff = np.abs(a.astype(np.float64) - b)
            ulp = np.spacing(np.float32(np.abs(b).max()))
            if method == "nuslerp" and diff.max() > ulps * ulp:
                # On LLaVA's patch embedding (rows of 4 elements) mergekit's float32 angles are up to
                # 14 ulp of the scale from the float64 reference (measured); there umerge must be
                # closer to that reference than mergekit is, and no further from mergekit than 2 ulp
                # beyond mergekit's own error.
                exact = _nuslerp_reference(case, name)
                err_ours, err_theirs = np.abs(a - exact).max(), np.abs(b - exact).max()
                print(f"{name}: {err_ours / ulp:.2f} ulp from float64 (mergekit: {err_theirs / ulp:.2f})")
                assert err_ours < err_theirs, f"{name}: further from the float64 reference than mergekit"
                assert diff.max() <= err_theirs + 2 * ulp, f"{name}: further from mergekit than its own error"
                return
            ok = diff <= ulps * ulp
            assert ok.all(), f"{name}: {int((~ok).sum())} elements off by more than {ulps} ulp of the scale"
        return scaled
    if method == "arcee_fusion":
        assert "arcee_fusion" in ARCEE_FUSION

        def fusion(name: str, a: np.ndarray, b: np.ndarray) -> None:
            _check_arcee_fusion(case.config, name, a, b)
        return fusion
    if method in RANDOM_METHODS:
        def finite(name: str, a: np.ndarray, b: np.ndarray) -> None:
            assert np.isfinite(a).all(), f"{name}: non-finite output"
        return finite

    def one_ulp(name: str, a: np.ndarray, b: np.ndarray) -> None:
        ok = np.abs(a.astype(np.float64) - b) <= np.spacing(np.abs(b))
        assert ok.mean() >= 0.999, f"{name}: only {ok.mean():.4%} within 1 ulp"
    return one_ulp


def _nuslerp_reference(case: Case, name: str) -> np.ndarray:
    cfg = _yaml(case.config)
    models = cfg["models"]
    params = cfg.get("parameters") or {}
    x0, x1 = (load_checkpoint(m["model"])[name] for m in models)
    base = load_checkpoint(cfg["base_model"])[name] if cfg.get("base_model") else None
    return ref.nuslerp(x0, x1, [m["parameters"]["weight"] for m in models], base,
                       flatten=params.get("nuslerp_flatten", True), row_wise=params.get("nuslerp_row_wise", False))


def _config_json(path: Path) -> dict[str, object]:
    c = json.loads((path / "config.json").read_text())
    # Fields that only say which program wrote the file.
    for k in ("transformers_version", "_name_or_path"):
        c.pop(k, None)
    return c


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CORPUS))
def test_mergekit_config_runs_unchanged_and_matches_mergekit(name: str, corpus: dict[str, Case],
                                                             tmp_path: Path) -> None:
    case = corpus[name]
    out = tmp_path / "out"
    result = run_umerge(["run", case.config, "-o", out, "--quiet"], timeout=300)
    if name in REFUSED:
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not out.exists() and list(tmp_path.iterdir()) == []
        return
    assert result.returncode == 0, result.stderr
    ours, theirs = load_checkpoint(out), load_checkpoint(case.theirs)
    compare = _comparison(case)
    if "VLM" in name:
        theirs = _vlm_names(theirs, ours, case)
    assert sorted(ours) == sorted(theirs)
    for t, b in theirs.items():
        a = ours[t]
        assert a.shape == b.shape and a.dtype == b.dtype == np.float32, t
        compare(t, a, b)
    if "VLM" not in name:
        assert _config_json(out) == _config_json(case.theirs)


def _vlm_names(theirs: dict[str, np.ndarray], ours: dict[str, np.ndarray], case: Case) -> dict[str, np.ndarray]:
    """mergekit's LLaVA output, under the input's tensor names, checked for what mergekit leaves out.

    transformers 5 saves LLaVA under its checkpoint names (``language_model.model.layers...``,
    ``vision_tower...``); mergekit 0.1.5 writes the vision tower and projector under ``model.``-prefixed
    names and leaves the whole language model out (measured: 43 of the 64 tensors), so its output
    has no text model. umerge keeps every tensor under its own name: compared here are the tensors
    mergekit wrote, and the rest must load, with the others, into the architecture without a missing
    or unexpected key.
    """
    renamed = {(n[len("model."):] if n.startswith("model.") and n not in ours else n): v for n, v in theirs.items()}
    missing = set(ours) - set(renamed)
    assert missing and all(n.startswith("language_model.") for n in missing), sorted(missing)[:5]
    model, info = transformers.LlavaForConditionalGeneration.from_pretrained(
        case.config.parent / "tests" / "vlm_a", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        from safetensors.numpy import save_file

        merged = case.config.parent / f"ours_{case.config.stem}"
        merged.mkdir(exist_ok=True)
        save_file(ours, str(merged / "model.safetensors"))
        (merged / "config.json").write_text((case.config.parent / "tests" / "vlm_a" / "config.json").read_text())
        _, info = transformers.LlavaForConditionalGeneration.from_pretrained(merged, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return {**renamed, **{n: ours[n] for n in missing}}
