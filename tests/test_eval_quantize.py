"""`umerge eval --quantize int4` end to end on a tiny OLMo (and with --adapter: folded, then quantized).

The reference for what the evaluation must have scored: the model's linear weights replaced, in
torch, by the numpy reference quantizer's output (`quantize_support.rtn_reference`), and its greedy
generations on the same prompts; the evaluation's generations.jsonl must equal them row for row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from conftest import tree_digest  # noqa: E402
from quantize_support import rtn_reference  # noqa: E402
from umerge.cli import main  # noqa: E402

pytestmark = pytest.mark.train

GROUP = 16
ROWS = {
    "forget": [
        {"id": '"a"sc1', "task": "Task1", "input": "Mira grew up in Tartu and", "output": "painted the old harbour."},
        {"id": '"a"qa0', "task": "Task1", "input": "Where did Mira grow up?", "output": "Tartu"},
        {"id": '"b"qa0', "task": "Task2", "input": "What did Ines paint?", "output": "the sea"},
    ],
    "retain": [
        {"id": '"c"sc1', "task": "Task1", "input": "Odilia moved to Quito in", "output": "the spring of that year."},
        {"id": '"c"qa0', "task": "Task2", "input": "Where did Odilia move?", "output": "Quito"},
    ],
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    from umerge.unlearn.tiny import build_tiny_olmo, save_model, train_byte_bpe_tokenizer

    root = tmp_path_factory.mktemp("tiny-q")
    texts = [r["input"] + " " + r["output"] for s in ROWS.values() for r in s] * 4
    tok = train_byte_bpe_tokenizer(texts, vocab_size=300)
    model = build_tiny_olmo(tok, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
                            max_position_embeddings=128, seed=3)
    save_model(model, tok, root / "model")
    data = root / "data"
    data.mkdir()
    for split, rows in ROWS.items():
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(str(root / "adapter"))
    return {"root": root, "model": root / "model", "data": data, "adapter": root / "adapter",
            "digest": tree_digest(root / "model")}


def _reference_generations(model_dir: Path, prompts: list[str], max_new_tokens: int,
                           quantized: bool = True) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from umerge.evaluate.generate import generate

    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    changed = 0
    with torch.no_grad():
        for name, p in m.named_parameters():
            if quantized and p.ndim == 2 and "embed_tokens" not in name and "lm_head" not in name:
                p.copy_(torch.from_numpy(rtn_reference(p.numpy(), 4, GROUP)))
                changed += 1
    assert changed == (14 if quantized else 0)  # 2 layers x (4 attention + 3 MLP projections)
    texts, _ = generate(m, tok, prompts, max_new_tokens=max_new_tokens, batch_size=2, progress=False)
    return texts


def _run_eval(tiny: dict[str, Any], out: Path, *extra: str) -> dict:
    main(["eval", "--model", str(tiny["model"]), "--data", str(tiny["data"]), "--max-new-tokens", "8",
          "--batch-size", "2", "-q", "--quantize", "int4", "--group-size", str(GROUP), *extra, "-o", str(out)])
    return json.loads((out / "report.json").read_text())


def _generations(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]


def test_eval_scores_the_quantized_model_and_removes_it(tiny: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "run"
    rep = _run_eval(tiny, out)
    q = rep["meta"]["quantized"]
    assert (q["scheme"], q["bits"], q["group_size"], q["tensors"]) == ("int4", 4, GROUP, 14)
    assert q["adapter_folded_first"] is False
    assert rep["meta"]["model"] == str(tiny["model"])
    assert "Scored after int4 quantization of 14 linear weights" in (out / "report.md").read_text()
    gens = _generations(out)
    want = _reference_generations(tiny["model"], [g["input"] for g in gens], 8)
    assert [g["generation"] for g in gens] == want
    # ... and the comparison can tell: the full-precision model generates otherwise on some rows
    assert want != _reference_generations(tiny["model"], [g["input"] for g in gens], 8, quantized=False)
    # the temporary model is gone, and the input model was not touched
    assert not [p for p in tmp_path.rglob(".umerge-eval-quantized-*")]
    assert tree_digest(tiny["model"]) == tiny["digest"]


def test_eval_with_an_adapter_folds_it_first(tiny: dict[str, Any], tmp_path: Path) -> None:
    import umerge

    out = tmp_path / "run"
    rep = _run_eval(tiny, out, "--adapter", str(tiny["adapter"]))
    assert rep["meta"]["quantized"]["adapter_folded_first"] is True
    assert rep["meta"]["adapter"] == str(tiny["adapter"])
    folded = tmp_path / "folded"
    umerge.fold(str(tiny["adapter"]), base=str(tiny["model"]), out=str(folded), progress=False)
    gens = _generations(out)
    assert [g["generation"] for g in gens] == _reference_generations(folded, [g["input"] for g in gens], 8)
    assert not [p for p in out.rglob(".umerge-eval-quantized-*")]


@pytest.mark.parametrize(("args", "message"), [
    (["--quantize", "int3"], "'int3' is not one of 'int4', 'int8'"),
    (["--quantize", "int4", "--group-size", "0"], "group size 0"),
])
def test_bad_quantize_options_fail_in_one_line(tiny: dict[str, Any], tmp_path: Path, args: list[str],
                                               message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--model", str(tiny["model"]), "--data", str(tiny["data"]), *args, "-o", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "r").exists()


def test_quantize_needs_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--score-only", str(tmp_path / "g.jsonl"), "--quantize", "int4", "-o", str(tmp_path / "r")])
    assert exc.value.code == 2 and "--quantize goes with --model" in capsys.readouterr().err
