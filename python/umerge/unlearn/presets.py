"""The unlearning configuration (a typed dataclass), the methods it selects, and the presets.

ZJUKLAB trained two complementary models with the same recipe and different loss weights and batch
sizes; merging them is the point of the paper:

| preset          | npo_weight (ga_ratio) | kl_weight (gd_ratio) | retain_weight (gk_ratio) | batch |
|-----------------|-----------------------|----------------------|--------------------------|-------|
| zjuklab-model1  | 0.4                   | 0.4                  | 0.2                      | 1     |
| zjuklab-model2  | 0.3                   | 0.3                  | 0.4                      | 2     |

Both: gradient accumulation 4, 5 epochs, learning rate 1e-4, max_length 256, weight decay 0.01, seed 42,
LoRA r 32, alpha 32, dropout 0.05 on every linear layer except lm_head, one epoch of linear warmup
then linear decay to zero, NPO beta 0.1.

The objective is chosen by `method` (see `METHODS`; formulas and sources in
`umerge.unlearn.methods`). Both ZJUKLAB presets use `npo_gdr_klr`, the paper's objective; every other
method has a preset named after it (`grad-ascent`, `grad-diff`, `npo`, `simnpo`, `dpo`, `rmu`,
`undial`) with the shared recipe above and the method's own parameters (`METHOD_PARAMS`), and
`METHOD_PRESETS` says which preset `umerge train --method NAME` starts from when no preset is given.
`finetune` chooses LoRA (the default) or full fine-tuning beside a frozen copy of the starting model.

A config round-trips through JSON and YAML (`to_dict`/`from_dict`, `to_json`/`from_json`,
`to_yaml`/`from_yaml`) and takes `key=value` overrides (`apply_overrides`), the CLI's `--set`. The
reference code's weight names ga_ratio, gd_ratio, gk_ratio are accepted as aliases of npo_weight,
kl_weight, retain_weight (see `umerge.unlearn.losses.LOSS_WEIGHT_ALIASES`).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from umerge.errors import InputError

LOSS_WEIGHT_ALIASES: dict[str, str] = {
    # Same mapping as umerge.unlearn.losses (kept here too so configs work without torch).
    "ga_ratio": "npo_weight",
    "gd_ratio": "kl_weight",
    "gk_ratio": "retain_weight",
}

#: The unlearning objectives `method` selects: name -> the loss it minimises (forget batch f, retain
#: batch r). The formulas, their reductions and their sources are in `umerge.unlearn.methods`.
METHODS: dict[str, str] = {
    "npo_gdr_klr": "npo_weight*NPO(f) + kl_weight*KL(p_ref||p)(r) + retain_weight*NLL(r)  (ZJUKLAB, the paper's objective)",
    "grad_ascent": "-forget_weight*NLL(f)  (gradient ascent)",
    "grad_diff": "-forget_weight*NLL(f) + retain_weight*NLL(r)  (gradient difference)",
    "npo": "forget_weight*NPO(f) + retain_weight*NLL(r)  (Zhang et al. 2024)",
    "simnpo": "forget_weight*SimNPO(f) + retain_weight*NLL(r), reference-free  (Fan et al. 2024)",
    "dpo": "forget_weight*DPO(refusal > f) + retain_weight*NLL(r)  (Rafailov et al. 2023; TOFU's IdkDPO)",
    "rmu": "forget_weight*MSE(h_l(f), c*u) + rmu_alpha*MSE(h_l(r), h_l^ref(r))  (Li et al. 2024, WMDP)",
    "undial": "forget_weight*CE(softmax(z_ref - undial_beta*onehot(y)), p)(f) + retain_weight*NLL(r)  (Dong et al. 2024)",
}
#: Other names a method answers to (the config stores the canonical one).
METHOD_ALIASES: dict[str, str] = {"idkdpo": "dpo"}
#: The config fields each method reads (every other field of the loss section is left unused).
METHOD_PARAMS: dict[str, tuple[str, ...]] = {
    "npo_gdr_klr": ("npo_weight", "kl_weight", "retain_weight", "beta", "npo_reduction", "kl_reduction"),
    "grad_ascent": ("forget_weight",),
    "grad_diff": ("forget_weight", "retain_weight"),
    "npo": ("forget_weight", "retain_weight", "beta", "npo_reduction"),
    "simnpo": ("forget_weight", "retain_weight", "simnpo_beta", "simnpo_delta"),
    "dpo": ("forget_weight", "retain_weight", "beta"),
    "rmu": ("forget_weight", "rmu_alpha", "rmu_layer", "rmu_steering_coeff", "rmu_trainable_layers"),
    "undial": ("forget_weight", "retain_weight", "undial_beta"),
}
FINETUNE_MODES = ("lora", "full")


@dataclass
class UnlearnConfig:
    """Everything that defines an unlearning run. Field comments give the meaning and the paper's value."""

    preset: str | None = None  # name of the preset this config started from (informational)
    # the objective: one of METHODS (formulas in umerge.unlearn.methods); "idkdpo" is read as "dpo"
    method: str = "npo_gdr_klr"
    # loss of npo_gdr_klr (ZJUKLAB); npo_weight/beta/npo_reduction also serve npo, beta also dpo
    npo_weight: float = 0.4  # weight of NPO on the forget batch (reference name: ga_ratio)
    kl_weight: float = 0.4  # weight of KL(p_ref || p_theta) on the retain batch (reference: gd_ratio)
    retain_weight: float = 0.2  # weight of the retain NLL, GDR (reference: gk_ratio)
    beta: float = 0.1  # NPO temperature
    npo_reduction: str = "mean"  # "mean": batch mean token NLL (reference); "sum": per-sequence sum (paper)
    # KL over positions: "reference" sum over real positions / (B * max_length), as the reference's
    # left padding to max_length and kl_div(batchmean) give; "real_mean"; "answer_mean" (see losses.py)
    kl_reduction: str = "reference"
    # the other methods (METHOD_PARAMS says which reads what; retain_weight above is their retain NLL's)
    forget_weight: float = 1.0  # weight of the forget term of every method but npo_gdr_klr (gamma)
    simnpo_beta: float = 4.5  # SimNPO's beta (open-unlearning's TOFU value)
    simnpo_delta: float = 0.0  # SimNPO's margin delta, subtracted from the mean token NLL before beta
    undial_beta: float = 10.0  # UNDIAL: how far the true next token's reference logit is lowered
    rmu_layer: int | None = None  # RMU's steered decoder layer (0-based); None: max(0, L // 4 - 1)
    rmu_trainable_layers: list[int] | None = None  # RMU trains only these layers; None: rmu_layer and the 2 below
    rmu_steering_coeff: float = 20.0  # RMU's c: forget hidden states are pushed to c * u, |u| = 1
    rmu_alpha: float = 10.0  # RMU's alpha: weight of the retain hidden states' MSE to the reference's
    # data
    max_length: int = 256  # tokens per example (prompt + answer + eos)
    prompt_fraction: float = 0.8  # the prompt keeps its last floor(0.8 * max_length) tokens
    pairing: str = "fixed"  # forget i with retain i mod N ("fixed") or a seeded random retain ("random")
    max_forget_rows: int | None = None  # use only the first N forget rows (None: all)
    max_retain_rows: int | None = None  # use only the first N retain rows (None: all)
    # optimisation
    batch_size: int = 1  # forget examples per device per micro-batch (each with one retain example)
    grad_accum: int = 4  # micro-batches per optimizer step
    epochs: int = 5
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0  # linear warmup over this many epochs, then linear decay to 0
    max_grad_norm: float | None = 1.0  # gradient clipping (the Hugging Face Trainer default); None: off
    optimizer: str = "auto"  # "auto" (paged AdamW with bitsandbytes on CUDA, else AdamW), "adamw", "paged_adamw"
    seed: int = 42
    # what is trained: "lora" (adapters; the reference is the model with its adapter off) or "full"
    # (every weight, beside a frozen copy of the starting model as the reference)
    finetune: str = "lora"
    # LoRA
    lora_r: int = 32
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: list[str] | None = None  # None: every nn.Linear except lm_head
    # runtime
    dtype: str = "auto"  # "auto" (bf16 on CUDA, float32 on CPU), "bfloat16", "float16", "float32"
    gradient_checkpointing: bool = False
    save_every_epoch: bool = True  # write OUT/epoch-{k}/ after each epoch (the analyses need them)

    # -- validation ------------------------------------------------------------------------
    def validate(self) -> "UnlearnConfig":
        """Check ranges and choices; raise InputError naming the field. Returns self."""
        def bad(name: str, why: str) -> InputError:
            return InputError(f"config {name}={getattr(self, name)!r}: {why}")

        for name in ("npo_weight", "kl_weight", "retain_weight", "weight_decay", "lora_dropout", "warmup_epochs",
                     "forget_weight", "undial_beta", "rmu_alpha"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        for name in ("beta", "lr", "simnpo_beta", "rmu_steering_coeff"):
            if getattr(self, name) <= 0:
                raise bad(name, "must be > 0")
        for name in ("max_length", "batch_size", "grad_accum", "epochs", "lora_r", "lora_alpha"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        if self.max_length < 2:
            raise bad("max_length", "must be >= 2")
        if not 0.0 <= self.prompt_fraction < 1.0:
            raise bad("prompt_fraction", "must be in [0, 1)")
        if self.lora_dropout >= 1:
            raise bad("lora_dropout", "must be < 1")
        choices = {
            "method": tuple(METHODS),
            "finetune": FINETUNE_MODES,
            "npo_reduction": ("mean", "sum"),
            "kl_reduction": ("reference", "real_mean", "answer_mean"),
            "pairing": ("fixed", "random"),
            "optimizer": ("auto", "adamw", "paged_adamw"),
            "dtype": ("auto", "bfloat16", "float16", "float32"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise bad(name, f"must be one of {', '.join(allowed)}")
        for name in ("max_forget_rows", "max_retain_rows"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise bad(name, "must be >= 1 or null")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise bad("max_grad_norm", "must be > 0 or null")
        if self.rmu_layer is not None and self.rmu_layer < 0:
            raise bad("rmu_layer", "must be >= 0 or null")
        if self.rmu_trainable_layers is not None and (not self.rmu_trainable_layers
                                                      or min(self.rmu_trainable_layers) < 0):
            raise bad("rmu_trainable_layers", "must be a non-empty list of layer indices >= 0, or null")
        return self

    # -- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A plain dict of every field (JSON/YAML-safe)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "UnlearnConfig":
        """Build from a dict (unknown keys are an error; reference aliases are renamed), then validate."""
        cfg = cls()
        cfg.update(values)
        return cfg

    def update(self, values: Mapping[str, Any]) -> "UnlearnConfig":
        """Set fields from a dict, converting each value to the field's type; then validate."""
        for key, value in resolve_aliases(values).items():
            setattr(self, key, _coerce(key, value))
        return self.validate()

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON text of the config; written to `path` too when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "UnlearnConfig":
        """Parse JSON text, or read it from a path."""
        text = _read_text(text_or_path)
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"config is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(values, dict):
            raise InputError("a config must be a JSON object")
        return cls.from_dict(values)

    def to_yaml(self, path: str | Path | None = None) -> str:
        """YAML text of the config; written to `path` too when given."""
        import yaml

        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    @classmethod
    def from_yaml(cls, text_or_path: str | Path) -> "UnlearnConfig":
        """Parse YAML text, or read it from a path."""
        import yaml

        try:
            values = yaml.safe_load(_read_text(text_or_path))
        except yaml.YAMLError as exc:
            raise InputError(f"config is not valid YAML ({exc})") from None
        if not isinstance(values, dict):
            raise InputError("a config must be a YAML mapping")
        return cls.from_dict(values)

    @classmethod
    def load(cls, path: str | Path) -> "UnlearnConfig":
        """Read a config file, JSON or YAML by its extension."""
        p = Path(path)
        if not p.is_file():
            raise InputError(f"{p}: no such config file")
        if p.suffix.lower() == ".json":
            return cls.from_json(p)
        return cls.from_yaml(p)


def _read_text(text_or_path: str | Path) -> str:
    if isinstance(text_or_path, Path):
        return text_or_path.read_text(encoding="utf-8")
    s = str(text_or_path)
    if "\n" not in s and len(s) < 4096 and Path(s).is_file():
        return Path(s).read_text(encoding="utf-8")
    return s


def resolve_aliases(values: Mapping[str, Any]) -> dict[str, Any]:
    """Rename reference weight names (ga_ratio, gd_ratio, gk_ratio) to ours; other keys pass through.

    ga_ratio -> npo_weight, gd_ratio -> kl_weight, gk_ratio -> retain_weight. A name and its alias
    given with different values is an InputError.
    """
    out: dict[str, Any] = {}
    for key, value in values.items():
        target = LOSS_WEIGHT_ALIASES.get(key, key)
        if target in out and out[target] != value:
            raise InputError(f"config {key}={value!r} conflicts with {target}={out[target]!r} ({key} is an alias of {target})")
        out[target] = value
    return out


_FIELDS = {f.name: f for f in dataclasses.fields(UnlearnConfig)}
_HINTS = typing.get_type_hints(UnlearnConfig)


#: Keys earlier versions accepted, and why they are gone (so an old config fails with a reason).
REMOVED_KEYS: dict[str, str] = {
    "kl_positions": "replaced by kl_reduction: reference (the reference code's effective reduction), "
    "real_mean or answer_mean; the old 'all' averaged over the batch's padded width, which the "
    "reference never did",
    "pad_to_max_length": "removed: no loss depends on the padded width any more (kl_reduction "
    "'reference' divides by batch * max_length itself)",
}


def _coerce(key: str, value: Any) -> Any:
    """Convert `value` to the declared type of field `key` (int, float, bool, str, list[str], or None)."""
    if key in REMOVED_KEYS:
        raise InputError(f"config key {key!r} is no longer supported: {REMOVED_KEYS[key]}")
    if key not in _FIELDS:
        known = ", ".join(sorted(_FIELDS)) + ", " + ", ".join(sorted(LOSS_WEIGHT_ALIASES))
        raise InputError(f"unknown config key {key!r} (known: {known})")
    if key == "method" and isinstance(value, str):
        value = METHOD_ALIASES.get(value, value)
    hint = _HINTS[key]
    args = typing.get_args(hint)
    optional = type(None) in args
    base = hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        base = non_none[0]
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null") and optional):
        if optional:
            return None
        raise InputError(f"config {key} cannot be null")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "on"):
                return True
            if isinstance(value, str) and value.strip().lower() in ("false", "no", "0", "off"):
                return False
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if base is int:
            return _coerce_int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            if not isinstance(value, str):
                raise ValueError
            return value
        if typing.get_origin(base) is list:
            item = typing.get_args(base)[0]
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and item is int:
                value = [value]  # --set rmu_trainable_layers=1
            if not isinstance(value, list):
                raise ValueError
            if item is int:
                return [_coerce_int(v) for v in value]
            if not all(isinstance(v, str) for v in value):
                raise ValueError
            return list(value)
    except (TypeError, ValueError):
        raise InputError(f"config {key}={value!r}: expected {_type_name(hint)}") from None
    return value


def _coerce_int(value: Any) -> int:
    """An int from an int, an integral float or a decimal string (never a bool); else ValueError."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, float) and not value.is_integer():
        raise ValueError
    return int(value)


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def parse_override(text: str) -> tuple[str, Any]:
    """Split "key=value" and parse the value as YAML (so 1e-4, true, null and [a, b] work)."""
    import yaml

    if "=" not in text:
        raise InputError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise InputError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads "1e-4" as a string; let the field type decide through _coerce.
    return key, value


def apply_overrides(cfg: UnlearnConfig, overrides: Iterable[str] | Mapping[str, Any] | None) -> UnlearnConfig:
    """Return a copy of `cfg` with overrides ("key=value" strings or a dict) applied and validated."""
    new = dataclasses.replace(cfg)
    if not overrides:
        return new.validate()
    if isinstance(overrides, Mapping):
        values = dict(overrides)
    else:
        values = {}
        for item in overrides:
            k, v = parse_override(item)
            values[k] = v
    return new.update(values)


PRESETS: dict[str, dict[str, Any]] = {
    "zjuklab-model1": {"npo_weight": 0.4, "kl_weight": 0.4, "retain_weight": 0.2, "batch_size": 1},
    "zjuklab-model2": {"npo_weight": 0.3, "kl_weight": 0.3, "retain_weight": 0.4, "batch_size": 2},
    # The paper's Figure 3 baseline: NPO alone, otherwise model1's recipe. It stays on npo_gdr_klr
    # (weights 1 / 0 / 0, the same loss as method npo, bit for bit) so that its log also holds the
    # retain KL and NLL it does not train on, which Figure 3 plots beside the presets'.
    "npo-only": {"npo_weight": 1.0, "kl_weight": 0.0, "retain_weight": 0.0, "batch_size": 1},
    # The other methods, model1's recipe (batch 1, the shared optimiser settings) with each method's
    # parameters; see the module docstring of umerge.unlearn.methods for where each value comes from.
    "grad-ascent": {"method": "grad_ascent", "forget_weight": 1.0, "batch_size": 1},
    "grad-diff": {"method": "grad_diff", "forget_weight": 1.0, "retain_weight": 1.0, "batch_size": 1},
    "simnpo": {"method": "simnpo", "forget_weight": 1.0, "retain_weight": 1.0, "simnpo_beta": 4.5,
               "simnpo_delta": 0.0, "batch_size": 1},
    "dpo": {"method": "dpo", "forget_weight": 1.0, "retain_weight": 1.0, "beta": 0.1, "batch_size": 1},
    "rmu": {"method": "rmu", "forget_weight": 1.0, "rmu_alpha": 10.0, "rmu_steering_coeff": 20.0,
            "rmu_layer": None, "rmu_trainable_layers": None, "batch_size": 1},
    "undial": {"method": "undial", "forget_weight": 1.0, "retain_weight": 0.0, "undial_beta": 10.0, "batch_size": 1},
}
#: One-line description of each preset, for `umerge presets`.
PRESET_NOTES: dict[str, str] = {
    "zjuklab-model1": "stronger forgetting (tends to over-forget): NPO 0.4, KL 0.4, retain NLL 0.2, batch 1",
    "zjuklab-model2": "gentler forgetting (tends to under-forget): NPO 0.3, KL 0.3, retain NLL 0.4, batch 2",
    "npo-only": "NPO alone, no retain terms (the paper's Figure 3 baseline): NPO 1.0, batch 1",
    "grad-ascent": "gradient ascent on the forget NLL, no retain term",
    "grad-diff": "gradient ascent on the forget NLL plus the retain NLL, weights 1 / 1",
    "simnpo": "SimNPO (length-normalised, no reference) plus the retain NLL, weights 1 / 1, beta 4.5",
    "dpo": "DPO with a refusal preferred over the forget answer (IdkDPO) plus the retain NLL, beta 0.1",
    "rmu": "RMU: steer one layer's forget hidden states to 20 u, keep the retain ones (alpha 10)",
    "undial": "UNDIAL: distil the reference with the true token's logit lowered by 10, no retain term",
}
#: The preset `umerge train --method NAME` starts from when neither --preset nor --config is given
#: (its `method` is then set to NAME: npo-only runs as method npo, the same loss).
METHOD_PRESETS: dict[str, str] = {
    "npo_gdr_klr": "zjuklab-model1",
    "grad_ascent": "grad-ascent",
    "grad_diff": "grad-diff",
    "npo": "npo-only",
    "simnpo": "simnpo",
    "dpo": "dpo",
    "rmu": "rmu",
    "undial": "undial",
}


def get_preset(name: str) -> UnlearnConfig:
    """The named preset as a fresh, validated `UnlearnConfig` (the shared recipe plus its weights)."""
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    cfg = UnlearnConfig(preset=name)
    return cfg.update(PRESETS[name])


def resolve_config(
    preset_or_config: str | Path | UnlearnConfig | Mapping[str, Any],
    overrides: Iterable[str] | Mapping[str, Any] | None = None,
) -> UnlearnConfig:
    """A preset name, a config file (JSON/YAML), a config, or a dict -> validated config with overrides."""
    if isinstance(preset_or_config, UnlearnConfig):
        base = dataclasses.replace(preset_or_config)
    elif isinstance(preset_or_config, Mapping):
        base = UnlearnConfig.from_dict(preset_or_config)
    elif isinstance(preset_or_config, str) and preset_or_config in PRESETS:
        base = get_preset(preset_or_config)
    elif Path(preset_or_config).is_file():
        base = UnlearnConfig.load(preset_or_config)
    else:
        raise InputError(f"{preset_or_config!r} is neither a preset ({', '.join(PRESETS)}) nor a config file")
    return apply_overrides(base, overrides)


__all__ = [
    "UnlearnConfig",
    "PRESETS",
    "PRESET_NOTES",
    "METHODS",
    "METHOD_ALIASES",
    "METHOD_PARAMS",
    "METHOD_PRESETS",
    "FINETUNE_MODES",
    "get_preset",
    "resolve_config",
    "apply_overrides",
    "parse_override",
    "resolve_aliases",
    "LOSS_WEIGHT_ALIASES",
]
