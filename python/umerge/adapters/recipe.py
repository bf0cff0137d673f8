"""LoRA adapter merges as mergekit-style YAML recipes: `umerge run` reads them, `umerge search` writes them.

mergekit merges full checkpoints; its configs have no way to name a PEFT adapter directory except
the ``model+lora`` form, which umerge refuses. A config whose ``models:`` are *all* PEFT LoRA adapter
directories is therefore read here instead of by `umerge.mergekit_yaml`'s engine translation, and
merged as ``umerge ties A/ B/ --base BASE`` merges them (`umerge.adapters.routing`): PEFT's
``add_weighted_adapter`` factor-wise, then folded into ``base_model`` (``merge_and_unload``); without
``base_model`` the output is the merged adapter. Example::

    merge_method: ties
    base_model: vanilla/
    models:
      - model: model1/
        parameters: {weight: 1.0}
      - model: model2/
        parameters: {weight: 1.0}
    parameters: {density: 0.8, majority_sign: total}

What such a recipe may hold: ``merge_method`` one of `METHODS`; ``base_model``; per-model
``parameters: {weight}``; global ``parameters``: ``weight``, ``density``, ``majority_sign``
(``total`` or ``frequency``: PEFT's ``majority_sign_method``, umerge's name for the TIES variants
that exist factor-wise), ``normalize`` (divide the weights by their sum: the default of linear, as
in mergekit and ``umerge linear``; not allowed on the TIES methods, whose PEFT form does not
normalise), ``seed`` (DARE's masks, so a recipe reproduces its merge without ``--seed``); ``dtype``
or ``out_dtype``. Everything else (slices, filter rules, gradients, lambda, other methods) is an
`InputError` naming it: the same rule as for engine configs, nothing silently ignored.

`write_recipe` writes one, with a comment header saying how to run it; `read_recipe` reads one
back into `AdapterRecipe`, so a written recipe round-trips.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from umerge.errors import InputError

#: merge_method values an adapter recipe takes (task_arithmetic is linear without normalising).
METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune", "cat")
#: Methods that draw random masks (and so take a seed).
RANDOM = ("dare_linear", "dare_ties")
#: Methods whose merge keeps a fraction of the entries.
DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
_GLOBAL = {"weight", "density", "majority_sign", "normalize", "seed"}
_TOP = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype"}


@dataclass
class AdapterRecipe:
    """A factor-wise adapter merge: what `merge_adapters` (and, with ``base``, the fold) is given."""

    method: str
    adapters: list[str]
    weights: list[float]
    base: str | None = None
    density: float | None = None
    majority_sign: str = "total"
    normalize: bool = False
    seed: int = 0
    out_dtype: str | None = None
    comment: list[str] = field(default_factory=list)  # header lines of a written recipe (no effect)

    def merge_kwargs(self) -> dict[str, Any]:
        """The `umerge.adapters.routing.merge_adapter_inputs` request of this recipe (engine names)."""
        params: dict[str, Any] = {}
        if self.density is not None:
            params["density"] = self.density
        if self.method in ("ties", "dare_ties"):
            params["majority_sign"] = self.majority_sign
        if self.method in RANDOM:
            params["seed"] = self.seed
        if self.normalize:
            params["normalize"] = True
        return {"method": self.method, "models": list(self.adapters), "base": self.base, "params": params,
                "model_params": [{"weight": w} for w in self.weights]}


def is_adapter_config(config: Any) -> bool:
    """True when a parsed config lists ``models:`` that are all PEFT adapter directories (a mix of
    adapters and full models is an InputError, as in ``umerge ties``)."""
    if not isinstance(config, Mapping) or not isinstance(config.get("models"), list):
        return False
    paths = [_model_path(m) for m in config["models"]]
    if not paths or any(p is None for p in paths):
        return False
    from umerge.adapters.routing import adapter_inputs

    return adapter_inputs([p for p in paths if p is not None], config.get("base_model") if isinstance(
        config.get("base_model"), str) else None)


def _model_path(entry: Any) -> str | None:
    v = entry.get("model") if isinstance(entry, Mapping) else None
    return v if isinstance(v, str) and v else None


def _number(v: Any, what: str, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InputError(f"{what} must be one number in an adapter recipe, got {v!r} ({where}; filter rules and "
                         "gradients have no factor-wise form)")
    return float(v)


def parse_recipe(config: Mapping[str, Any], where: str = "config") -> AdapterRecipe:
    """Checks an adapter recipe (a parsed config, see the module docstring) and returns it."""
    extra = sorted(str(k) for k in config if k not in _TOP)
    if extra:
        raise InputError(f"unsupported key {extra[0]!r} in {where}: an adapter recipe takes "
                         f"{', '.join(sorted(_TOP))} (slices and tokenizers do not apply to LoRA adapters)")
    method = config.get("merge_method")
    if method not in METHODS:
        raise InputError(f"merge_method {method!r} cannot merge LoRA adapters ({where}; adapter methods: "
                         f"{', '.join(METHODS)})")
    base = config.get("base_model")
    if base is not None and not (isinstance(base, str) and base):
        raise InputError(f"base_model must be a path ({where})")
    g = config.get("parameters") or {}
    if not isinstance(g, Mapping):
        raise InputError(f"parameters in {where} must be a mapping")
    unknown = sorted(str(k) for k in g if k not in _GLOBAL)
    if unknown:
        raise InputError(f"parameter {unknown[0]!r} is not supported in an adapter recipe ({where}; it takes "
                         f"{', '.join(sorted(_GLOBAL))})")
    if not isinstance(config.get("models"), list) or not config["models"]:
        raise InputError(f"an adapter recipe needs models: a list of adapter directories ({where})")
    adapters: list[str] = []
    weights: list[float] = []
    default_w = _number(g["weight"], "weight", where) if "weight" in g else 1.0
    for i, m in enumerate(config["models"]):
        w = f"{where}: models[{i}]"
        if not isinstance(m, Mapping) or set(m) - {"model", "parameters"}:
            raise InputError(f"{w} must be a mapping with model and optional parameters")
        p = m.get("parameters") or {}
        if not isinstance(p, Mapping) or set(p) - {"weight"}:
            raise InputError(f"{w}: an adapter takes only a weight parameter, got {list(p) if isinstance(p, Mapping) else p!r}")
        adapters.append(str(m["model"]))
        weights.append(_number(p["weight"], "weight", w) if "weight" in p else default_w)
    density = _number(g["density"], "density", where) if "density" in g else None
    if method in DENSITY and density is None:
        raise InputError(f"{method} needs parameters: density (the fraction of entries kept) ({where})")
    majority = g.get("majority_sign", "total")
    if majority not in ("total", "frequency"):
        raise InputError(f"majority_sign must be total or frequency, got {majority!r} ({where})")
    if "majority_sign" in g and method not in ("ties", "dare_ties"):
        raise InputError(f"majority_sign applies to ties and dare_ties (their sign election), not {method} ({where})")
    normalize = g.get("normalize", method == "linear")
    if not isinstance(normalize, bool):
        raise InputError(f"normalize must be true or false, got {normalize!r} ({where})")
    seed = g.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r} ({where})")
    if "seed" in g and method not in RANDOM:
        raise InputError(f"seed applies to {', '.join(RANDOM)}, not {method} ({where})")
    out_dtype = config.get("out_dtype") or config.get("dtype")
    return AdapterRecipe(method=str(method), adapters=adapters, weights=weights, base=base, density=density,
                         majority_sign=str(majority), normalize=normalize, seed=int(seed),
                         out_dtype=str(out_dtype) if out_dtype is not None else None)


def read_recipe(path: str | os.PathLike[str]) -> AdapterRecipe:
    """Reads an adapter recipe file (with `umerge.mergekit_yaml.load_config`'s limits)."""
    from umerge.mergekit_yaml import load_config

    return parse_recipe(load_config(path), str(path))


def to_config(recipe: AdapterRecipe) -> dict[str, Any]:
    """The recipe as a config mapping (the inverse of `parse_recipe`)."""
    params: dict[str, Any] = {}
    if recipe.density is not None:
        params["density"] = recipe.density
    if recipe.method in ("ties", "dare_ties"):
        params["majority_sign"] = recipe.majority_sign
    if recipe.method in RANDOM:
        params["seed"] = recipe.seed
    if recipe.method not in ("ties", "dare_ties") and recipe.normalize != (recipe.method == "linear"):
        params["normalize"] = recipe.normalize  # written only where it differs from the default
    cfg: dict[str, Any] = {"merge_method": recipe.method}
    if recipe.base is not None:
        cfg["base_model"] = recipe.base
    cfg["models"] = [{"model": a, "parameters": {"weight": w}} for a, w in zip(recipe.adapters, recipe.weights)]
    if params:
        cfg["parameters"] = params
    if recipe.out_dtype is not None:
        cfg["out_dtype"] = recipe.out_dtype
    return cfg


def write_recipe(recipe: AdapterRecipe, path: str | os.PathLike[str]) -> Path:
    """Writes the recipe as YAML, its `comment` lines first (as ``#`` comments); returns the path."""
    import yaml

    p = Path(path)
    head = "".join(f"# {line}\n" if line else "#\n" for line in recipe.comment)
    text = head + yaml.safe_dump(to_config(recipe), sort_keys=False, default_flow_style=None)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(p)
    return p


def run_recipe(config: Mapping[str, Any], out: str | os.PathLike[str], *, where: str = "config",
               seed: int | None = None, random_seed: int | None = None, progress: Any = False,
               **options: Any) -> Any:
    """Runs an adapter recipe (`umerge run` on a config of adapters); returns the merge's report.

    `seed`/`random_seed` (``--seed``/``--random-seed``) set DARE's seed when the recipe has none and
    must agree with it when it has one. `options` are the command's output options; those with no
    meaning for an adapter merge (``strict``, ``allow_nonfinite``, ``out_shard_params``) are refused
    when set rather than dropped.
    """
    from umerge.adapters.routing import merge_adapter_inputs
    from umerge.merge import require_local

    recipe = parse_recipe(config, where)
    refs = [(a, "adapter") for a in recipe.adapters] + ([(recipe.base, "base_model")] if recipe.base else [])
    for path, what in refs:
        require_local(path, what, "point the config at DIR")
    for name in ("strict", "allow_nonfinite"):
        if options.pop(name, False):
            raise InputError(f"--{name.replace('_', '-')} does not apply to a LoRA adapter merge ({where})")
    if options.pop("out_shard_params", None) is not None:
        raise InputError(f"--out-shard-size does not apply to a LoRA adapter merge; use --max-shard-size ({where})")
    given = [s for s in (seed, random_seed) if s is not None]
    if given:
        if len(set(given)) > 1:
            raise InputError(f"--seed {seed} and --random-seed {random_seed} disagree (give one)")
        if recipe.method in RANDOM:
            if "seed" in (config.get("parameters") or {}) and recipe.seed != given[0]:
                raise InputError(f"--seed {given[0]} disagrees with the recipe's seed {recipe.seed} ({where})")
            recipe.seed = int(given[0])
        elif seed is not None:
            raise InputError(f"--seed applies to random methods ({', '.join(RANDOM)}), not {recipe.method}")
    if options.get("out_dtype") is None:
        options["out_dtype"] = recipe.out_dtype
    return merge_adapter_inputs(**recipe.merge_kwargs(), out=out, progress=progress, **options)


def request_of(config: Mapping[str, Any], where: str = "config") -> dict[str, Any]:
    """What `umerge run --print-spec` shows for an adapter recipe: the merge request (there is no
    engine spec: the factors are merged in `umerge.adapters`, the fold is the engine's)."""
    req = parse_recipe(config, where).merge_kwargs()
    return {"adapter_merge": req, "semantics": "PEFT add_weighted_adapter, factor-wise"
            + (", folded into base_model" if req["base"] is not None else " (output: an adapter)")}


def recipe_for(method: str, adapters: Sequence[str], weights: Sequence[float], *, base: str | None,
               density: float | None, majority_sign: str = "total", seed: int = 0,
               comment: Sequence[str] = ()) -> AdapterRecipe:
    """An `AdapterRecipe` for PEFT's combination `method` with plain weights (no normalising)."""
    if method not in METHODS:
        raise InputError(f"{method} cannot merge LoRA adapters (adapter methods: {', '.join(METHODS)})")
    return AdapterRecipe(method=method, adapters=list(adapters), weights=[float(w) for w in weights], base=base,
                         density=density if method in DENSITY else None, majority_sign=majority_sign,
                         normalize=False, seed=seed, comment=list(comment))


__all__ = ["AdapterRecipe", "METHODS", "is_adapter_config", "parse_recipe", "read_recipe", "recipe_for",
           "request_of", "run_recipe", "to_config", "write_recipe"]
