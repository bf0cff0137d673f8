"""`batched_matches_single`: batched generation against one prompt at a time, on a tiny OLMo.

On the CPU in float32 a tiny model gives the same texts either way, so the check must report every
prompt equal. The check must also see a difference when there is one: a model whose batched
``generate`` corrupts one known prompt's continuation must be reported with exactly that prompt,
and both texts. `benches/gpu/check_batched_generation.py` is run once on the same model.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import IN_CI, REPO

try:
    import torch
    import transformers  # noqa: F401
except ImportError as exc:  # under CI the train extra is required: fail, do not skip
    if IN_CI:
        raise
    pytest.skip(f"needs the train extra (torch, transformers): {exc}", allow_module_level=True)

from umerge.evaluate.generate import batched_matches_single  # noqa: E402

pytestmark = pytest.mark.train

# Prompts of very different lengths, so the batches are padded (up to ~10 tokens on the left).
PROMPTS = [
    "Sherry grew up in Madera and",
    "Where did Odilia grow up?",
    "The sea was",
    "Lindsey painted the harbour of Lisbon every morning before the fishing boats came back, and",
    "Who moved to Tartu?",
    "Margaretha",
    "Tobias once visited Quito in winter and wrote that the city",
]


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    from umerge.unlearn.tiny import build_tiny_olmo, train_byte_bpe_tokenizer

    tok = train_byte_bpe_tokenizer(PROMPTS * 3, vocab_size=300)
    model = build_tiny_olmo(tok, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                            max_position_embeddings=128, seed=0)
    return model, tok


def test_tiny_model_on_cpu_matches(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    widths = {len(tok(p)["input_ids"]) for p in PROMPTS}
    assert max(widths) - min(widths) >= 5  # the batches really are padded
    res = batched_matches_single(model, tok, PROMPTS, batch_size=4, max_new_tokens=12)
    assert res["n"] == len(PROMPTS)
    assert res["n_equal"] == res["n"] and res["all_equal"] and res["mismatches"] == []
    assert res["batch_size"] == 4 and res["max_new_tokens"] == 12


def test_a_batched_difference_is_reported(tiny: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Only in batches of more than one row, prompt 2's continuation becomes a run of one token."""
    model, tok = tiny
    target = list(tok(PROMPTS[2])["input_ids"])
    junk = tok("~")["input_ids"][0]
    real_generate = model.generate
    batched_calls = []

    def corrupting_generate(*args: Any, **kwargs: Any) -> Any:
        out = real_generate(*args, **kwargs)
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        if ids.shape[0] > 1:
            batched_calls.append(ids.shape[0])
            width = ids.shape[1]
            for r in range(ids.shape[0]):
                if ids[r][mask[r].bool()].tolist() == target:
                    out = out.clone()
                    out[r, width:] = junk
        return out

    monkeypatch.setattr(model, "generate", corrupting_generate)
    res = batched_matches_single(model, tok, PROMPTS, batch_size=len(PROMPTS), max_new_tokens=8)
    assert batched_calls, "the batched run made no batch of more than one row"
    assert res["n"] == len(PROMPTS) and res["n_equal"] == len(PROMPTS) - 1 and not res["all_equal"]
    (m,) = res["mismatches"]
    assert m["index"] == 2 and m["prompt"] == PROMPTS[2]
    assert m["batched"] and set(m["batched"]) == {"~"}
    assert m["single"] != m["batched"] and m["common_prefix_chars"] < len(m["single"])


def test_max_examples_limits_the_list(tiny: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every batched row corrupted: all prompts differ, the list holds the first two in input order."""
    model, tok = tiny
    junk = tok("~")["input_ids"][0]
    real_generate = model.generate

    def corrupting_generate(*args: Any, **kwargs: Any) -> Any:
        out = real_generate(*args, **kwargs)
        if kwargs["input_ids"].shape[0] > 1:
            out = out.clone()
            out[:, kwargs["input_ids"].shape[1]:] = junk
        return out

    monkeypatch.setattr(model, "generate", corrupting_generate)
    res = batched_matches_single(model, tok, PROMPTS, batch_size=len(PROMPTS), max_new_tokens=4, max_examples=2)
    assert res["n_equal"] == 0
    assert [m["index"] for m in res["mismatches"]] == [0, 1]


def _load_bench() -> Any:
    path = REPO / "benches" / "gpu" / "check_batched_generation.py"
    spec = importlib.util.spec_from_file_location("check_batched_generation", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_bench_script_on_a_saved_model(tiny: tuple[Any, Any], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from umerge.unlearn.tiny import save_model

    model, tok = tiny
    save_model(model, tok, tmp_path / "model")
    data = tmp_path / "data"
    data.mkdir()
    for split, ps in (("forget", PROMPTS[:4]), ("retain", PROMPTS[4:])):
        rows = [{"id": f"{split}{i}sc1", "task": "Task1", "input": p, "output": "x"} for i, p in enumerate(ps)]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench = _load_bench()
    out = tmp_path / "check.json"
    rc = bench.main([str(tmp_path / "model"), str(data), "--rows", "3", "--batch-size", "2",
                     "--max-new-tokens", "6", "--out", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out.read_text())
    assert res["n"] == 6  # 3 forget + 3 retain rows
    assert len(lines) == 1 and lines[0].startswith(f"{'PASS' if res['all_equal'] else 'FAIL'} batched generation: ")
    assert rc == (0 if res["all_equal"] else 1)
    if torch.cuda.is_available():  # bf16 on a GPU: a difference is a finding, not a test failure
        assert (res["device"], res["dtype"]) == ("cuda", "bfloat16")
    else:
        assert (res["device"], res["dtype"]) == ("cpu", "float32")
        assert rc == 0 and res["n_equal"] == 6 and res["all_equal"] is True
    assert bench.main([str(tmp_path / "model"), str(tmp_path / "nowhere"), "--out", str(out)]) == 2
