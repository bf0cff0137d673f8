"""Render the demo's report.md from report.json's data, and nothing else.

Every number in the Markdown is formatted from the dict that is report.json (4 decimals, "n/a" for a
missing value), so the two cannot disagree; `tests/test_demo_quick.py` checks that they do not.
"""

from __future__ import annotations

import math
from typing import Any

DISPLAY = {
    "vanilla": "Vanilla (memorised)",
    "model1": "zjuklab-model1 (over-forgetting preset)",
    "model2": "zjuklab-model2 (under-forgetting preset)",
    "merge-ties-factorwise": "TIES merge, factor-wise (PEFT semantics, density {d})",
    "merge-ties-full": "TIES merge, full update (umerge engine, density {d})",
}


def fmt(v: Any) -> str:
    """A number as the report prints it."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{float(v):.4f}"


def _mia(s: dict[str, Any]) -> str:
    return "n/a" if s.get("mia_score") is None else f"{fmt(s['mia_score'])} / {fmt(s['mia_auc'])}"


def _yes(v: Any) -> str:
    return "yes" if v else "no"


def _angle_sentence(angles: dict[str, Any] | None) -> str:
    """What Figure 4 shows at the chosen s, against the random-direction band."""
    if not angles:
        return ""
    parts = []
    for label, entry in angles.items():
        at = entry["at_s"]
        value, lo, hi = at["angle_0s_sF"], at["null_angle_0s_sF_lo"], at["null_angle_0s_sF_hi"]
        if value is None:
            continue
        where = "inside" if lo <= value <= hi else "outside"
        parts.append(f"{label}: s = {entry['s']} ({entry['s_rule']}), angle(ΔP(0→s), ΔP(s→F)) = {value:.1f}°, "
                     f"{where} the random band [{lo:.1f}°, {hi:.1f}°]")
    return ("At the chosen s: " + "; ".join(parts) + ".") if parts else ""


def _probe_sentence(p: dict[str, Any] | None) -> str:
    """What the "forget knowledge after int4" column is, from report.json's quantization_probe."""
    if not p:
        return " Forget knowledge after int4: not measured in this run (n/a)."
    cap = "" if p["group_size"] == p["group_size_cap"] else (
        f", not {p['group_size_cap']}: the smallest input width of a quantized weight is below it")
    return (f" Forget knowledge after int4: the forget split's knowledge score (exact match on its {p['forget_qa_rows']} "
            f"QA rows) after the {p['tensors']} linear weights are quantized to int4 and back (`umerge quantize`: round "
            f"to nearest, symmetric, groups of {p['group_size']} input columns{cap}; embeddings and lm_head kept); "
            "compare it with the full-precision forget knowledge below: a rise towards vanilla's means the "
            "forgetting does not survive quantization (Zhang et al. 2025, arXiv:2410.16454).")


#: The comparison table's score columns: report.json key -> header.
COMPARISON_COLUMNS = {
    "mia_auc": "MIA AUC", "task_aggregate": "Task Aggregate", "mmlu": "MMLU", "aggregate": "final aggregate",
    "forget_regurgitation": "forget regurgitation", "retain_regurgitation": "retain regurgitation",
    "forget_knowledge": "forget knowledge", "forget_knowledge_int4": "after int4",
}
#: Its criteria columns: key -> header ("—": the criterion does not apply to the row, "n/a": not decided).
COMPARISON_CRITERIA = {"unlearns": "unlearns", "keeps_utility": "keeps utility", "survives_int4": "survives int4",
                       "balanced": "balanced", "above_both": "above both"}


def _verdict(crit: dict[str, Any], key: str) -> str:
    if key not in crit:
        return "—"
    return "n/a" if crit[key] is None else _yes(crit[key])


def comparison_section(c: dict[str, Any]) -> list[str]:
    """The "Unlearning methods compared" section's lines, from report.json's "method_comparison"."""
    L = ["## Unlearning methods compared", "",
         "Each method trained on the same vanilla model and data from its own preset (variant \"preset\": "
         "model1's recipe, batch 1); methods with a forget and a retain term also as an \"under\" variant, "
         "and the two TIES-merged factor-wise (variant \"TIES merge\"). npo_gdr_klr's rows are Table 1's "
         "model1, model2 and factor-wise merge. " + c["note"], "",
         "| Method | Variant | " + " | ".join(COMPARISON_COLUMNS.values()) + " | "
         + " | ".join(COMPARISON_CRITERIA.values()) + " |",
         "|---|---" + "|---" * (len(COMPARISON_COLUMNS) + len(COMPARISON_CRITERIA)) + "|"]
    v = c["vanilla"]
    L.append("| vanilla | — | " + " | ".join(fmt(v.get(k)) for k in COMPARISON_COLUMNS) + " | "
             + " | ".join("—" for _ in COMPARISON_CRITERIA) + " |")
    for row in c["rows"]:
        crit = row.get("criteria", {})
        L.append(f"| {row['method']} | {row['variant']} | " + " | ".join(fmt(row.get(k)) for k in COMPARISON_COLUMNS)
                 + " | " + " | ".join(_verdict(crit, k) for k in COMPARISON_CRITERIA) + " |")
    L += ["", "Criteria (fixed before any run, `umerge.demo.criteria`): "
          + "; ".join(c["criteria"].values()) + ". "
          "— : the criterion does not apply to the row (the pair criteria apply to merges only).", ""]
    return L


def _real_data_line(data: dict[str, Any]) -> str:
    sub = data.get("subset")
    if not sub:
        return f"- Data: {data['dir']} (given with --data)"
    utility = sum(sub["utility_questions"].values())
    return (f"- Data: {sub['docs_per_task']} documents per task and split drawn (seed {sub['seed']}) from {sub['source']} "
            f"(`--subset`): {sub['rows']['forget']} forget and {sub['rows']['retain']} retain rows; MIA members the "
            f"{sub['mia']['members']} drawn forget documents, nonmembers {sub['mia']['nonmembers']} further forget "
            f"documents never trained on; utility probe: {utility} four-choice questions from the drawn retain QA rows.")


def render_report(r: dict[str, Any]) -> str:
    """report.md for a report.json object."""
    cfg = r["config"]
    d = cfg["density"]
    scores = r["scores"]
    L: list[str] = []
    L += ["# umerge demo: unlearning via model merging", ""]
    L += [f"Reproduce with `{r['command']}` ({cfg['mode']} mode, seed {cfg['seed']}). "
          f"Total wall time {r['timings_s']['total']:.0f} s (torch threads: {r['environment']['threads']}).", ""]

    # -- findings first: what a reader wants to know, decided by the criteria fixed in advance
    f = r["findings"]
    L += ["## Finding", ""]
    if not f.get("available"):
        L += ["The MIA AUCs needed to judge the criteria are not available (no MIA data or a missing model).", ""]
    else:
        j, iv = f["judgement"], f["judgement"]["intervals"]
        L += [f["sentence"], "",
              "Criteria (fixed before any run, `umerge.demo.criteria`); AUC with its 95% interval (Hanley-McNeil):", ""]
        details = {
            "model1_over_forgets": f"model1 AUC {fmt(f['auc']['model1'])} [{fmt(iv['model1'][0])}, {fmt(iv['model1'][1])}]",
            "model2_under_forgets": f"model2 AUC {fmt(f['auc']['model2'])} [{fmt(iv['model2'][0])}, {fmt(iv['model2'][1])}]"
                                    + ("; did not unlearn" if j.get("model2_did_not_unlearn") else ""),
            "merge_balanced": f"merge AUC {fmt(f['auc']['merge-ties-factorwise'])} "
                              f"[{fmt(iv['merge'][0])}, {fmt(iv['merge'][1])}]",
            "merge_beats_parents": "final aggregates in Table 1",
            "ties_best_method": f"best of Table 2: {j.get('best_method', 'n/a')}",
        }
        for key, text in f["criteria"].items():
            verdict = "not decided" if j.get(key) is None else _yes(j[key])
            L.append(f"- {text}: **{verdict}** ({details[key]}).")
        full = f.get("judgement_full_update")
        if full:
            L.append(f"- with the full-update TIES merge in its place (AUC {fmt(f['auc']['merge-ties-full'])}): balanced "
                     f"**{_yes(full['merge_balanced'])}**, above both parents **{_yes(full['merge_beats_parents'])}**.")
        L.append("")
    size = (f"a model of {r['calibration']['parameters']} parameters" if r["calibration"].get("parameters")
            else "the given model")
    subset = r["data"].get("subset")
    world = (f", {cfg['docs_per_task']} documents per task per split" if r["data"]["synthetic"]
             else f", {subset['docs_per_task']} LUME documents per task per split" if subset else "")
    members = (f" The MIA compares {f['n_members']} member and {f['n_nonmembers']} nonmember documents "
               "(one row per document)." if f.get("available") else "")
    L += [f"How far to trust this: one seed{world} and {size}.{members} Run other `--seed` values to see the spread "
          "between runs, which the intervals above do not include.", ""]

    g = r.get("factorwise_update")
    if g:
        L += ["Why the two TIES merges differ: factor-wise TIES merges the LoRA factors A and B separately, so "
              "the merged update B_m A_m also holds the cross products B_i A_j of different adapters. "
              "Measured over all adapted modules (Δ = scaling · B A, concatenated):", "",
              "| norm Δ model1 | norm Δ model2 | norm of their mean | norm Δ factor-wise merge | cos(merge, mean) | "
              "cos(merge, model1) | cos(merge, model2) | cos(model1, model2) |",
              "|---|---|---|---|---|---|---|---|",
              f"| {fmt(g['norm_model1'])} | {fmt(g['norm_model2'])} | {fmt(g['norm_mean'])} | {fmt(g['norm_merged'])} | "
              f"{fmt(g['cos_merged_mean'])} | {fmt(g['cos_merged_model1'])} | {fmt(g['cos_merged_model2'])} | "
              f"{fmt(g['cos_model1_model2'])} |", ""]

    # -- Table 1
    L += ["## Table 1: unlearned models and their merge", "",
          "Task Aggregate: harmonic mean of the 12 regurgitation/knowledge values (forget values as 1 - v); "
          "MIA score = 1 - 2|AUC - 0.5| of the loss attack on forget-set members vs nonmembers; "
          "MMLU: accuracy on the multiple-choice utility set (questions about retain-set facts, which the vanilla "
          "model also learnt in this format, standing in for general knowledge); Aggregate: mean of the three."
          + _probe_sentence(r.get("quantization_probe")), "",
          "| Model | Task Aggregate | MIA score / AUC | MMLU | Aggregate | forget knowledge after int4 |",
          "|---|---|---|---|---|---|"]
    for name in r["table1"]:
        s = scores[name]
        L.append(f"| {DISPLAY.get(name, name).format(d=d)} | {fmt(s['task_aggregate'])} | {_mia(s)} | "
                 f"{fmt(s['mmlu'])} | {fmt(s['aggregate'])} | {fmt(s.get('forget_knowledge_int4'))} |")
    L += ["", "Overall scores per split (regurgitation: ROUGE-L recall on sentence completions; knowledge: exact "
          "match on QA):", "",
          "| Model | forget regurgitation | forget knowledge | retain regurgitation | retain knowledge |",
          "|---|---|---|---|---|"]
    for name in r["table1"]:
        s = scores[name]
        L.append(f"| {DISPLAY.get(name, name).format(d=d)} | {fmt(s['forget_regurgitation'])} | "
                 f"{fmt(s['forget_knowledge'])} | {fmt(s['retain_regurgitation'])} | {fmt(s['retain_knowledge'])} |")
    L.append("")

    # -- Table 2
    L += ["## Table 2: merge methods", "",
          f"The two adapters merged with weights {cfg['weights']} by each method (density {d} where it applies), "
          "factor-wise on the LoRA factors as PEFT's add_weighted_adapter does, and on the full updates "
          "(scaling · B A of each module); both with umerge.", "",
          "| Method | Path | Task Aggregate | MIA score / AUC | MMLU | Aggregate |", "|---|---|---|---|---|---|"]
    for row in r["table2"]:
        L.append(f"| {row['method']} | {row['path']} | {fmt(row['task_aggregate'])} | {_mia(row)} | "
                 f"{fmt(row['mmlu'])} | {fmt(row['aggregate'])} |")
    if "methods" in r["figures"]:
        L += ["", f"Bar chart: [{r['figures']['methods']}]({r['figures']['methods']})."]
    L.append("")
    if r.get("method_comparison"):
        L += comparison_section(r["method_comparison"])

    # -- density sweep numbers (Figure 5's data)
    L += ["## Density sweep (TIES, factor-wise)", "",
          "| Density | Task Aggregate | MIA score / AUC | MMLU | Aggregate |", "|---|---|---|---|---|"]
    for row in r["sweep"]:
        L.append(f"| {fmt(row['density'])} | {fmt(row['task_aggregate'])} | {_mia(row)} | {fmt(row['mmlu'])} | "
                 f"{fmt(row['aggregate'])} |")
    L.append("")

    # -- figures
    L += ["## Figures", ""]
    captions = {
        "task_curves": "Figure 2. Regurgitation and knowledge per task on the forget and retain sets, from epoch 0 "
                       "(the vanilla model) to the last epoch, for both presets.",
        "score_curves": "Figure 2b. Overall scores over the same epochs (Task Aggregate, per-split scores, MIA).",
        "loss_curves": "Figure 3. Loss terms over optimizer steps: NPO alone (same budget as model1) beside "
                       "NPO+GDR+KLR (model1, model2).",
        "angles": "Figure 4. Angles between parameter-change vectors ΔP(0→s), ΔP(s→F), ΔP(0→F) per epoch s; the "
                  "shaded band is where two random directions of the same dimension and norms fall (95%). "
                  + _angle_sentence(r.get("figure_data", {}).get("angles")),
        "density_sweep": "Figure 5. Task Aggregate, MIA AUC and score, MMLU and final aggregate of the factor-wise "
                         "TIES merge against density.",
    }
    for key, caption in captions.items():
        if key in r["figures"]:
            L += [f"![{key}]({r['figures'][key]})", "", caption, ""]
        else:
            L += [f"({key}: not produced in this run)", ""]

    # -- calibration
    c = r["calibration"]
    L += ["## Calibration: the vanilla model memorises", "",
          f"Target: regurgitation >= {c['target']} on both splits. {c.get('source', '')}. "
          f"Passed: **{_yes(c.get('passed'))}**.", "",
          "| Round | Epochs (total) | forget regurgitation | retain regurgitation | forget knowledge | retain knowledge |",
          "|---|---|---|---|---|---|"]
    for rd in c["rounds"]:
        L.append(f"| {rd['round']} | {rd['epochs_total']} | {fmt(rd['forget_regurgitation'])} | "
                 f"{fmt(rd['retain_regurgitation'])} | {fmt(rd['forget_knowledge'])} | {fmt(rd['retain_knowledge'])} |")
    L.append("")

    # -- setup, seeds, commands
    L += ["## Setup", ""]
    L += [f"- Data: {r['data']['dir']} ({'synthetic world, generated' if r['data']['synthetic'] else 'given with --data'}; "
          f"{cfg['docs_per_task']} documents per task per split, {cfg['nonmember_docs_per_task']} nonmember documents per task)"
          if r["data"]["synthetic"] else _real_data_line(r["data"])]
    if c.get("parameters"):
        L.append(f"- Model: tiny OLMo, {c['parameters']} parameters (hidden {cfg['hidden_size']}, {cfg['num_layers']} layers, "
                 f"{cfg['num_heads']} heads), byte-level BPE with {cfg['vocab_size']} tokens trained on the world's text; "
                 f"fine-tuned {cfg['vanilla_epochs']} epochs at lr {cfg['vanilla_lr']} on forget + retain + utility rows "
                 f"{c.get('training_rows', '')}.")
    for name, u in r["unlearning"].items():
        conf = u["config"]
        L.append(f"- {name}: preset {u['preset']}, npo/kl/retain weights {conf['npo_weight']}/{conf['kl_weight']}/"
                 f"{conf['retain_weight']}, batch {conf['batch_size']} x accumulation {conf['grad_accum']}, {conf['epochs']} "
                 f"epochs, lr {conf['lr']}, LoRA r {conf['lora_r']} alpha {conf['lora_alpha']}, max_length "
                 f"{conf['max_length']}, seed {conf['seed']}; overrides of the preset: {u['overrides'] or 'none'}; "
                 f"{u['steps']} optimizer steps.")
    if r.get("unlearning_note"):
        L.append(f"- Why the overrides: {r['unlearning_note']}")
    L.append(f"- Evaluation: greedy generation, at most {cfg['max_new_tokens']} new tokens, batch {cfg['eval_batch_size']}; "
             f"MMLU {cfg['mmlu_k_shot']}-shot.")
    s = r["seeds"]
    L.append(f"- Seeds: world {s['world']}, model init {s['model_init']}, vanilla fine-tune {s['vanilla_finetune']}, "
             f"unlearning {s['unlearning']}, DARE masks {s['dare']}.")
    L += ["", "Commands:", "", "```", r["command"], "```", ""]
    L += ["Wall time per stage (seconds):", "", "| Stage | Seconds |", "|---|---|"]
    for k, v in r["timings_s"].items():
        L.append(f"| {k} | {v:.1f} |")
    L.append("")
    return "\n".join(L)
