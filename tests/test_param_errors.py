"""Method parameters are checked in one place, the engine: the Python API and the CLI pass them
through and the user sees the engine's one-line message (an `InputError`; exit 2 in the CLI).

Only what the engine cannot see is checked in Python: the number of weights (the spec attaches
each weight to its model), values JSON cannot carry (NaN, infinities), and adapter-only inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import umerge
from conftest import Family, run_umerge
from umerge.errors import InputError

# (API function, positional models from the family ("fts" or "ft0"), with base, kwargs, expected message part)
API_CASES: list[tuple[str, str, bool, dict[str, Any], str]] = [
    ("ties", "fts", False, {"density": 0.5}, "ties needs a base model (base=... / --base DIR)"),
    ("task_arithmetic", "fts", False, {}, "task_arithmetic needs a base model"),
    ("magnitude_prune", "fts", False, {"density": 0.5}, "magnitude_prune needs a base model"),
    ("dare_ties", "fts", False, {"density": 0.5}, "dare_ties needs a base model"),
    ("della", "fts", False, {"density": 0.5}, "della needs a base model"),
    ("breadcrumbs", "fts", False, {"density": 0.5}, "breadcrumbs needs a base model"),
    ("slerp", "ft0", False, {"t": 0.5}, "slerp needs a base model"),
    ("model_stock", "fts", False, {}, "model_stock needs a base model"),
    ("ties", "fts", True, {"density": 1.5}, "invalid parameter density: 1.5 is outside (0, 1]"),
    ("ties", "fts", True, {"density": 0}, "invalid parameter density: 0 is outside (0, 1]"),
    ("dare_linear", "fts", True, {"density": -0.5}, "invalid parameter density: -0.5 is outside (0, 1]"),
    ("magnitude_prune", "fts", True, {"density": 2.0}, "invalid parameter density: 2 is outside (0, 1]"),
    ("breadcrumbs", "fts", True, {"density": 0.5, "gamma": 1.0},
     "invalid parameter gamma: 1 is outside [0, 1)"),
    ("dare_linear", "fts", True, {"density": 0.5, "rescale": "bogus"},
     'invalid parameter rescale: "bogus" is not one of density (or probability), l1, none'),
    ("dare_ties", "fts", True, {"density": 0.5, "seed": -1}, "invalid parameter seed: -1 is not a non-negative integer"),
    ("della", "fts", True, {"density": 0.5, "seed": 1.5}, "invalid parameter seed: 1.5 is not a non-negative integer"),
    ("dare_linear", "fts", True, {"density": 0.5, "seed": True},
     "invalid parameter seed: true is not a non-negative integer"),
    ("ties", "fts", True, {"density": 0.5, "preset": "bogus"},
     'invalid parameter preset: "bogus" is not one of mergekit, peft, paper'),
    ("slerp", "fts", True, {"t": 0.5}, "slerp interpolates between the base and exactly one other model, but 2"),
    ("model_stock", "ft0", True, {}, "model_stock needs at least 2 models besides the base, got 1"),
    ("nearswap", "ft0", False, {"t": 0.1}, "nearswap needs a base model"),
    ("nearswap", "fts", True, {"t": 0.1}, "nearswap works on the base and exactly one other model, but 2"),
    ("nearswap", "ft0", True, {"t": -0.5}, "invalid parameter t: -0.5 is negative"),
    ("nuslerp", "ft0", True, {}, "nuslerp interpolates between exactly two models (with an optional base), but 1"),
    ("multislerp", "fts", True, {"eps": -1.0}, "invalid parameter eps: -1 is not positive"),
    ("multislerp", "fts", True, {"weights": [2.0, -2.0]}, "invalid parameter weight: the weights [2.0, -2.0] sum to 0"),
    ("karcher", "fts", False, {"max_iter": -1}, "invalid parameter max_iter: -1 is not a whole number in [0, 2^24]"),
    ("karcher", "fts", False, {"tol": -1e-3}, "invalid parameter tol: -0.001 is negative"),
    ("ties", "fts", True, {"density": 0.5, "preset": "peft", "normalize": False},
     "invalid parameter normalize: false is mergekit's variant: only the mergekit preset takes it"),
    ("sce", "fts", False, {}, "sce needs a base model"),
    ("sce", "fts", True, {"select_topk": 0}, "invalid parameter select_topk: 0 is outside (0, 1]"),
    ("arcee_fusion", "fts", True, {}, "arcee_fusion works on the base and exactly one other model, but 2"),
    ("ram", "fts", True, {"epsilon": -1e-3}, "invalid parameter epsilon: -0.001 is negative"),
    ("ramplus_tl", "fts", True, {"r": -1}, "invalid parameter r: -1 is negative"),
    # checked in Python, because the engine cannot see them
    ("ties", "fts", True, {"density": 0.5, "weights": [1.0]}, "1 weights given for 2 models"),
    ("linear", "fts", False, {"weights": [1.0, 2.0, 3.0]}, "3 weights given for 2 models"),
    ("ties", "fts", True, {"density": float("nan")}, "invalid parameter density: nan is not a finite number"),
    ("task_arithmetic", "fts", True, {"weights": [1.0, float("inf")]},
     "invalid parameter weight: inf is not a finite number (model 2)"),
]


@pytest.mark.parametrize(("fn", "models", "with_base", "kwargs", "message"), API_CASES,
                         ids=[f"{c[0]}-{c[4][:40]}" for c in API_CASES])
def test_api_shows_the_engines_message(odd_f32_family: Family, tmp_path: Path, fn: str, models: str,
                                       with_base: bool, kwargs: dict[str, Any], message: str) -> None:
    fam = odd_f32_family
    ms: Any = fam.finetuned if models == "fts" else fam.finetuned[0]
    args = [ms, fam.base] if with_base else [ms]
    out = tmp_path / "out"
    with pytest.raises(InputError) as exc:
        getattr(umerge, fn)(*args, out=out, progress=False, **kwargs)
    text = str(exc.value)
    assert message in text, text
    assert "\n" not in text
    assert not out.exists()


@pytest.mark.parametrize(("args", "message"), [
    (["ties", "{ft0}", "{ft1}", "--density", "0.5"], "ties needs a base model"),
    (["ties", "{ft0}", "{ft1}", "--base", "{base}", "--density", "nan"], "density: nan is not a finite number"),
    (["dare-linear", "{ft0}", "{ft1}", "--base", "{base}", "--density", "1.5"], "density: 1.5 is outside (0, 1]"),
    (["breadcrumbs", "{ft0}", "{ft1}", "--base", "{base}", "--density", "0.5", "--gamma", "1"],
     "gamma: 1 is outside [0, 1)"),
    (["task-arithmetic", "{ft0}", "{ft1}", "--base", "{base}", "--weight", "1"], "1 weights given for 2 models"),
    (["slerp", "{ft0}", "--t", "0.5"], "slerp needs a base model"),
    (["model-stock", "{ft0}", "--base", "{base}"], "model_stock needs at least 2 models besides the base, got 1"),
    (["karcher", "{ft0}", "{ft1}", "--max-iter", "-1"], "Invalid value for '--max-iter'"),
    (["ties", "{ft0}", "{ft1}", "--base", "{base}", "--density", "0.5", "--preset", "paper", "--no-normalize"],
     "only the mergekit preset takes it"),
])
def test_cli_shows_the_engines_message_and_exits_2(odd_f32_family: Family, tmp_path: Path, args: list[str],
                                                   message: str) -> None:
    fam = odd_f32_family
    names = {"ft0": fam.finetuned[0], "ft1": fam.finetuned[1], "base": fam.base}
    argv = [a.format(**names) for a in args]
    out = tmp_path / "out"
    result = run_umerge([*argv, "-o", out, "--quiet"])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("umerge: error: "), result.stderr
    assert message in lines[0], lines[0]
    assert not out.exists()
