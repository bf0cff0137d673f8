"""The demo's sizes and settings: one typed config per mode (`quick` for CI, `full`), JSON round-trip.

Everything that decides a number in the report lives here, so the report can print it and a run can
be repeated from report.json alone. The unlearning presets themselves (zjuklab-model1/2) come from
`umerge.unlearn`; this config only holds the overrides that scale them down to a tiny CPU model, and
says why in `UNLEARN_SCALING_NOTE`.

The method comparison (`umerge demo --compare-methods`, field `compare_methods`) trains every listed
method of `umerge.unlearn.METHODS` from its own preset with the same `unlearn_overrides`, and, for
the methods with both a forget and a retain term (`UNDER_VARIANT_METHODS`), an "under" variant built
as zjuklab-model2 differs from zjuklab-model1 (`under_variant_overrides`). Its choices were fixed
before the run and are not calibrated (`METHODS_SCALING_NOTE`, docs/CALIBRATION.md):

- every method runs at the demo's frozen learning rate 1e-2 (with max_length 128 and LoRA r = alpha
  = 8), because the comparison asks what each objective does under one optimisation budget; 1e-2
  was calibrated for npo_gdr_klr only, so it may suit another method badly (gradient ascent's loss
  is unbounded and may run away at it), which the table then shows rather than hides;
- each method keeps the scale-setting values of its preset (RMU's steering coefficient 20 and alpha
  10, DPO's and NPO's beta 0.1, SimNPO's beta 4.5, UNDIAL's beta 10): none was tuned on the demo's
  seeds for this comparison;
- the under variant multiplies the forget term's weight by 0.3 / 0.4 = 0.75 (NPO's 0.4 -> 0.3 in the
  ZJUKLAB presets; the KL weight of npo_gdr_klr too, 0.4 -> 0.3), the retain NLL's weight by
  0.4 / 0.2 = 2 (GDR's 0.2 -> 0.4) and sets batch 2 (model1's 1 -> model2's 2). Applied to
  zjuklab-model1 it gives zjuklab-model2 exactly; grad_diff, simnpo and dpo (weights 1 / 1) become
  0.75 / 2, batch 2. npo's preset (npo-only) and undial's have no retain term (weight 0), grad_ascent
  and rmu have no retain NLL, so they run alone.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any

from umerge.errors import InputError

#: Why the presets are overridden in the demo (printed in the report).
UNLEARN_SCALING_NOTE = (
    "The presets' loss weights, batch sizes, gradient accumulation, warmup/decay schedule, NPO beta, "
    "LoRA alpha/r ratio and dropout are kept. Scaled down for a ~0.2M-parameter model on a CPU: the "
    "learning rate (the paper's 1e-4 moves a tiny freshly memorised model too little in a few hundred "
    "steps), max_length (the world's rows are short) and the LoRA rank (the hidden size is 64, not 4096). "
    "The learning rate was calibrated on seeds 0-2 of the full world with the reference-exact loss, judged "
    "by the fixed criteria (umerge.demo.criteria), from 2e-3, 4e-3 and 1e-2: at 2e-3 no preset unlearned "
    "(model2's forget regurgitation stayed at vanilla's), at 4e-3 model2 unlearned on one seed of three, at "
    "1e-2 both presets unlearned on all three and the criteria held on two; 1e-2 was frozen before any "
    "held-out seed ran (docs/CALIBRATION.md, benches/demo_calibration.py)."
)

#: `--compare-methods` without a list: every unlearning method (npo_gdr_klr's over/under pair and its
#: merge are the main pipeline's model1, model2 and factor-wise TIES merge, not trained again).
COMPARE_METHODS_DEFAULT = ("npo_gdr_klr", "grad_ascent", "grad_diff", "npo", "simnpo", "dpo", "rmu", "undial")
#: Methods with a forget and a retain term in their preset: trained also as an under variant and merged.
UNDER_VARIANT_METHODS = ("npo_gdr_klr", "grad_diff", "simnpo", "dpo")
#: The under variant, as zjuklab-model2 differs from zjuklab-model1 (0.4 / 0.4 / 0.2 -> 0.3 / 0.3 / 0.4, batch 1 -> 2).
UNDER_FORGET_FACTOR = 0.75  # 0.3 / 0.4
UNDER_RETAIN_FACTOR = 2.0  # 0.4 / 0.2
UNDER_BATCH_SIZE = 2

#: Why the method comparison is set up as it is (printed in the report).
METHODS_SCALING_NOTE = (
    "Fixed before the run, not calibrated: every method from its own preset (model1's recipe: batch 1, "
    "gradient accumulation 4, 5 epochs, warmup then decay) with the demo's unlearning overrides (lr 1e-2, "
    "max_length 128, LoRA r = alpha = 8), the lr calibrated for npo_gdr_klr only; each method keeps its "
    "preset's scale-setting values (RMU c 20 and alpha 10, DPO beta 0.1, SimNPO beta 4.5, UNDIAL beta 10). "
    "The under variant of a method with a forget and a retain term: forget weight x 0.75 (and npo_gdr_klr's "
    "KL weight), retain NLL weight x 2, batch 2, as zjuklab-model2 differs from zjuklab-model1; its TIES "
    "merge with the preset variant is factor-wise at the demo's density and weights."
)


def under_variant_overrides(method: str) -> dict[str, Any]:
    """The fields that turn `method`'s preset (the over variant) into its under variant."""
    from umerge.unlearn.presets import METHOD_PRESETS, get_preset

    if method not in UNDER_VARIANT_METHODS:
        raise InputError(f"{method}: no under variant (methods with one: {', '.join(UNDER_VARIANT_METHODS)})")
    base = get_preset(METHOD_PRESETS[method])
    if method == "npo_gdr_klr":
        return {"npo_weight": base.npo_weight * UNDER_FORGET_FACTOR, "kl_weight": base.kl_weight * UNDER_FORGET_FACTOR,
                "retain_weight": base.retain_weight * UNDER_RETAIN_FACTOR, "batch_size": UNDER_BATCH_SIZE}
    return {"forget_weight": base.forget_weight * UNDER_FORGET_FACTOR,
            "retain_weight": base.retain_weight * UNDER_RETAIN_FACTOR, "batch_size": UNDER_BATCH_SIZE}


def check_compare_methods(names: typing.Iterable[str]) -> tuple[str, ...]:
    """`names` as canonical method names (idkdpo -> dpo), each once; an unknown one fails."""
    from umerge.unlearn.presets import METHOD_ALIASES, METHODS

    out: list[str] = []
    for name in names:
        canonical = METHOD_ALIASES.get(name, name)
        if canonical not in METHODS:
            raise InputError(f"compare_methods: unknown method {name!r} (known: {', '.join(METHODS)})")
        if canonical not in out:
            out.append(canonical)
    return tuple(out)


@dataclass
class DemoConfig:
    """Sizes and hyper-parameters of one demo run."""

    mode: str = "full"
    seed: int = 0
    # world
    docs_per_task: int = 6
    nonmember_docs_per_task: int = 6
    # tokenizer and model (umerge.unlearn.tiny)
    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 192
    # vanilla fine-tune (memorisation)
    vanilla_epochs: int = 60
    vanilla_lr: float = 3e-3
    vanilla_max_length: int = 256  # tokens per fine-tuning row (prompt + answer): a whole document must fit
    context_length: int = 512  # the tiny model's max_position_embeddings
    vanilla_extra_rounds: int = 2  # more fine-tuning rounds (of vanilla_epochs // 2) while below the target
    calibration_target: float = 0.8  # regurgitation on both splits
    # unlearning: overrides on top of the zjuklab presets
    unlearn_overrides: dict[str, Any] = field(default_factory=lambda: {
        "lr": 1e-2, "max_length": 128, "lora_r": 8, "lora_alpha": 8})
    # merging
    density: float = 0.8
    weights: tuple[float, float] = (1.0, 1.0)
    sweep_densities: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    methods: tuple[str, ...] = ("linear", "dare_linear", "dare_ties", "magnitude_prune", "ties")
    # evaluation
    max_new_tokens: int = 64  # the world's answers are under 50 tokens; the task used 256
    eval_batch_size: int = 32
    # runtime: one torch thread. The model is so small that a second thread only adds
    # synchronisation; measured on the 2-core machine under load, an evaluation took 5.8 s with 2
    # threads and 1.25 s with 1.
    torch_threads: int = 1  # 0: leave torch's default
    mmlu_k_shot: int = 1  # 1-shot keeps the prompts short enough to train on (see pipeline docstring)
    # the quantization probe: every evaluated model's forget knowledge after int4 fake quantization
    # (umerge.quantize, groups of this many input columns, capped at the smallest in-features of the
    # quantized weights: 64 for the tiny OLMo, whose projections are 64 wide)
    quantize_probe: bool = True
    quantize_group_size: int = 128
    # False: Table 1 and the criteria only (the scale study): no NPO-only run, curves, angles,
    # density sweep or method comparison (so the "TIES best method" criterion is not judged)
    analyses: bool = True
    # the method comparison (`--compare-methods`): the unlearning methods trained after the main
    # pipeline, each from its preset, with an under variant and a merge where it applies (see the
    # module docstring); empty: not run
    compare_methods: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe dict (tuples become lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DemoConfig":
        """Inverse of `to_dict`."""
        kwargs = dict(values)
        for name in ("weights", "sweep_densities", "methods", "compare_methods"):
            if name in kwargs:
                kwargs[name] = tuple(kwargs[name])
        return cls(**kwargs)


def config_for(quick: bool, seed: int = 0, given_model: bool = False, real_data: bool = False) -> DemoConfig:
    """The quick (CI, <= 3 minutes on 2 cores) or full (<= 15 minutes) configuration.

    With ``given_model`` (``--model``: a real model, e.g. OLMo on a GPU) the evaluation uses the
    task's settings instead of the tiny model's: 256 new tokens, 5-shot MMLU, torch's own thread count.
    With ``real_data`` (``--data``) the rows are LUME's, several times longer than the synthetic
    world's: documents of up to ~1,600 characters, ~2.9 characters per token with a 1,024-token byte
    BPE, so up to ~560 tokens, and completions of ~190 characters (~65 tokens). A document must fit
    whole, or fine-tuning never sees the end of a long completion and cannot memorise it (measured:
    at 256 tokens the vanilla model stalled at regurgitation 0.70 with a training loss of 0.02). So
    fine-tuning and unlearning take 512 tokens (the presets' 256 are OLMo tokens, ~4.5 characters
    each, which hold a whole LUME document), the model 1,024 positions, generation 96 new tokens.
    """
    if quick:
        cfg = DemoConfig(mode="quick", seed=seed, docs_per_task=3, nonmember_docs_per_task=3,
                         vanilla_epochs=40, sweep_densities=(0.2, 0.5, 0.8, 1.0))
    else:
        cfg = DemoConfig(mode="full", seed=seed)
    if real_data:
        cfg.vocab_size, cfg.max_new_tokens, cfg.vanilla_max_length, cfg.context_length = 1024, 96, 512, 1024
        cfg.unlearn_overrides = {**cfg.unlearn_overrides, "max_length": 512}
    if given_model:
        cfg.max_new_tokens, cfg.mmlu_k_shot, cfg.torch_threads, cfg.eval_batch_size = 256, 5, 0, 8
    return cfg


def _parse_value(key: str, text: str, kind: Any) -> Any:
    """``text`` as a value of the field type ``kind`` (int, float, bool, str, tuple[...] or dict)."""
    origin = typing.get_origin(kind)
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if kind in (int, float, str):
            return kind(text)
        if origin is tuple:
            (item, *_) = typing.get_args(kind)
            return tuple(item(v) for v in text.split(",") if v.strip())
        if origin is dict or kind is dict:
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError(text)
            return value
    except ValueError:
        raise InputError(f"--set {key}={text}: not a valid {getattr(kind, '__name__', kind)}") from None
    raise InputError(f"--set {key}: this field cannot be set from the command line")


def apply_overrides(cfg: DemoConfig, settings: dict[str, str]) -> DemoConfig:
    """``cfg`` with ``--set KEY=VALUE`` settings applied; ``unlearn_overrides.NAME=VALUE`` sets one unlearning
    override (the value read as JSON: ``5e-3``, ``8``, ``"text"``). Unknown keys fail with the valid ones."""
    hints = typing.get_type_hints(DemoConfig)
    values = cfg.to_dict()
    for key, text in settings.items():
        if key.startswith("unlearn_overrides."):
            name = key.split(".", 1)[1]
            try:
                values["unlearn_overrides"][name] = json.loads(text)
            except json.JSONDecodeError:
                values["unlearn_overrides"][name] = text
            continue
        if key not in hints or key in ("mode", "seed"):
            valid = ", ".join(k for k in hints if k not in ("mode", "seed"))
            raise InputError(f"--set {key}: no such demo setting (settings: {valid}, unlearn_overrides.NAME)")
        values[key] = _parse_value(key, text, hints[key])
    values["compare_methods"] = check_compare_methods(values.get("compare_methods") or ())
    return DemoConfig.from_dict(values)


def parse_settings(items: typing.Sequence[str]) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}``; an item without ``=`` fails."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--set {item!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out
