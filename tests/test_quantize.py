"""`umerge quantize` / `umerge.quantize`: int4/int8 fake quantization, against a numpy reference.

The reference (`quantize_support.rtn_reference`) is the documented computation written out in
float64 numpy: per row and per group of `group` consecutive columns, scale = max|w| / qmax,
q = clip(round(w / scale), -qmax, qmax) with numpy's round (ties to even), w' = q * scale, a group
with scale 0 all zeros. The engine computes in float32; each step here is an f64 operation on f32 values rounded to
f32 where the documentation says float32 (f64 holds more than 2 x 24 + 2 bits, so that rounding
gives the correctly rounded f32 result of the same operation), so the two agree bit for bit, and the
output is then rounded once to the tensor's dtype (numpy's float16 cast; bf16 by the bit pattern).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import umerge
from quantize_support import rtn_reference
from umerge.quantization import DEFAULT_EXCLUDE, select_tensors
from umerge.safetensors_io import encode, load_checkpoint, read_tensor, tensor_files, write_tensors

ROOT = Path(__file__).resolve().parents[1]


def _matrix(rng: np.random.Generator, rows: int, cols: int, group: int, bits: int) -> np.ndarray:
    """Random values with the cases that matter planted: an all-zero group, negative maxima, and
    exact ties (a group whose maximum is qmax, so scale 1 and w / scale lands on k + 0.5)."""
    w = rng.normal(0, 0.05, size=(rows, cols)).astype(np.float32)
    w[0, :group] = 0.0                                        # an all-zero group
    w[1, :] = -np.abs(w[1, :])                                # all negative; the maximum is a negative value
    if rows > 2 and cols >= 4:
        w[2, :4] = [7.0, 0.5, -2.5, 3.5] if bits == 4 else [127.0, 0.5, -2.5, 126.5]
    return w


def _encoded(values: np.ndarray, dtype: str) -> bytes:
    return encode(values, dtype)


def _stored(values: np.ndarray, dtype: str) -> np.ndarray:
    """What the input file holds, as float32 (the values the quantizer sees)."""
    from umerge.safetensors_io import decode

    return decode(encode(values, dtype), dtype, values.shape)


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
@pytest.mark.parametrize(("bits", "group"), [(4, 16), (8, 16), (4, None), (4, 5)])
def test_engine_equals_the_numpy_reference_bit_for_bit(tmp_path: Path, dtype: str, bits: int,
                                                       group: int | None) -> None:
    rng = np.random.default_rng(bits * 100 + (group or 0))
    shapes = {"model.layers.0.mlp.down_proj.weight": (7, 37),      # 37 columns: last group shorter
              "model.layers.0.self_attn.q_proj.weight": (12, 16),
              "model.layers.0.mlp.up_proj.weight": (3, 50)}
    tensors = {n: _matrix(rng, r, c, group or c, bits) for n, (r, c) in shapes.items()}
    tensors["model.layers.0.input_layernorm.weight"] = rng.normal(size=16).astype(np.float32)
    tensors["model.embed_tokens.weight"] = rng.normal(size=(11, 16)).astype(np.float32)
    tensors["lm_head.weight"] = rng.normal(size=(11, 16)).astype(np.float32)
    tensors["model.layers.0.self_attn.q_proj.bias"] = rng.normal(size=12).astype(np.float32)
    model = tmp_path / "model"
    model.mkdir()
    write_tensors(model / "model.safetensors", tensors, dtype)
    (model / "config.json").write_text("{}")

    rep = umerge.quantize(model, tmp_path / "q", bits=bits, group_size=-1 if group is None else group,
                          progress=False)
    assert f"int{bits}" in rep.method and "3 of 7 tensors" in rep.method, rep.method
    got = load_checkpoint(tmp_path / "q", raw=True)
    source = load_checkpoint(model, raw=True)
    for name, values in tensors.items():
        if name in shapes:
            want = rtn_reference(_stored(values, dtype), bits, group)
            if dtype == "F16":
                want_bytes = want.astype("<f2").tobytes()
            else:
                want_bytes = _encoded(want, dtype)
            assert got[name].tobytes() == want_bytes, name
            assert got[name].tobytes() != source[name].tobytes(), name  # it did change something
        else:  # embeddings, lm_head, norm, bias: the input's bytes
            assert got[name].tobytes() == source[name].tobytes(), name


def test_the_reference_itself_on_hand_computed_groups() -> None:
    """The reference on values worked out by hand, so it cannot share a mistake with the engine."""
    # int4, one group: max 7 -> scale 1; ties go to even: 0.5 -> 0, 2.5 -> 2, 3.5 -> 4, -2.5 -> -2
    w = np.array([[7.0, 0.5, 2.5, 3.5, -2.5, -0.4]], dtype=np.float32)
    assert rtn_reference(w, 4, None).tolist() == [[7.0, 0.0, 2.0, 4.0, -2.0, -0.0]]
    # groups of 2 over 5 columns: [1, -4] scale 4/7, [0, 0] zeros, [2] alone -> 2
    w = np.array([[1.0, -4.0, 0.0, 0.0, 2.0]], dtype=np.float32)
    s = np.float32(4.0) / np.float32(7.0)
    q1 = np.round(np.float32(1.0) / s)  # 1.75 -> 2
    assert rtn_reference(w, 4, 2).tolist() == [[float(np.float32(q1 * s)), -4.0, 0.0, 0.0, 2.0]]
    # int8: max 127 -> scale 1, 126.5 -> 126, -125.5 -> -126
    w = np.array([[127.0, 126.5, -125.5]], dtype=np.float32)
    assert rtn_reference(w, 8, None).tolist() == [[127.0, 126.0, -126.0]]


def test_the_same_bytes_for_any_thread_count_and_budget(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    model = tmp_path / "model"
    model.mkdir()
    # large enough for several row blocks at the smallest budget (16 MiB -> 64 Ki-element chunks)
    write_tensors(model / "model.safetensors", {"a.proj.weight": rng.normal(size=(1200, 300)).astype(np.float32),
                                                "b.proj.weight": rng.normal(size=(7, 129)).astype(np.float32)},
                  "BF16")
    outs = []
    for i, (threads, budget) in enumerate([(1, None), (2, "16MiB"), (4, "16MiB"), (3, "1GiB")]):
        umerge.quantize(model, tmp_path / f"q{i}", bits=4, group_size=128, threads=threads, memory_budget=budget,
                        progress=False)
        outs.append((tmp_path / f"q{i}" / "model.safetensors").read_bytes())
    assert all(o == outs[0] for o in outs)


def test_which_tensors_the_rule_picks_and_how_to_change_it(tmp_path: Path) -> None:
    names = {"model.embed_tokens.weight": (10, 4), "transformer.wte.weight": (10, 4), "transformer.wpe.weight": (8, 4),
             "lm_head.weight": (10, 4), "model.layers.0.mlp.up_proj.weight": (6, 4),
             "transformer.h.0.attn.c_attn.weight": (4, 12), "model.norm.weight": (4,),
             "model.layers.0.mlp.up_proj.bias": (6,), "model.layers.0.conv.weight": (2, 2, 2),
             "model.layers.0.attn.rel_pos": (3, 3)}
    model = tmp_path / "m"
    model.mkdir()
    write_tensors(model / "model.safetensors", {n: np.ones(s, np.float32) for n, s in names.items()})
    assert select_tensors(model) == ["model.layers.0.mlp.up_proj.weight", "transformer.h.0.attn.c_attn.weight"]
    with_head = select_tensors(model, exclude=r"embed_tokens|wte|wpe")
    assert "lm_head.weight" in with_head and "model.embed_tokens.weight" not in with_head
    assert "model.embed_tokens.weight" in select_tensors(model, exclude="")
    assert "model.norm.weight" not in select_tensors(model, include=".", exclude="")  # 1-D: never
    assert select_tensors(model, include="rel_pos", exclude="") == ["model.layers.0.attn.rel_pos"]
    # the --exclude help lists the default's names
    from umerge.cli.quantize import quantize_cmd

    help_text = next(p for p in quantize_cmd.params if p.name == "exclude").help or ""
    for name in re.search(r"\((embed_tokens.*lm_head)\)", DEFAULT_EXCLUDE).group(1).split("|"):  # type: ignore[union-attr]
        assert name in help_text, name


def test_output_loads_in_transformers_and_passes_verify(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import torch
    from transformers import AutoModelForCausalLM

    from umerge.unlearn.tiny import build_tiny_olmo, save_model, train_byte_bpe_tokenizer

    tok = train_byte_bpe_tokenizer(["the sea was calm and blue today"] * 10, vocab_size=280)
    model = build_tiny_olmo(tok, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
                            max_position_embeddings=64, seed=0)
    save_model(model, tok, tmp_path / "m")
    umerge.quantize(tmp_path / "m", tmp_path / "q", bits=4, group_size=16, progress=False)
    q = AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"))
    orig = dict(model.named_parameters())
    for name, p in q.named_parameters():
        w = orig[name].detach().numpy()
        if w.ndim == 2 and "embed_tokens" not in name and "lm_head" not in name:
            want = rtn_reference(w, 4, 16)
            assert np.array_equal(p.detach().numpy().view(np.uint32), want.view(np.uint32)), name
        else:
            assert torch.equal(p, orig[name]), name
    assert (tmp_path / "q" / "tokenizer.json").is_file()
    assert json.loads(umerge._core.verify(str(tmp_path / "q")))["valid"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(ROOT / "python"), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "umerge.cli", "quantize", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_cli_quantizes_and_prints_one_line(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    w = np.random.default_rng(0).normal(size=(4, 9)).astype(np.float32)
    write_tensors(model / "model.safetensors", {"x.proj.weight": w})
    r = _cli(str(model), "-o", str(tmp_path / "q"), "--bits", "8", "--group-size", "4", "--threads", "2")
    assert r.returncode == 0, r.stderr
    assert "int8, group 4, 1 of 1 tensors" in r.stdout
    got = read_tensor(next(iter(tensor_files(tmp_path / "q").values())), "x.proj.weight")
    assert np.array_equal(got, rtn_reference(w, 8, 4))
    # the same again is refused without --overwrite, accepted with it
    assert _cli(str(model), "-o", str(tmp_path / "q"), "-q").returncode == 2
    assert _cli(str(model), "-o", str(tmp_path / "q"), "-q", "--overwrite").returncode == 0


@pytest.mark.parametrize(("args", "message"), [
    (["--bits", "3"], "'3' is not one of '4', '8'"),
    (["--group-size", "0"], "group size 0 is not a positive number of columns"),
    (["--group-size", "-5"], "group size -5"),
    (["--include", "("], "is not a regular expression"),
    (["--include", "nothing-matches"], "nothing to quantize"),
])
def test_bad_options_fail_in_one_line_and_write_nothing(tmp_path: Path, args: list[str], message: str) -> None:
    model = tmp_path / "m"
    model.mkdir()
    write_tensors(model / "model.safetensors", {"x.proj.weight": np.ones((2, 3), np.float32)})
    r = _cli(str(model), "-o", str(tmp_path / "q"), *args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("umerge: error: ") and message in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_missing_model_fails_in_one_line(tmp_path: Path) -> None:
    r = _cli(str(tmp_path / "gone"), "-o", str(tmp_path / "q"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no such model directory" in r.stderr, r.stderr
    assert not (tmp_path / "q").exists()
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    r = _cli(str(not_a_model), "-o", str(tmp_path / "q"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no safetensors weights" in r.stderr, r.stderr
    assert not (tmp_path / "q").exists()
