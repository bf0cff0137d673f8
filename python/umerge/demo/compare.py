"""`umerge demo --compare-methods`: the unlearning methods side by side, alone and merged over/under.

After the main pipeline, every method of `DemoConfig.compare_methods` is trained on the same vanilla
model and data, from its own preset (`umerge.unlearn.METHOD_PRESETS`: model1's recipe, batch 1, the
method's parameters) with the demo's `unlearn_overrides`: the "preset" variant, the counterpart of
zjuklab-model1. For the methods with a forget and a retain term (`UNDER_VARIANT_METHODS`) an "under"
variant is trained too (`under_variant_overrides`: the forget weight x 0.75, the retain NLL's x 2,
batch 2, as zjuklab-model2 differs from model1), and the two adapters are TIES-merged factor-wise
at the demo's density and weights (`umerge.demo.merging.merge_adapters`, as the main merge). npo_gdr_klr's
three rows are the main pipeline's model1, model2 and factor-wise TIES merge, not trained again.

Each model is evaluated as Table 1's are (the same evaluator, metrics and quantization probe) and
judged by the criteria fixed in `umerge.demo.criteria` (`judge_method` per model, `judge_pair` per
merge). The result is report.json's "method_comparison"; `umerge.demo.render` prints it and
`umerge.demo.seeds` aggregates it over seeds. Nothing here touches the main pipeline's models, RNG
use or numbers: it runs after them, and each training seeds itself (the preset's seed, 42).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

VARIANTS = ("preset", "under", "TIES merge")
#: The scores each row of the comparison holds (Table 1's, plus the split scores and the int4 probe).
ROW_SCORES = ("mia_auc", "mia_score", "task_aggregate", "mmlu", "aggregate", "forget_regurgitation",
              "retain_regurgitation", "forget_knowledge", "retain_knowledge", "forget_knowledge_int4")
#: The main pipeline's models that are npo_gdr_klr's preset, under variant and merge.
MAIN_PIPELINE_ROWS = {"preset": "model1", "under": "model2", "TIES merge": "merge-ties-factorwise"}
MAIN_PRESETS = {"model1": "zjuklab-model1", "model2": "zjuklab-model2"}


def _outcome(s: Mapping[str, Any]) -> Any:
    from umerge.demo.criteria import MethodOutcome

    return MethodOutcome(auc=s.get("mia_auc"), aggregate=s.get("aggregate"), mmlu=s.get("mmlu"),
                         forget_regurgitation=s.get("forget_regurgitation"),
                         forget_knowledge=s.get("forget_knowledge"),
                         forget_knowledge_int4=s.get("forget_knowledge_int4"))


def judge_rows(rows: list[dict[str, Any]], vanilla: Mapping[str, Any]) -> None:
    """Fill each row's "criteria": `judge_method` on every row, `judge_pair` on each merge as well."""
    from umerge.demo.criteria import judge_method, judge_pair

    v = _outcome(vanilla)
    by = {(r["method"], r["variant"]): r for r in rows}
    for r in rows:
        crit: dict[str, Any] = dict(judge_method(v, _outcome(r)))
        if r["variant"] == "TIES merge":
            crit.update(judge_pair(_outcome(by[(r["method"], "preset")]), _outcome(by[(r["method"], "under")]),
                                   _outcome(r)))
        r["criteria"] = crit


def compare_methods(
    cfg: Any,
    data_dir: Path,
    vanilla: Path,
    main_scores: Mapping[str, Mapping[str, Any]],
    out: Path,
    evaluate: Callable[[Path, str, Path], Any],
    probe: Callable[[dict[str, Path]], dict[str, float | None]] | None,
    overrides: Mapping[str, Any],
    say: Callable[[str], None] = lambda _msg: None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train, merge, evaluate and judge every method of ``cfg.compare_methods``; report.json's section.

    `evaluate(model_dir, name, report_dir)` is the demo's evaluator; `probe({name: model_dir})` returns
    each model's forget knowledge after int4 (None: the probe is off); `main_scores` holds the main
    pipeline's scores (vanilla's, and model1's, model2's and the factor-wise merge's for npo_gdr_klr).
    """
    from umerge.analysis.sweep import score_row
    from umerge.demo.config import METHODS_SCALING_NOTE, UNDER_VARIANT_METHODS, under_variant_overrides
    from umerge.demo.criteria import METHOD_CRITERIA, PAIR_CRITERIA
    from umerge.demo.merging import fold_adapter, merge_adapters
    from umerge.unlearn import train
    from umerge.unlearn.presets import METHOD_PRESETS

    root = out / "methods-compared"
    rows: list[dict[str, Any]] = []
    models: dict[str, Path] = {}  # row name -> folded model, for the probe

    def row(method: str, variant: str, name: str, **extra: Any) -> dict[str, Any]:
        entry: dict[str, Any] = {"method": method, "variant": variant, "name": name, **extra}
        rows.append(entry)
        return entry

    for method in cfg.compare_methods:
        has_under = method in UNDER_VARIANT_METHODS
        if method == "npo_gdr_klr":
            for variant, source in MAIN_PIPELINE_ROWS.items():
                s = main_scores[source]
                row(method, variant, source, source=source, preset=MAIN_PRESETS.get(source),
                    **{k: s.get(k) for k in ROW_SCORES})
            continue
        preset = METHOD_PRESETS[method]
        variants = {"preset": dict(overrides)}
        if has_under:
            variants["under"] = {**overrides, **under_variant_overrides(method)}
        adapters: dict[str, Path] = {}
        for variant, fields in variants.items():
            name = f"{method}-{variant}"
            say(f"method comparison: training {name} (preset {preset})")
            res = train(vanilla, str(data_dir), preset, root / "runs" / name, overrides={"method": method, **fields},
                        progress=progress)
            adapters[variant] = res.adapter_dir
            models[name] = fold_adapter(vanilla, res.adapter_dir, root / "models" / name)
            c = res.config
            row(method, variant, name, preset=preset, overrides=fields, steps=res.steps,
                weights={k: getattr(c, k) for k in ("forget_weight", "retain_weight", "npo_weight", "kl_weight")},
                batch_size=c.batch_size)
        if has_under:
            name = f"{method}-ties"
            models[name] = merge_adapters(vanilla, [adapters["preset"], adapters["under"]], root / "models" / name,
                                          method="ties", density=cfg.density, weights=cfg.weights, seed=cfg.seed)
            row(method, "TIES merge", name, density=cfg.density, merge_weights=list(cfg.weights))

    for entry in rows:
        if "source" in entry:
            continue
        name = entry["name"]
        rep = evaluate(models[name], name, root / "eval" / name)
        entry.update(score_row(rep))
        entry["report"] = str((root / "eval" / name / "report.json").relative_to(out))
        say(f"method comparison: {name}: " + ", ".join(
            f"{k}={entry[k]:.3f}" for k in ("mia_auc", "aggregate", "forget_regurgitation") if entry.get(k) is not None))
    int4 = probe(models) if probe is not None and models else {}
    for entry in rows:
        if "source" not in entry:
            entry["forget_knowledge_int4"] = int4.get(entry["name"])
    judge_rows(rows, main_scores["vanilla"])
    return {"methods": list(cfg.compare_methods), "variants": list(VARIANTS), "rows": rows,
            "vanilla": {k: main_scores["vanilla"].get(k) for k in ROW_SCORES},
            "criteria": {**METHOD_CRITERIA, **PAIR_CRITERIA}, "note": METHODS_SCALING_NOTE}


__all__ = ["compare_methods", "judge_rows", "ROW_SCORES", "VARIANTS", "MAIN_PIPELINE_ROWS"]
