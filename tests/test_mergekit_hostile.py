"""Hostile and broken mergekit configs on `umerge run`: one line, exit 2, nothing written, quickly.

- configs that used to crash, hang or take minutes: nested 5,000 levels deep, not UTF-8, a FIFO,
  200,000 models, YAML alias bombs, over 16 MiB; and the merely odd: non-string keys, a directory,
  an empty file, a list or a scalar at the top, values PyYAML cannot build (`!!int x`);
- many broken or missing models: the line names the first few and counts the rest;
- `..` in model paths is legal (relative to the working directory, as in mergekit);
- a mergekit parameter the method does not use (`weight` on slerp, as in mergekit's own tests) is a
  one-line warning and the same merge without it; an unknown name is still refused;
- hypothesis: random YAML-ish structures and texts raise `InputError` (one line) or translate.

CLI cases run in process through `umerge.cli.main`, except the FIFO, which runs in a subprocess so
that a regression fails on a timeout instead of hanging the test run.
"""

from __future__ import annotations

import datetime
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Family, run_umerge
from umerge import mergekit_yaml as mk
from umerge.cli import main
from umerge.errors import InputError
from umerge.safetensors_io import load_checkpoint


def _umerge(args: list[str | Path], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Runs `umerge ARGS` in process; returns (exit status, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error(code: int, err: str) -> str:
    """The single `umerge: error:` line of a failed run (exit 2, no traceback, nothing else)."""
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("umerge: error: "), err
    assert "Traceback" not in err and "internal error" not in err, err
    return lines[0]


def _refused(cfg: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Runs the config, checks the refusal and that nothing was written beside it; returns the line."""
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = _umerge(["run", cfg, tmp_path / "out"], capsys)
    line = _one_error(code, err)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    return line


def _bomb_chain(levels: int = 9) -> str:
    """Billion laughs, in flow style: each anchor a list of nine aliases of the one before (9**9 values)."""
    chain = ["&a0 [" + ", ".join(['"lol"'] * 9) + "]"]
    chain += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return ", ".join(chain)


# ---- hostile files: each a one-line error, exit 2, no output ------------------------------------

#: name -> (config text, or bytes written as they are; what the error line must say).
HOSTILE: dict[str, tuple[str | bytes, str]] = {
    "nested 5,000 levels (flow)": ("merge_method: linear\nmodels: " + "[" * 5000 + "]" * 5000 + "\n", "nest"),
    "nested 100 levels (block)": ("merge_method: linear\nparameters:\n"
                                  + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(100)) + "  " * 101 + "x\n",
                                  "nests more than 64 levels"),
    "not UTF-8": (b"merge_method: linear\nmodels:\n  - model: caf\xe9/\n", "not UTF-8 text: byte 0xe9 on line 3"),
    "UTF-16": ("merge_method: linear\n".encode("utf-16"), "not UTF-8"),
    "alias bomb at the top": ("lol: [" + _bomb_chain() + "]\nmerge_method: linear\n", "aliases expanded"),
    # Before: the error message's repr of the model expanded all 9**9 strings (no answer in minutes).
    "alias bomb as a model": ("merge_method: linear\nmodels:\n  - model: [" + _bomb_chain() + "]\n", "aliases expanded"),
    "alias of itself": ("merge_method: linear\nmodels: &m [{model: *m}]\n", "contains itself"),
    "undefined alias": ("merge_method: linear\nmodels: *nope\n", "undefined alias"),
    "integer key at the top": ("merge_method: linear\n1: x\nmodels: [{model: m}]\n", "key 1 in"),
    "null key at the top": ("merge_method: linear\nnull: x\nmodels: [{model: m}]\n", "key null in"),
    "flag key in a model": ("merge_method: linear\nmodels: [{model: m, true: 1}]\n", "key true in models[0]"),
    "list as a key": ("merge_method: linear\n[a]: b\nmodels: [{model: m}]\n", "found unhashable key at line 2"),
    "integer parameter name": ("merge_method: linear\nmodels: [{model: m, parameters: {1: 2}}]\n",
                               "parameter name 1 in models[0]"),
    "date key in a filter rule": ("merge_method: linear\nmodels: [{model: m}]\n"
                                  "parameters: {weight: [{2020-01-01: 1, value: 1}]}\n", "key datetime.date"),
    "empty file": ("", "config is empty"),
    "only a comment": ("# nothing here\n", "config is empty"),
    "a list at the top": ("- merge_method: linear\n- models: []\n", "got a list"),
    "a scalar at the top": ("linear\n", "got a single value ('linear')"),
    "two documents": ("merge_method: linear\n---\nmerge_method: ties\n", "both have no name"),
    "a value PyYAML cannot build (!!int)": ("merge_method: linear\nmodels: [{model: m, parameters: {weight: !!int x}}]\n",
                                            "a value cannot be read"),
    "an impossible date": ("merge_method: linear\nbase_model: 2020-13-45\n", "a value cannot be read"),
    "a Python object tag": ("merge_method: !!python/object:os.system x\n", "could not determine a constructor"),
    "a NUL character": ("merge_method: linear\x00\n", "invalid YAML"),
    "a model path with a newline": ('merge_method: linear\nmodels: [{model: "a\\nb"}]\n', "control character"),
    "a model path with a NUL": ('merge_method: linear\nmodels: [{model: "a\\0b"}]\n', "control character"),
    "an integer too large for a number": ("merge_method: linear\nmodels: [{model: m, parameters: {weight: "
                                          + "9" * 400 + "}}]\n", "too large for a number"),
    "an empty value list in a filter rule": ("merge_method: linear\nmodels: [{model: m}]\n"
                                             "parameters: {weight: [{filter: mlp, value: []}]}\n", "empty list"),
    "2,000 models (under the value limit)": ("merge_method: linear\nmodels:\n"
                                             + "".join(f"  - model: m{i}\n" for i in range(2000)),
                                             "models: lists 2000 models; umerge run takes at most 1000"),
    "2,000 sources in a slice": ("merge_method: linear\nslices:\n  - sources:\n"
                                 + "".join(f"      - {{model: m{i}, layer_range: [0, 2]}}\n" for i in range(2000)),
                                 "slices[0].sources lists 2000 models"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_config_is_one_line_exit_2_nothing_written(case: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    text, needle = HOSTILE[case]
    cfg = tmp_path / "merge.yml"
    if isinstance(text, bytes):
        cfg.write_bytes(text)
    else:
        cfg.write_text(text, encoding="utf-8")
    line = _refused(cfg, tmp_path, capsys)
    assert needle in line, line
    assert len(line) < 600, line  # short, whatever the config's size


def test_200000_models_are_refused_quickly_in_one_short_line(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    # Before: 22 s or more reading the YAML, then a check of every path (or, for paths that exist
    # but are not checkpoints, one line listing all 200,000 problems).
    cfg = tmp_path / "merge.yml"
    cfg.write_text("merge_method: linear\nmodels:\n" + "".join(f"  - model: /nonexistent/m{i}\n" for i in range(200_000)))
    start = time.perf_counter()
    line = _refused(cfg, tmp_path, capsys)
    seconds = time.perf_counter() - start
    assert f"more than {mk.MAX_NODES} values" in line and len(line) < 300, line
    assert seconds < 10, seconds  # about 0.3 s here; generous for a loaded machine


def test_a_file_over_16_mib_is_refused_by_its_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "merge.yml"
    with open(cfg, "wb") as f:
        f.write(b"merge_method: linear\n")
        f.truncate(17 * 2**20)  # sparse: the size is all that is looked at
    line = _refused(cfg, tmp_path, capsys)
    assert "config is 17.0 MiB" in line and "16 MiB" in line, line


def test_a_directory_as_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "cfg.d").mkdir()
    line = _refused(tmp_path / "cfg.d", tmp_path, capsys)
    assert "is a directory" in line, line
    with pytest.raises(InputError, match="config is a directory"):  # the API says so too
        mk.load_config(tmp_path / "cfg.d")


def test_a_fifo_as_the_config_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "merge.yml"
    os.mkfifo(fifo)
    # A subprocess with a timeout: opening a FIFO for reading blocks until a writer comes.
    r = run_umerge(["run", fifo, tmp_path / "out"], timeout=60)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a regular file" in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


# ---- many broken models: the first few and a count ---------------------------------------------

def test_many_models_that_are_not_checkpoints_name_the_first_three(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    empty = []
    for i in range(50):
        (tmp_path / f"m{i}").mkdir()
        empty.append(tmp_path / f"m{i}")
    # the same broken directory listed many times is one problem, not 200
    models = "".join(f"  - model: {p}\n" for p in empty) + f"  - model: {empty[0]}\n" * 150
    cfg = tmp_path / "merge.yml"
    cfg.write_text(f"merge_method: linear\nmodels:\n{models}")
    line = _refused(cfg, tmp_path, capsys)
    assert line.startswith("umerge: error: 50 models cannot be read: no safetensors weights found"), line
    assert line.endswith("; and 47 more"), line
    assert f"({empty[2]})" in line and f"({empty[3]})" not in line, line


def test_many_missing_models_name_the_first_three(odd_f32_family: Family, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    b = odd_f32_family.base
    missing = "".join(f"  - model: nothere{i}\n" for i in range(10))
    cfg = tmp_path / "merge.yml"
    cfg.write_text(f"merge_method: ties\nbase_model: {b}\nparameters: {{density: 0.5}}\nmodels:\n{missing}")
    line = _refused(cfg, tmp_path, capsys)
    assert line == ("umerge: error: 10 paths in the config do not exist: no such model directory (nothere0); "
                    "no such model directory (nothere1); no such model directory (nothere2); and 7 more"), line


# ---- `..` in model paths -----------------------------------------------------------------------

def test_dotdot_paths_are_taken_from_the_working_directory_as_in_mergekit(
        odd_f32_family: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    a, c = odd_f32_family.finetuned
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    rel_a, rel_c = (os.path.relpath(p, work) for p in (a, c))
    assert rel_a.startswith("..")
    cfg = tmp_path / "merge.yml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {rel_a}\n  - model: {rel_c}\n")
    code, _, err = _umerge(["run", cfg, tmp_path / "out", "--quiet"], capsys)
    assert code == 0, err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "merge.yml").write_text(f"merge_method: linear\nmodels:\n  - model: ../nope\n  - model: {rel_c}\n")
    line = _refused(bad / "merge.yml", bad, capsys)
    assert line == "umerge: error: no such model directory (../nope)", line


# ---- parameters the method does not use: a warning, as mergekit ignores them ------------------

def _weights(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "umerge.yml"}


@pytest.mark.parametrize("method", ["slerp", "model_stock"])
def test_weight_on_slerp_or_model_stock_warns_and_is_ignored(method: str, odd_bf16_family: Family, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    b, fts = odd_bf16_family.base, odd_bf16_family.finetuned
    fts = fts[:1] if method == "slerp" else fts[:2]
    shared = "parameters: {t: 0.35}\n" if method == "slerp" else ""
    # mergekit's own tests (two_model_config) give each model a weight whatever the method
    with_w = (f"merge_method: {method}\nbase_model: {b}\n{shared}models:\n  - model: {b}\n    parameters: {{weight: 0.6}}\n"
              + "".join(f"  - model: {p}\n    parameters: {{weight: 0.4}}\n" for p in fts))
    without = f"merge_method: {method}\nbase_model: {b}\n{shared}models:\n  - model: {b}\n" + "".join(
        f"  - model: {p}\n" for p in fts)
    (tmp_path / "w.yml").write_text(with_w)
    (tmp_path / "plain.yml").write_text(without)
    code, _, err = _umerge(["run", tmp_path / "w.yml", tmp_path / "w", "--quiet"], capsys)
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 + len(fts), err  # one line per model that sets it
    assert lines[0] == (f"umerge: warning: parameter weight of model {b} (models[0]) is not used by merge_method "
                        f"{method}: ignored, as mergekit does"), lines
    assert all(ln.startswith("umerge: warning: parameter weight of model ") for ln in lines), lines
    assert f"model {fts[0]} (models[1])" in lines[1], lines
    code, _, err = _umerge(["run", tmp_path / "plain.yml", tmp_path / "plain", "--quiet"], capsys)
    assert code == 0 and not err.strip(), err
    assert _weights(tmp_path / "w") == _weights(tmp_path / "plain")


def test_unused_global_parameter_warns_in_print_spec_and_is_not_in_the_spec(
        odd_f32_family: Family, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    b, (a, _) = odd_f32_family.base, odd_f32_family.finetuned
    cfg = tmp_path / "merge.yml"
    cfg.write_text(f"merge_method: slerp\nbase_model: {b}\nmodels: [{{model: {a}}}]\n"
                   "parameters: {t: 0.5, weight: 1.0, density: 0.5}\n")
    code, out, err = _umerge(["run", cfg, tmp_path / "out", "--print-spec"], capsys)
    assert code == 0, err
    assert err.strip().splitlines() == [
        "umerge: warning: parameter weight in parameters is not used by merge_method slerp: ignored, as mergekit does",
        "umerge: warning: parameter density in parameters is not used by merge_method slerp: ignored, as mergekit does",
    ], err
    spec = json.loads(out)
    assert spec["params"] == {"t": 0.5} and all("params" not in m for m in spec["models"]), spec


def test_unused_parameter_in_a_slice_source_names_the_model(odd_f32_family: Family, tmp_path: Path) -> None:
    b, (a, _) = odd_f32_family.base, odd_f32_family.finetuned
    cfg = {"merge_method": "slerp", "base_model": str(b), "parameters": {"t": 0.5},
           "slices": [{"sources": [{"model": str(b), "layer_range": [0, 2]},
                                   {"model": str(a), "layer_range": [0, 2], "parameters": {"weight": 0.5}}]}]}
    got: list[str] = []
    mk.to_spec(cfg, tmp_path / "out", warn=got.append)
    assert got == [f"parameter weight of model {a} (slices[0].sources[1]) is not used by merge_method slerp: "
                   "ignored, as mergekit does"]


def test_to_spec_without_warn_issues_a_config_warning(odd_f32_family: Family, tmp_path: Path) -> None:
    b, (a, c) = odd_f32_family.base, odd_f32_family.finetuned
    cfg = {"merge_method": "model_stock", "base_model": str(b),
           "models": [{"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(c)}]}
    with pytest.warns(mk.ConfigWarning, match=r"parameter weight of model .* model_stock"):
        mk.to_spec(cfg, tmp_path / "out")


@pytest.mark.slow
def test_weights_on_slerp_and_model_stock_give_mergekits_result(peers: Path, odd_f32_family: Family,
                                                                 tmp_path: Path) -> None:
    """mergekit itself on the configs its own tests write (a weight on every model, whatever the
    method): umerge warns, ignores the weights and agrees with it (8 ulp, as the parity tests)."""
    from mergekit_runner import run_mergekit

    b, (a, c) = odd_f32_family.base, odd_f32_family.finetuned
    configs = {
        "slerp": f"merge_method: slerp\nbase_model: {b}\nparameters: {{t: 0.35}}\ndtype: float32\nmodels:\n"
                 f"  - {{model: {b}, parameters: {{weight: 0.6}}}}\n  - {{model: {a}, parameters: {{weight: 0.4}}}}\n",
        "model_stock": f"merge_method: model_stock\nbase_model: {b}\ndtype: float32\nmodels:\n"
                       f"  - {{model: {a}, parameters: {{weight: 0.6}}}}\n  - {{model: {c}, parameters: {{weight: 0.4}}}}\n",
    }
    run_mergekit(peers, tmp_path, configs, timeout=600)
    for name in configs:
        r = run_umerge(["run", tmp_path / f"{name}.yml", tmp_path / f"um_{name}", "--quiet"])
        assert r.returncode == 0, r.stderr
        assert "umerge: warning: parameter weight of model" in r.stderr, r.stderr
        ours, theirs = load_checkpoint(tmp_path / f"um_{name}"), load_checkpoint(tmp_path / f"mk_{name}")
        assert set(ours) == set(theirs)
        for t in theirs:
            diff = np.abs(ours[t].astype(np.float64) - theirs[t].astype(np.float64))
            assert (diff <= 8 * np.spacing(np.float32(np.abs(theirs[t]).max()))).all(), (name, t)


@pytest.mark.parametrize("name", ["wieght", "temperature", "seed"])
def test_a_name_no_mergekit_method_takes_is_still_refused(name: str, odd_f32_family: Family, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    b, (a, _) = odd_f32_family.base, odd_f32_family.finetuned
    cfg = tmp_path / "merge.yml"
    cfg.write_text(f"merge_method: slerp\nbase_model: {b}\nparameters: {{t: 0.5}}\n"
                   f"models: [{{model: {a}, parameters: {{{name}: 1}}}}]\n")
    line = _refused(cfg, tmp_path, capsys)
    assert line == f"umerge: error: merge_method slerp has no parameter '{name}' in mergekit (it takes: t)", line


# ---- fuzzing the translator ---------------------------------------------------------------------

METHODS = [*sorted(mk.METHOD_PARAMS), "nuslerp", "passthrough"]
PARAMS = [*sorted(mk.MERGEKIT_PARAMS), "wieght", "seed"]
KEYS = [*sorted(mk.TOP_KEYS | mk.UNSUPPORTED_TOP), "model", "parameters", "sources", "layer_range", "filter", "value",
        "path", "revision", *PARAMS]
WORDS = [*METHODS, *PARAMS, "*", "mlp", "self_attn", "base", "union", "bfloat16", "float32", "int8", "1e-3", "nan",
         "a+lora", "owner/name", "../nope", "", "two\nlines", "nul\x00", 10**400]


def _scalars(paths: list[object]) -> st.SearchStrategy[object]:
    return st.one_of(
        st.none(), st.booleans(), st.integers(-3, 40), st.integers(), st.floats(),
        st.sampled_from(WORDS + paths), st.text(max_size=6),
        st.binary(max_size=3), st.dates(min_value=datetime.date(2000, 1, 1)),  # YAML's !!binary and dates
    )


def _keys() -> st.SearchStrategy[object]:
    # Keys YAML can produce (strings, numbers, null, flags, dates) and a tuple a Python caller might pass.
    return st.one_of(st.sampled_from(KEYS), st.text(max_size=4), st.integers(), st.none(), st.booleans(),
                     st.floats(allow_nan=False), st.dates(), st.tuples(st.integers(0, 3)))


def _values(paths: list[str]) -> st.SearchStrategy[object]:
    return st.recursive(_scalars(paths), lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(_keys(), inner, max_size=4), max_leaves=12)


def _mostly(good: st.SearchStrategy[object], odd: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    """`good` 14 times in 15, else `odd`: so that many configs get past the first checks."""
    # (sampled_from, not integers: hypothesis draws the ends of an integer range far more often)
    return st.sampled_from(range(15)).flatmap(lambda i: odd if i == 14 else good)


@st.composite
def _configs(draw: st.DrawFn, paths: list[str]) -> object:
    """Configs near mergekit's schema (a base, distinct models, slices covering the 3 layers of the
    fixture in order), each part now and then replaced by an odd value or key."""
    values = _values(paths)
    number = _mostly(st.floats(0.05, 1) | st.sampled_from([0.5, 1, "0.5", "1e-1"]), values)
    rule = st.fixed_dictionaries({"value": number | st.lists(number, max_size=3)},
                                 optional={"filter": _mostly(st.sampled_from(["mlp", "*", "self_attn", "lm_head"]),
                                                             values)})
    setting = _mostly(number | st.lists(number, min_size=1, max_size=4) | st.lists(rule, min_size=1, max_size=3)
                      | rule, values)
    name = _mostly(st.sampled_from(PARAMS), _keys())
    params = _mostly(st.dictionaries(name, setting, max_size=3), values)
    real = paths[:3]  # the base and its two fine-tunes
    cfg: dict[object, object] = {"merge_method": draw(_mostly(st.sampled_from(sorted(mk.METHOD_PARAMS)), values))}
    if draw(st.sampled_from(range(6))):
        cfg["base_model"] = draw(_mostly(st.just(real[0]), values | st.sampled_from(paths)))
    if draw(st.booleans()):
        cfg["parameters"] = draw(params)
    # one or both fine-tunes, with the base listed among them now and then (as mergekit configs do)
    models = draw(st.lists(st.sampled_from(real[1:]), min_size=1, max_size=2, unique=True))
    models = [real[0], *models] if draw(st.booleans()) else models
    odd_model = _mostly(st.nothing(), values | st.sampled_from(paths))  # nothing: keep the drawn model
    if draw(st.booleans()):
        entries = [{"model": draw(st.just(m) | odd_model)} for m in models]
        for e in entries:
            if draw(st.booleans()):
                e["parameters"] = draw(params)
        cfg["models"] = draw(_mostly(st.just(entries), values))
    else:
        ranges = draw(_mostly(st.sampled_from([[[0, 3]], [[0, 1], [1, 3]], [[0, 2], [2, 3]]]),
                              st.lists(st.lists(st.integers(-1, 4), max_size=3), min_size=1, max_size=3)))
        pieces = []
        for r in ranges:
            sources = [{"model": draw(st.just(m) | odd_model), "layer_range": r} for m in models]
            for src in sources:
                if draw(st.booleans()):
                    src["parameters"] = draw(params)
            piece: dict[str, object] = {"sources": sources}
            if draw(st.booleans()):
                piece["parameters"] = draw(params)
            pieces.append(draw(_mostly(st.just(piece), values)))
        cfg["slices"] = draw(_mostly(st.just(pieces), values))
    for key in draw(st.lists(_mostly(st.sampled_from(["dtype", "out_dtype", "tokenizer_source"]), _keys()),
                             max_size=2)):
        cfg[key] = draw(_mostly(st.sampled_from(["bfloat16", "float32", "base", "union", *real]), values))
    return draw(_mostly(st.just(cfg), values))


def _only_input_errors(call: object, *args: object, **kw: object) -> None:
    """Runs `call`; the only exception allowed is an InputError whose message is one short line."""
    try:
        call(*args, **kw)  # type: ignore[operator]
    except InputError as exc:
        msg = str(exc)
        assert "\n" not in msg and "\r" not in msg and len(msg) < 2000, msg


@pytest.fixture(scope="module")
def fuzz_paths(odd_f32_family: Family) -> list[str]:
    """Real checkpoints (so that configs reach the header reads and the spec), and missing paths."""
    return [str(p) for p in odd_f32_family.all] + ["nothere", "owner/name"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_to_spec_raises_only_input_errors(fuzz_paths: list[str], tmp_path_factory: pytest.TempPathFactory,
                                               data: st.DataObject) -> None:
    cfg = data.draw(_configs(fuzz_paths))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mk.ConfigWarning)
        _only_input_errors(mk.to_spec, cfg, str(tmp_path_factory.getbasetemp() / "fuzz-out"))


#: Pieces of YAML text, so that random texts hit anchors, aliases, tags, flow and block syntax.
YAML_BITS = ["merge_method: ", "models:", "\n  - model: ", "parameters: ", "{", "}", "[", "]", ", ", ": ", "- ",
             "\n", "  ", "&a ", "*a", "&b ", "*b", "!!int ", "!!binary ", "!!set ", "!!python/object:x ", "? ",
             "null", "true", "1", "0.5", "'q'", '"\\x00"', "2020-13-45", "linear", "ties", "weight", "#", "---\n", "|\n"]


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(st.sampled_from(YAML_BITS) | st.text(max_size=3), max_size=40))
def test_fuzz_yaml_text_raises_only_input_errors(parts: list[str]) -> None:
    def parse_and_translate(text: str) -> None:
        mk.translate(mk.parse_config(text, "fuzz.yml"), "fuzz.yml")

    _only_input_errors(parse_and_translate, "".join(parts))
