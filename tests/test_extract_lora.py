"""`umerge.extract_lora` / `umerge extract-lora` against numpy float64 SVDs of the same task vectors.

The inputs are small float32 checkpoints whose task vectors delta = ft - base have known spectra
(U diag(s) V^T with orthonormal U, V), written with `umerge.synthetic.write_model`. The reference is
`np.linalg.svd` of delta in float64, computed here from the stored values: the best rank-r
approximation delta_r (Eckart-Young) and its error ||delta - delta_r||_F. Tolerances: on these
geometric spectra (ratio 0.7 to 0.9) the randomized range finder with p = 10 and q = 2 captures the
top-r subspace to far below float32 rounding (Halko, Martinsson and Tropp 2011, Cor. 10.10: the
excess decays like (s_{r+p} / s_r)^(2q+1)), so B @ A must equal delta_r to 1e-5 of ||delta|| and its
error must be within 1e-5 of the optimum. Also: sv_epsilon, distribute-scale, the exact SVD when the
rank reaches the smaller dimension, the PEFT layout of the files, determinism over threads and
memory budgets, bad inputs and the CLI. PEFT and mergekit themselves: test_extract_lora_parity.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import umerge
from conftest import run_umerge, tree_digest
from umerge.safetensors_io import load_checkpoint
from umerge.synthetic import write_model

P = "base_model.model."
L0 = "model.layers.0."


def spectral(rng: np.random.Generator, m: int, n: int, s: np.ndarray) -> np.ndarray:
    """U diag(s) V^T with random orthonormal U (m x k) and V (n x k), k = len(s)."""
    u, _ = np.linalg.qr(rng.standard_normal((m, len(s))))
    v, _ = np.linalg.qr(rng.standard_normal((n, len(s))))
    return (u * s) @ v.T


#: module -> (shape, singular values of its task vector; None: unchanged).
SPECTRA: dict[str, tuple[tuple[int, ...], np.ndarray | None]] = {
    "model.embed_tokens": ((50, 64), 0.5 * 0.75 ** np.arange(50)),
    L0 + "self_attn.q_proj": ((96, 64), 0.7 ** np.arange(64)),
    L0 + "self_attn.k_proj": ((5, 64), 0.05 * 0.5 ** np.arange(5)),   # smaller than the rank
    L0 + "self_attn.v_proj": ((32, 64), None),                        # unchanged
    L0 + "mlp.up_proj": ((40, 200), 0.8 ** np.arange(40)),            # wide
    L0 + "mlp.down_proj": ((200, 40), 0.8 ** np.arange(40)),          # tall
    L0 + "input_layernorm": ((64,), None),
    "lm_head": ((50, 64), None),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    rng = np.random.default_rng(5)
    base, ft = {}, {}
    for module, (shape, s) in SPECTRA.items():
        name = module + ".weight"
        base[name] = (0.02 * rng.standard_normal(shape)).astype(np.float32)
        if s is not None:
            ft[name] = (base[name] + spectral(rng, *shape, s)).astype(np.float32)
        elif len(shape) == 1:
            ft[name] = base[name] + np.float32(0.25)                  # a changed norm
        else:
            ft[name] = base[name].copy()
    root = tmp_path_factory.mktemp("extract")
    return {"base": write_model(root / "base", base), "ft": write_model(root / "ft", ft), "root": root}


def _delta(fam: dict[str, Path], module: str) -> np.ndarray:
    b = load_checkpoint(fam["base"])[module + ".weight"].astype(np.float64)
    f = load_checkpoint(fam["ft"])[module + ".weight"].astype(np.float64)
    return f - b


def _best(delta: np.ndarray, r: int) -> tuple[np.ndarray, float, np.ndarray]:
    """numpy's float64 best rank-r approximation, its error, and the singular values."""
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r], float(np.sqrt(np.sum(s[r:] ** 2))), s


def _extract(fam: dict[str, Path], name: str, **kw: object) -> tuple[dict[str, np.ndarray], dict, umerge.MergeReport]:
    out = fam["root"] / name
    report = umerge.extract_lora(fam["ft"], base=fam["base"], out=out, progress=False, overwrite=True, **kw)  # type: ignore[arg-type]
    tensors = {k: v.astype(np.float64) for k, v in load_checkpoint(out / "adapter_model.safetensors").items()}
    return tensors, json.loads((out / "adapter_config.json").read_text()), report


def _ba(t: dict[str, np.ndarray], module: str) -> np.ndarray:
    return t[f"{P}{module}.lora_B.weight"] @ t[f"{P}{module}.lora_A.weight"]


DECOMPOSED = [L0 + "self_attn.q_proj", L0 + "mlp.up_proj", L0 + "mlp.down_proj"]


def test_product_is_the_best_rank_r_approximation(family: dict[str, Path]) -> None:
    r = 8
    t, cfg, report = _extract(family, "r8", rank=r)
    errors = {m.module: m for m in report.modules}
    for module in DECOMPOSED:
        delta = _delta(family, module)
        best, opt, _ = _best(delta, r)
        ba = _ba(t, module)
        norm = np.linalg.norm(delta)
        assert t[f"{P}{module}.lora_A.weight"].shape == (r, delta.shape[1])
        assert t[f"{P}{module}.lora_B.weight"].shape == (delta.shape[0], r)
        assert np.linalg.norm(ba - best) <= 1e-5 * norm, module
        ours = np.linalg.norm(delta - ba)
        assert ours <= opt * (1 + 1e-5), (module, ours, opt)
        assert errors[module].relative_error == pytest.approx(ours / norm, abs=1e-3)
        assert not errors[module].exact
    assert cfg["r"] == r and cfg["lora_alpha"] == r and cfg["rank_pattern"] == {L0 + "self_attn.k_proj": 5}
    assert cfg["peft_type"] == "LORA" and cfg["use_rslora"] is False


def test_a_rank_beyond_the_smaller_dimension_takes_the_exact_svd(family: dict[str, Path]) -> None:
    t, _, report = _extract(family, "r8", rank=8)
    module = L0 + "self_attn.k_proj"  # 5 x 64: rank 8 >= 5
    delta = _delta(family, module)
    assert t[f"{P}{module}.lora_A.weight"].shape == (5, 64)
    assert np.linalg.norm(_ba(t, module) - delta) <= 1e-6 * np.linalg.norm(delta)
    assert next(m for m in report.modules if m.module == module).exact


def test_distribute_scale_splits_the_singular_values(family: dict[str, Path]) -> None:
    r = 6
    split, _, _ = _extract(family, "split", rank=r, distribute_scale=True)
    on_a, _, _ = _extract(family, "on-a", rank=r, distribute_scale=False)
    for module in DECOMPOSED:
        s = _best(_delta(family, module), r)[2][:r]
        tol = 1e-5 * s[0]
        a, b = split[f"{P}{module}.lora_A.weight"], split[f"{P}{module}.lora_B.weight"]
        # A = S^1/2 V^T and B = U S^1/2: A A^T = B^T B = diag(s).
        np.testing.assert_allclose(a @ a.T, np.diag(s), atol=tol)
        np.testing.assert_allclose(b.T @ b, np.diag(s), atol=tol)
        # mergekit's --no-distribute-scale: A = S V^T, B = U: B^T B = I, A A^T = diag(s^2).
        a, b = on_a[f"{P}{module}.lora_A.weight"], on_a[f"{P}{module}.lora_B.weight"]
        np.testing.assert_allclose(b.T @ b, np.eye(r), atol=1e-5)
        np.testing.assert_allclose(a @ a.T, np.diag(s**2), atol=tol * s[0])
        np.testing.assert_allclose(_ba(on_a, module), _ba(split, module), atol=1e-6 * np.abs(_ba(split, module)).max())


def test_sv_epsilon_keeps_the_singular_values_above_it(family: dict[str, Path]) -> None:
    eps = 0.3  # q_proj: 0.7^3 = 0.343 > eps > 0.7^4; up/down: 0.8^5 = 0.328 > eps > 0.8^6; k_proj: all below
    t, cfg, report = _extract(family, "eps", rank=16, sv_epsilon=eps)
    want = {}
    for module in DECOMPOSED:
        s = _best(_delta(family, module), 1)[2]
        want[module] = int(np.sum(s > eps))
    assert want == {L0 + "self_attn.q_proj": 4, L0 + "mlp.up_proj": 6, L0 + "mlp.down_proj": 6}
    for module, r in want.items():
        assert t[f"{P}{module}.lora_A.weight"].shape[0] == r
        best, opt, _ = _best(_delta(family, module), r)
        assert np.linalg.norm(_ba(t, module) - best) <= 1e-5 * np.linalg.norm(_delta(family, module))
    assert cfg["r"] == 6 and cfg["rank_pattern"] == cfg["alpha_pattern"] == {L0 + "self_attn.q_proj": 4}
    # k_proj has no singular value above eps: left out, as a module of rank 0 cannot be loaded.
    assert L0 + "self_attn.k_proj" in report.skipped
    assert not any("k_proj" in k for k in t)


def test_modules_to_save_and_unchanged_modules(family: dict[str, Path]) -> None:
    t, cfg, report = _extract(family, "r8", rank=8)
    ft = load_checkpoint(family["ft"])
    # Without --embed-lora the changed embedding and the changed norm are saved at full size.
    for name in ("model.embed_tokens.weight", L0 + "input_layernorm.weight"):
        np.testing.assert_array_equal(t[P + name], ft[name])
    assert set(cfg["modules_to_save"]) == {"embed_tokens", "input_layernorm"}
    # Unchanged modules are left out and not targeted.
    assert set(report.skipped) == {L0 + "self_attn.v_proj", "lm_head"}
    assert sorted(cfg["target_modules"]) == ["down_proj", "k_proj", "q_proj", "up_proj"]
    assert not any("v_proj" in k or "lm_head" in k for k in t)


def test_embed_lora_uses_peft_s_embedding_layout(family: dict[str, Path]) -> None:
    r = 8
    t, cfg, _ = _extract(family, "embed", rank=r, embed_lora=True)
    delta = _delta(family, "model.embed_tokens")  # [vocab 50, hidden 64]
    a, b = t[P + "model.embed_tokens.lora_embedding_A"], t[P + "model.embed_tokens.lora_embedding_B"]
    assert a.shape == (r, 50) and b.shape == (64, r)
    best, opt, _ = _best(delta, r)
    # PEFT's embedding update is (B @ A)^T.
    assert np.linalg.norm((b @ a).T - best) <= 1e-5 * np.linalg.norm(delta)
    assert "embed_tokens" in cfg["target_modules"] and cfg["modules_to_save"] == ["input_layernorm"]


def test_filters_and_skip_undecomposable(family: dict[str, Path]) -> None:
    t, cfg, _ = _extract(family, "filtered", rank=4, include=[r"mlp\."], exclude=["down"], skip_undecomposable=True)
    assert sorted(k.removeprefix(P) for k in t) == sorted([L0 + "mlp.up_proj.lora_A.weight", L0 + "mlp.up_proj.lora_B.weight",
                                                            "model.embed_tokens.weight"])
    # The embedding is saved whatever --include says (mergekit), unless --exclude names it; the norm
    # matches no --include, so it is neither decomposed nor saved.
    t, cfg, _ = _extract(family, "filtered2", rank=4, include=[r"mlp\."], exclude=["embed"])
    assert not any("embed" in k or "norm" in k for k in t) and cfg["modules_to_save"] is None


def test_save_module_and_a_resized_vocabulary(family: dict[str, Path], tmp_path: Path) -> None:
    t, cfg, _ = _extract(family, "save-q", rank=4, save_modules=["q_proj"])
    ft = load_checkpoint(family["ft"])
    np.testing.assert_array_equal(t[P + L0 + "self_attn.q_proj.weight"], ft[L0 + "self_attn.q_proj.weight"])
    assert "q_proj" in cfg["modules_to_save"] and "q_proj" not in cfg["target_modules"]
    # A fine-tune with 10 more tokens: --embed-lora is turned off, as mergekit does, and the
    # embedding is saved at the fine-tune's size.
    grown = dict(ft)
    grown["model.embed_tokens.weight"] = np.concatenate([ft["model.embed_tokens.weight"],
                                                         np.ones((10, 64), np.float32)])
    out = tmp_path / "grown"
    report = umerge.extract_lora(write_model(tmp_path / "ft", grown), base=family["base"], out=out, rank=4,
                                 embed_lora=True, progress=False)
    assert any("vocabulary differs" in w and "60 rows" in w for w in report.warnings), report.warnings
    saved = load_checkpoint(out / "adapter_model.safetensors")[P + "model.embed_tokens.weight"]
    assert saved.shape == (60, 64)


def test_bf16_inputs_give_bf16_factors_near_the_optimum(family: dict[str, Path], tmp_path: Path) -> None:
    base, ft = load_checkpoint(family["base"]), load_checkpoint(family["ft"])
    bb, fb = write_model(tmp_path / "base", base, dtype="BF16"), write_model(tmp_path / "ft", ft, dtype="BF16")
    out = tmp_path / "lora"
    umerge.extract_lora(fb, base=bb, out=out, rank=8, progress=False)
    from umerge.safetensors_io import checkpoint_dtypes

    assert set(checkpoint_dtypes(out / "adapter_model.safetensors").values()) == {"BF16"}
    t = {k: v.astype(np.float64) for k, v in load_checkpoint(out / "adapter_model.safetensors").items()}
    b64, f64 = load_checkpoint(bb), load_checkpoint(fb)
    for module in DECOMPOSED:
        name = module + ".weight"
        delta = f64[name].astype(np.float64) - b64[name]
        _, opt, _ = _best(delta, 8)
        # Factors rounded to bf16 (8 significant bits): the error grows by at most a few 2^-8 of ||delta||.
        assert np.linalg.norm(delta - _ba(t, module)) <= opt + 3 * 2.0**-8 * np.linalg.norm(delta)


def test_same_bytes_for_any_thread_count_and_budget(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    shape = (1100, 1000)  # 4.4 MB of float32: streamed from the maps under a 16 MiB budget, cached under 512 MiB
    base = {"model.layers.0.mlp.up_proj.weight": (0.02 * rng.standard_normal(shape)).astype(np.float32),
            "model.layers.0.mlp.down_proj.weight": (0.02 * rng.standard_normal((64, 48))).astype(np.float32)}
    ft = {k: (v + spectral(rng, *v.shape, 0.7 ** np.arange(min(v.shape)))).astype(np.float32) for k, v in base.items()}
    b, f = write_model(tmp_path / "base", base), write_model(tmp_path / "ft", ft)
    digests = set()
    for i, (threads, budget) in enumerate([(1, "16MiB"), (2, None), (3, "64MiB")]):
        out = tmp_path / f"out{i}"
        umerge.extract_lora(f, base=b, out=out, rank=12, threads=threads, memory_budget=budget, progress=False)
        digests.add((out / "adapter_model.safetensors").read_bytes())
    assert len(digests) == 1
    other = tmp_path / "seed"
    umerge.extract_lora(f, base=b, out=other, rank=12, seed=1, progress=False)
    assert (other / "adapter_model.safetensors").read_bytes() not in digests  # a new sketch ...
    t0 = load_checkpoint(tmp_path / "out0" / "adapter_model.safetensors")
    t1 = load_checkpoint(other / "adapter_model.safetensors")
    m = P + "model.layers.0.mlp.up_proj"
    ba0 = t0[m + ".lora_B.weight"].astype(np.float64) @ t0[m + ".lora_A.weight"]
    ba1 = t1[m + ".lora_B.weight"].astype(np.float64) @ t1[m + ".lora_A.weight"]
    assert np.abs(ba0 - ba1).max() <= 1e-5 * np.abs(ba0).max()  # ... the same approximation


def test_large_tensors_saved_at_full_size_are_copied_whole(tmp_path: Path) -> None:
    from umerge.safetensors_io import bf16_bits_to_f32, f32_to_bf16_bits

    rng = np.random.default_rng(2)
    # 12 MB of float32: copied in several steps of 8 MiB, raw or re-encoded.
    base = {"model.embed_tokens.weight": rng.standard_normal((3000, 1000)).astype(np.float32),
            "model.layers.0.mlp.up_proj.weight": rng.standard_normal((30, 20)).astype(np.float32)}
    ft = {k: (v + 0.01 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in base.items()}
    b, f = write_model(tmp_path / "base", base), write_model(tmp_path / "ft", ft)
    for out_dtype in (None, "bf16"):
        out = tmp_path / f"out-{out_dtype}"
        umerge.extract_lora(f, base=b, out=out, rank=4, out_dtype=out_dtype, progress=False)
        got = load_checkpoint(out / "adapter_model.safetensors")[P + "model.embed_tokens.weight"]
        want = ft["model.embed_tokens.weight"]
        if out_dtype == "bf16":
            want = bf16_bits_to_f32(f32_to_bf16_bits(want)).reshape(want.shape)
        np.testing.assert_array_equal(got, want)


def test_bad_inputs_fail_in_one_line_and_write_nothing(family: dict[str, Path], tmp_path: Path) -> None:
    base = load_checkpoint(family["base"])
    wrong = dict(base)
    wrong[L0 + "mlp.up_proj.weight"] = np.zeros((40, 199), np.float32)
    bad_base = write_model(tmp_path / "bad-base", wrong)
    before = tree_digest(family["ft"], bad_base)
    out = tmp_path / "out"
    r = run_umerge(["extract-lora", family["ft"], "--base", bad_base, "-r", "4", "-o", out])
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("umerge: error: tensor " + L0 + "mlp.up_proj.weight"), r.stderr
    assert "[40, 200]" in r.stderr and "[40, 199]" in r.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".umerge-tmp")]
    assert tree_digest(family["ft"], bad_base) == before
    missing = dict(base)
    del missing[L0 + "self_attn.q_proj.weight"]
    r = run_umerge(["extract-lora", family["ft"], "--base", write_model(tmp_path / "m", missing), "-o", out])
    assert r.returncode == 2 and "q_proj.weight is missing from" in r.stderr, r.stderr
    out.mkdir()
    (out / "keep").write_text("x")
    r = run_umerge(["extract-lora", family["ft"], "--base", family["base"], "-o", out])
    assert r.returncode == 2 and "not empty" in r.stderr, r.stderr
    assert (out / "keep").read_text() == "x"
    r = run_umerge(["extract-lora", family["ft"], "--base", family["base"], "-o", tmp_path / "x", "-i", "("])
    assert r.returncode == 2 and "not a regular expression" in r.stderr, r.stderr
    nan = load_checkpoint(family["ft"])
    nan[L0 + "mlp.up_proj.weight"][3, 7] = np.nan
    r = run_umerge(["extract-lora", write_model(tmp_path / "nan", nan), "--base", family["base"], "-o", tmp_path / "y"])
    assert r.returncode == 2 and "contains NaN or Inf at element 607" in r.stderr, r.stderr
    assert not (tmp_path / "y").exists()


def test_cli_writes_the_adapter_and_takes_mergekit_spellings(family: dict[str, Path], tmp_path: Path) -> None:
    r = run_umerge(["extract-lora", family["ft"], "--base", family["base"], "-r", "4", "-o", tmp_path / "a"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("extracted 4 modules at rank <= 4") and "2 saved at full size" in r.stdout, r.stdout
    r = run_umerge(["extract-lora", family["ft"], "--base-model", family["base"], "--max-rank", "4", "--out-path",
                    tmp_path / "b", "--exclude-regex", "up_proj", "-q"])
    assert r.returncode == 0 and r.stdout == "", (r.stdout, r.stderr)
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() != (tmp_path / "b" / "adapter_model.safetensors").read_bytes()
    assert not any("up_proj" in k for k in load_checkpoint(tmp_path / "b" / "adapter_model.safetensors"))
    v = run_umerge(["verify", tmp_path / "a"])
    assert v.returncode == 0, v.stdout + v.stderr
    h = run_umerge(["extract-lora", "--help"])
    assert h.returncode == 0 and "Examples:" in h.stdout and "PeftModel.from_pretrained" in h.stdout
    # mergekit's spellings parse but are not listed beside the options.
    assert "-r, --rank INTEGER RANGE " in h.stdout and "  --base PATH " in h.stdout and "--out-path" not in h.stdout
