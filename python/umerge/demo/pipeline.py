"""The end-to-end pipeline of `umerge demo`: "unlearning via model merging" in one command, on a CPU.

Stages (each one call into the package's own pieces; this module only orchestrates and records):

1. data: the synthetic world (`umerge.demo.world`), or ``--data DIR`` (with ``--subset N``: a seeded
   subset of a LUME-format directory with held-out MIA nonmembers and a utility probe,
   `umerge.demo.subset`);
2. vanilla: a byte-level BPE tokenizer and a tiny OLMo (`umerge.unlearn.tiny`) fine-tuned on the forget
   and retain rows (and on the utility questions, see below) until it memorises them: the calibration
   target is regurgitation >= 0.8 on both splits, measured with the task's scorer and recorded;
   or ``--model DIR`` used as is;
3. unlearn: LoRA adapters with the zjuklab-model1 and zjuklab-model2 presets (`umerge.unlearn.train`,
   scaled down for the tiny model by `DemoConfig.unlearn_overrides`), with a per-epoch evaluation
   hook for the score curves;
4. merge: TIES at density 0.8 factor-wise on the adapters (PEFT ``add_weighted_adapter`` semantics,
   as the paper's system) and TIES on the full updates with the umerge engine (`umerge.demo.merging`);
5. evaluate vanilla, model1, model2 and both merges (`umerge.evaluate.evaluate`: regurgitation,
   knowledge, Task Aggregate, MIA, MMLU-format utility, final aggregate), and each one's forget
   knowledge again after int4 fake quantization (`_quantization_probe`);
6. analyses (`umerge.analysis`): loss curves beside an NPO-only run (Figure 3), scores per task from
   epoch 0 (Figure 2), parameter-change angles against a random-direction null (Figure 4), the
   density sweep (Figure 5), the merge-method comparison (Table 2); each figure's numbers are in
   report.json under "figure_data" (the sweep's under "sweep");
7. with ``--compare-methods`` (`DemoConfig.compare_methods`), after everything above: every listed
   unlearning method trained, merged over/under where it applies, evaluated and judged
   (`umerge.demo.compare`), report.json's "method_comparison";
8. report.json, and report.md rendered from it (`umerge.demo.render`).

Why the vanilla model also learns the utility questions: a tiny model trained from scratch knows
nothing outside the world, so an MMLU-style probe would sit at chance (0.25) before and after
unlearning and measure nothing. The demo therefore gives the vanilla model the utility set's
multiple-choice prompts (about retain-set facts only, never about the forget set) as its "general
knowledge", the way a pretrained model knows MMLU's facts; the unlearning data never contains them,
so a drop in MMLU accuracy is collateral damage of unlearning, as in the task.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from umerge.demo.config import (
    COMPARE_METHODS_DEFAULT,
    UNLEARN_SCALING_NOTE,
    DemoConfig,
    apply_overrides,
    config_for,
)
from umerge.errors import InputError

FORMAT = "umerge-demo-report/1"
MARKER = ".umerge-demo"  # marks a directory written by the demo, so --overwrite only ever removes ours
PRESETS = ("zjuklab-model1", "zjuklab-model2")
MODEL_NAMES = {"zjuklab-model1": "model1", "zjuklab-model2": "model2"}
NPO_ONLY = "npo-only"  # the run trained for Figure 3 only


@dataclass
class DemoOptions:
    """What the user asked for (the CLI's options)."""

    out: str | Path
    quick: bool = False
    data_dir: str | Path | None = None
    model_dir: str | Path | None = None
    seed: int = 0
    overwrite: bool = False
    progress: bool = True
    config: DemoConfig | None = None  # None: `config_for(...)` with `settings` applied
    subset: int | None = None  # --subset: documents per task and split drawn from data_dir
    settings: dict[str, str] = field(default_factory=dict)  # --set KEY=VALUE
    compare_methods: bool = False  # --compare-methods: every method unless --set compare_methods=... lists some

    def resolved_config(self) -> DemoConfig:
        """The configuration this run uses."""
        if self.config is not None:
            return self.config
        base = config_for(self.quick, self.seed, given_model=self.model_dir is not None,
                          real_data=self.data_dir is not None)
        cfg = apply_overrides(base, self.settings)
        if self.compare_methods and not cfg.compare_methods:
            cfg.compare_methods = COMPARE_METHODS_DEFAULT
        return cfg

    def command(self) -> str:
        """The `umerge demo` command line that reproduces this run."""
        parts = ["umerge", "demo", "-o", str(self.out)]
        if self.quick:
            parts.append("--quick")
        if self.data_dir:
            parts += ["--data", str(self.data_dir)]
        if self.subset is not None:
            parts += ["--subset", str(self.subset)]
        for key, value in self.settings.items():
            parts += ["--set", f"{key}={value}"]
        if self.model_dir:
            parts += ["--model", str(self.model_dir)]
        parts += ["--seed", str(self.seed)]
        if self.compare_methods:
            parts.append("--compare-methods")
        if self.overwrite:
            parts.append("--overwrite")
        return shlex.join(parts)


class _Log:
    """Stage messages on stderr and the wall time of each stage."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self.timings: dict[str, float] = {}

    def say(self, msg: str) -> None:
        if self.enabled:
            print(f"[demo {time.perf_counter() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def stage(self, name: str, fn: Callable[[], Any]) -> Any:
        self.say(f"{name} ...")
        t = time.perf_counter()
        result = fn()
        self.timings[name] = round(time.perf_counter() - t, 1)
        self.say(f"{name}: done in {self.timings[name]:.1f}s")
        return result


def check_inputs(opts: DemoOptions) -> None:
    """Fail on bad --data/--model/--subset before anything is written."""
    if opts.subset is not None and opts.data_dir is None:
        raise InputError("--subset draws documents from --data DIR: give --data too")
    if opts.data_dir is not None:
        d = Path(opts.data_dir)
        for name in ("forget.jsonl", "retain.jsonl"):
            if not (d / name).is_file():
                raise InputError(f"{d}: no {name} (--data needs a directory with forget.jsonl and retain.jsonl)")
    if opts.model_dir is not None and not (Path(opts.model_dir) / "config.json").is_file():
        raise InputError(f"{opts.model_dir}: not a model directory (no config.json)")


def prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise InputError(f"output directory {out} exists and is not empty (use --overwrite)")
        if not (out / MARKER).exists():
            raise InputError(f"{out} is not empty and was not written by `umerge demo`: refusing to delete it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by umerge demo; --overwrite may delete this directory\n")


# --------------------------------------------------------------------------------------------------
# Data


@dataclass
class _Data:
    dir: Path
    members: Path | None
    nonmembers: Path | None
    mmlu: Path | None
    synthetic: bool
    subset: dict[str, Any] | None = None  # --subset: what was drawn (subset.json without the document list)


def _data(opts: DemoOptions, cfg: DemoConfig, out: Path) -> _Data:
    if opts.data_dir is not None and opts.subset is not None:
        from umerge.demo.subset import write_subset

        d = out / "data"
        meta = {k: v for k, v in write_subset(opts.data_dir, d, opts.subset, seed=cfg.seed).items() if k != "documents"}
        return _Data(d, d / "mia" / "member.jsonl", d / "mia" / "nonmember.jsonl", d / "mmlu", synthetic=False,
                     subset=meta)
    if opts.data_dir is not None:
        d = Path(opts.data_dir)
        mem, non = d / "mia" / "member.jsonl", d / "mia" / "nonmember.jsonl"
        has_mia = mem.is_file() and non.is_file()
        mmlu = d / "mmlu" if (d / "mmlu" / "test").is_dir() else None
        return _Data(d, mem if has_mia else None, non if has_mia else None, mmlu, synthetic=False)
    from umerge.demo.world import WorldConfig, generate_world, write_world

    world = generate_world(WorldConfig(seed=cfg.seed, docs_per_task=cfg.docs_per_task,
                                       nonmember_docs_per_task=cfg.nonmember_docs_per_task))
    d = write_world(world, out / "data")
    return _Data(d, d / "mia" / "member.jsonl", d / "mia" / "nonmember.jsonl", d / "mmlu", synthetic=True)


def _utility_rows(data: _Data, k_shot: int) -> list[Any]:
    """The MMLU-format prompts of the utility set as training rows (prompt -> " <letter>")."""
    from umerge.evaluate.mmlu import build_prompt, load_mmlu
    from umerge.unlearn.data import Row

    if data.mmlu is None:
        return []
    rows = []
    for subject, parts in load_mmlu(data.mmlu).items():
        for split in ("dev", "test"):
            for i, q in enumerate(parts[split]):
                k = 0 if split == "dev" else min(k_shot, len(parts["dev"]))
                prompt = build_prompt(subject, parts["dev"], q, k)
                rows.append(Row(id=f"mmlu-{subject}-{split}-{i}qa0", input=prompt, output=f" {q[5]}",
                                task="utility", kind="qa", kind_index=0, split="retain"))
    return rows


# --------------------------------------------------------------------------------------------------
# Evaluation helpers


def _scores(report: Any) -> dict[str, float | None]:
    from umerge.analysis.sweep import score_row

    return score_row(report)


class _Evaluator:
    """`umerge.evaluate.evaluate` with the demo's data (MIA and MMLU files included) and settings."""

    def __init__(self, data: _Data, cfg: DemoConfig, out: Path, progress: bool) -> None:
        self.data, self.cfg, self.out, self.progress = data, cfg, out, progress

    def kwargs(self) -> dict[str, Any]:
        d = self.data
        return dict(data=str(d.dir), mia_members=str(d.members) if d.members else None,
                    mia_nonmembers=str(d.nonmembers) if d.nonmembers else None,
                    mmlu_dir=str(d.mmlu) if d.mmlu else None, batch_size=self.cfg.eval_batch_size,
                    max_new_tokens=self.cfg.max_new_tokens, mmlu_k_shot=self.cfg.mmlu_k_shot, progress=False)

    def __call__(self, model: str | Path, name: str, out: Path | None = None) -> Any:
        from umerge.evaluate import evaluate

        return evaluate(str(model), out=str(out) if out else None, name=name, **self.kwargs())


def probe_group_size(model: str | Path, cap: int) -> int:
    """The quantization probe's group size: `cap` (128, the usual 4-bit setting), or, when a quantized
    weight has fewer input features, the largest power of two not above the smallest (64 for the
    tiny OLMo, whose attention projections take 64 inputs), so that no group spans a whole row by
    accident of size alone."""
    from umerge import _core
    from umerge.quantization import select_tensors

    chosen = set(select_tensors(model))
    widths = [t["shape"][1] for t in json.loads(_core.inspect(str(model)))["tensors"] if t["name"] in chosen]
    if not widths:
        raise InputError(f"{model}: no linear weight to quantize")
    return min(cap, 1 << (min(widths).bit_length() - 1))


def _quantization_probe(cfg: DemoConfig, data: _Data, models: dict[str, Path]) -> dict[str, Any]:
    """Each model's forget knowledge after int4 fake quantization (Zhang et al. 2025, arXiv:2410.16454:
    unlearned knowledge came back after 4-bit quantization).

    Only what that score needs: the forget split's QA rows (knowledge is their exact match), greedy
    generation with the evaluation's settings, through `umerge.evaluate.evaluate(..., quantize="int4")`
    (the model quantized into a temporary directory, scored, removed). No MIA, no MMLU."""
    from umerge.evaluate import evaluate
    from umerge.evaluate.data import load_eval_data
    from umerge.evaluate.metrics import row_kind

    rows = [r for r in load_eval_data(str(data.dir))["forget"] if row_kind(r["id"]) == "qa"]
    group = probe_group_size(models["vanilla"], cfg.quantize_group_size)
    knowledge: dict[str, float | None] = {}
    tensors = None
    for name, path in models.items():
        rep = evaluate(str(path), {"forget": rows}, quantize="int4", group_size=group, name=name,
                       batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens, progress=False)
        knowledge[name] = rep.forget_set.get("overall-knowledge-score")
        tensors = rep.meta["quantized"]["tensors"]
    return {"scheme": "int4", "bits": 4, "group_size": group, "group_size_cap": cfg.quantize_group_size,
            "tensors": tensors, "forget_qa_rows": len(rows), "forget_knowledge_int4": knowledge,
            "rule": "round to nearest (ties to even), symmetric, scale = max|w| / 7 per group; linear weights only "
                    "(embeddings and lm_head kept)"}


# --------------------------------------------------------------------------------------------------
# Stages


def _build_vanilla(opts: DemoOptions, cfg: DemoConfig, data: _Data, out: Path, ev: _Evaluator,
                   log: _Log) -> tuple[Path, dict[str, Any]]:
    """The model to unlearn from, and the calibration record (regurgitation on both splits)."""
    calibration: dict[str, Any] = {"target": cfg.calibration_target, "rounds": []}

    def measure(model: Path, round_no: int, epochs_total: int) -> bool:
        rep = ev(model, "vanilla", out / "eval" / f"calibration-{round_no}")
        s = _scores(rep)
        rec = {"round": round_no, "epochs_total": epochs_total,
               "forget_regurgitation": s["forget_regurgitation"], "retain_regurgitation": s["retain_regurgitation"],
               "forget_knowledge": s["forget_knowledge"], "retain_knowledge": s["retain_knowledge"]}
        calibration["rounds"].append(rec)
        ok = min(s["forget_regurgitation"] or 0.0, s["retain_regurgitation"] or 0.0) >= cfg.calibration_target
        log.say(f"calibration round {round_no}: regurgitation forget {rec['forget_regurgitation']:.3f}, "
                f"retain {rec['retain_regurgitation']:.3f} (target >= {cfg.calibration_target}): "
                f"{'met' if ok else 'not met'}")
        return ok

    if opts.model_dir is not None:
        vanilla = Path(opts.model_dir)
        calibration["passed"] = measure(vanilla, 0, 0)
        calibration["source"] = "given model (--model), not fine-tuned by the demo"
        return vanilla, calibration

    from umerge.unlearn import finetune, load_task_data
    from umerge.unlearn.tiny import build_tiny_olmo, save_model, train_byte_bpe_tokenizer

    task = load_task_data(data.dir)
    utility = _utility_rows(data, cfg.mmlu_k_shot)
    texts = [r.input + r.output for r in list(task.forget) + list(task.retain) + utility]
    if data.nonmembers is not None:
        from umerge.evaluate.data import load_mia_documents

        texts += [d["text"] for d in load_mia_documents(str(data.nonmembers), "nonmember")]
    tok = train_byte_bpe_tokenizer(texts, vocab_size=cfg.vocab_size)
    model = build_tiny_olmo(tok, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                            intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.context_length,
                            seed=cfg.seed)
    calibration["parameters"] = sum(p.numel() for p in model.parameters())
    init = save_model(model, tok, out / "models" / "init")
    rows = list(task.forget) + list(task.retain) + utility
    calibration["training_rows"] = {"forget": len(task.forget), "retain": len(task.retain), "utility": len(utility)}
    vanilla = out / "models" / "vanilla"
    res = finetune(init, rows, vanilla, epochs=cfg.vanilla_epochs, lr=cfg.vanilla_lr, seed=cfg.seed,
                   prompt_loss=True, max_length=cfg.vanilla_max_length, progress=opts.progress)
    epochs = cfg.vanilla_epochs
    calibration["finetune_losses"] = [res.epoch_losses]
    ok = measure(vanilla, 1, epochs)
    round_no = 1
    while not ok and round_no <= cfg.vanilla_extra_rounds:
        round_no += 1
        more = max(1, cfg.vanilla_epochs // 2)
        nxt = out / "models" / f"vanilla-round{round_no}"
        res = finetune(vanilla, rows, nxt, epochs=more, lr=cfg.vanilla_lr / 2, seed=cfg.seed + round_no,
                       prompt_loss=True, max_length=cfg.vanilla_max_length, progress=opts.progress)
        shutil.rmtree(vanilla)
        nxt.rename(vanilla)
        epochs += more
        calibration["finetune_losses"].append(res.epoch_losses)
        ok = measure(vanilla, round_no, epochs)
    calibration["passed"] = ok
    calibration["source"] = "tiny OLMo built and fine-tuned by the demo"
    return vanilla, calibration


def _unlearn(opts: DemoOptions, cfg: DemoConfig, data: _Data, vanilla: Path, out: Path) -> dict[str, Any]:
    from umerge.evaluate.run import epoch_eval_hook
    from umerge.unlearn import get_preset, train

    overrides = dict(cfg.unlearn_overrides) if opts.model_dir is None else {}
    runs: dict[str, Any] = {}
    for preset in PRESETS:
        hook = epoch_eval_hook(str(data.dir), max_rows=None, max_new_tokens=cfg.max_new_tokens,
                               batch_size=cfg.eval_batch_size,
                               mia_members=str(data.members) if data.members else None,
                               mia_nonmembers=str(data.nonmembers) if data.nonmembers else None)
        run_dir = out / "runs" / MODEL_NAMES[preset]
        res = train(vanilla, str(data.dir), preset, run_dir, overrides=overrides, eval_hook=hook,
                    progress=opts.progress)
        runs[MODEL_NAMES[preset]] = {
            "preset": preset, "dir": run_dir, "log": res.log_path, "steps": res.steps,
            "config": res.config.to_dict(), "preset_defaults": get_preset(preset).to_dict(),
            "overrides": overrides,
        }
    if not cfg.analyses:
        return runs
    # Figure 3's baseline: NPO alone with model1's budget (no evaluation: only its losses are plotted).
    run_dir = out / "runs" / NPO_ONLY
    res = train(vanilla, str(data.dir), "npo-only", run_dir, overrides=overrides, progress=opts.progress)
    runs[NPO_ONLY] = {"preset": "npo-only", "dir": run_dir, "log": res.log_path, "steps": res.steps,
                      "config": res.config.to_dict(), "preset_defaults": get_preset("npo-only").to_dict(),
                      "overrides": overrides}
    return runs


def _merge_main(cfg: DemoConfig, vanilla: Path, runs: dict[str, Any], out: Path) -> dict[str, Path]:
    from umerge.demo.merging import fold_adapter, merge_adapters, merge_full

    models: dict[str, Path] = {}
    for name in ("model1", "model2"):
        models[name] = fold_adapter(vanilla, runs[name]["dir"], out / "models" / name)
    adapters = [runs["model1"]["dir"], runs["model2"]["dir"]]
    models["merge-ties-factorwise"] = merge_adapters(
        vanilla, adapters, out / "models" / "merge-ties-factorwise", method="ties", density=cfg.density,
        weights=cfg.weights, seed=cfg.seed, adapter_out=out / "models" / "merge-ties-factorwise-adapter")
    models["merge-ties-full"] = merge_full([models["model1"], models["model2"]], vanilla,
                                           out / "models" / "merge-ties-full", method="ties",
                                           density=cfg.density, weights=cfg.weights, seed=cfg.seed)
    return models


def _methods(cfg: DemoConfig, vanilla: Path, runs: dict[str, Any], models: dict[str, Path], ev: _Evaluator,
             out: Path, main_scores: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Table 2: every method, factor-wise on the adapters (PEFT semantics) and on the full updates."""
    from umerge.demo.merging import merge_adapters, merge_full

    rows: list[dict[str, Any]] = []
    adapters = [runs["model1"]["dir"], runs["model2"]["dir"]]
    tmp = out / "methods" / "merged"
    for method in cfg.methods:
        for path in ("factor-wise (PEFT semantics)", "full update"):
            density = None if method == "linear" else cfg.density
            entry: dict[str, Any] = {"method": method, "path": path, "density": density}
            if method == "ties" and path.startswith("factor") and "merge-ties-factorwise" in main_scores:
                entry.update(main_scores["merge-ties-factorwise"])  # the headline merge: already evaluated
                rows.append(entry)
                continue
            if method == "ties" and path.startswith("full") and "merge-ties-full" in main_scores:
                entry.update(main_scores["merge-ties-full"])
                rows.append(entry)
                continue
            target = tmp / f"{method}-{'factorwise' if path.startswith('factor') else 'full'}"
            if path.startswith("factor"):
                merge_adapters(vanilla, adapters, target, method=method, density=cfg.density,
                               weights=cfg.weights, seed=cfg.seed)
            else:
                merge_full([models["model1"], models["model2"]], vanilla, target, method=method,
                           density=cfg.density, weights=cfg.weights, seed=cfg.seed)
            rep = ev(target, f"{method} {path}", out / "methods" / "reports" / target.name)
            entry.update(_scores(rep))
            rows.append(entry)
            shutil.rmtree(target, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    return rows


def _csv_rows(path: Path) -> list[dict[str, Any]]:
    """A figure's CSV as rows of numbers (text kept where a cell is not one)."""
    import csv

    def num(v: str) -> Any:
        try:
            return float(v) if v != "" else None
        except ValueError:
            return v

    with open(path, newline="", encoding="utf-8") as fh:
        return [{k: num(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def _findings(scores: dict[str, dict[str, Any]], out: Path, table2: list[dict[str, Any]]) -> dict[str, Any]:
    """The criteria of `umerge.demo.criteria`, judged on this run, and the sentence they allow."""
    from umerge.demo.criteria import CRITERIA, Outcome, finding_sentence, judge

    def outcome(name: str) -> Outcome | None:
        s = scores.get(name)
        if not s or s.get("mia_auc") is None or s.get("aggregate") is None:
            return None
        mia = json.loads((out / s["report"]).read_text(encoding="utf-8"))["mia"]
        return Outcome(auc=s["mia_auc"], n_members=int(mia["n_member"]), n_nonmembers=int(mia["n_nonmember"]),
                       aggregate=s["aggregate"], forget_regurgitation=s["forget_regurgitation"])

    names = ("vanilla", "model1", "model2", "merge-ties-factorwise", "merge-ties-full")
    got = {n: outcome(n) for n in names}
    f: dict[str, Any] = {"criteria": CRITERIA, "auc": {n: scores.get(n, {}).get("mia_auc") for n in names}}
    v, m1, m2, merge = (got[n] for n in names[:4])
    if v is None or m1 is None or m2 is None or merge is None:
        f["available"] = False
        return f
    f["available"] = True
    f["n_members"], f["n_nonmembers"] = merge.n_members, merge.n_nonmembers
    f["judgement"] = judge(v, m1, m2, merge, table2)
    f["sentence"] = finding_sentence([f["judgement"]])
    full = got["merge-ties-full"]
    if full is not None:  # the same judgement with the full-update merge in the merge's place
        f["judgement_full_update"] = judge(v, m1, m2, full)
    return f


# --------------------------------------------------------------------------------------------------
# Entry point


def run_demo(opts: DemoOptions) -> Path:
    """Run the whole pipeline; return the path of report.md."""
    try:
        import peft  # noqa: F401
        import torch
        import transformers  # noqa: F401
    except ImportError as exc:
        raise InputError(f'the demo needs the train extra (torch, transformers, peft): pip install "umerge[train]" ({exc})') from None

    cfg = opts.resolved_config()
    threads = torch.get_num_threads()
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    try:
        return _run(opts, cfg)
    finally:
        torch.set_num_threads(threads)


def _run(opts: DemoOptions, cfg: DemoConfig) -> Path:
    import torch
    import transformers

    from umerge.analysis import angle_analysis, density_sweep, loss_curves, score_curves, task_curves

    transformers.utils.logging.disable_progress_bar()  # per-file load/save bars: noise in the demo's output
    out = Path(opts.out)
    check_inputs(opts)
    prepare_out(out, opts.overwrite)
    log = _Log(opts.progress)
    torch.manual_seed(cfg.seed)
    t_start = time.perf_counter()

    data: _Data = log.stage("data", lambda: _data(opts, cfg, out))
    ev = _Evaluator(data, cfg, out, opts.progress)
    vanilla, calibration = log.stage("vanilla model (fine-tune until it memorises)",
                                     lambda: _build_vanilla(opts, cfg, data, out, ev, log))
    runs = log.stage("unlearning (zjuklab-model1, zjuklab-model2)", lambda: _unlearn(opts, cfg, data, vanilla, out))
    models = log.stage("merging (TIES factor-wise and full-update)", lambda: _merge_main(cfg, vanilla, runs, out))
    models = {"vanilla": vanilla, **models}
    from umerge.demo.merging import update_geometry

    geometry = update_geometry([runs["model1"]["dir"], runs["model2"]["dir"]],
                               out / "models" / "merge-ties-factorwise-adapter")

    def evaluate_all() -> dict[str, dict[str, Any]]:
        res = {}
        for name, path in models.items():
            rep = ev(path, name, out / "eval" / name)
            res[name] = {**_scores(rep), "report": str((out / "eval" / name / "report.json").relative_to(out))}
            log.say(f"{name}: " + ", ".join(f"{k}={v:.3f}" for k, v in res[name].items() if isinstance(v, float)))
        return res

    scores = log.stage("evaluation", evaluate_all)
    probe: dict[str, Any] | None = None
    if cfg.quantize_probe:
        probe = log.stage("quantization probe (forget knowledge after int4)",
                          lambda: _quantization_probe(cfg, data, models))
        for name, value in probe["forget_knowledge_int4"].items():
            scores[name]["forget_knowledge_int4"] = value

    figures_dir = out / "figures"
    figures: dict[str, str] = {}

    figure_data: dict[str, Any] = {}

    def curves() -> None:
        logs = {"model1": runs["model1"]["log"], "model2": runs["model2"]["log"]}
        loss_labels = {"model1": "model1 (NPO+GDR+KLR)", NPO_ONLY: "NPO alone (model1's budget)",
                       "model2": "model2 (NPO+GDR+KLR)"}
        p = loss_curves([runs[n]["log"] for n in loss_labels], figures_dir, labels=list(loss_labels.values()))
        figures["loss_curves"] = str(p["figure"].relative_to(out))
        figure_data["loss_curves"] = _csv_rows(p["csv"])
        p = task_curves(logs, figures_dir)
        figures["task_curves"] = str(p["figure"].relative_to(out))
        figure_data["task_curves"] = json.loads(p["json"].read_text(encoding="utf-8"))
        p = score_curves(logs, figures_dir)
        figures["score_curves"] = str(p["figure"].relative_to(out))
        figure_data["score_curves"] = json.loads(p["json"].read_text(encoding="utf-8"))
        p = angle_analysis({n: runs[n]["dir"] for n in logs}, figures_dir, logs=logs)
        figures["angles"] = str(p["figure"].relative_to(out))
        figure_data["angles"] = json.loads(p["json"].read_text(encoding="utf-8"))

    if cfg.analyses:
        log.stage("analyses: loss curves, task and score curves, angles", curves)

    from umerge.demo.merging import merge_adapters

    adapters = [runs["model1"]["dir"], runs["model2"]["dir"]]

    def sweep() -> list[dict[str, Any]]:
        res = density_sweep(
            lambda d, target: merge_adapters(vanilla, adapters, target, method="ties", density=d,
                                             weights=cfg.weights, seed=cfg.seed),
            lambda merged: ev(merged, f"ties factor-wise d={Path(merged).name}"),
            out / "sweep", densities=cfg.sweep_densities, progress=False)
        shutil.copyfile(res["figure"], figures_dir / "density_sweep.png")
        figures["density_sweep"] = "figures/density_sweep.png"
        return res["rows"]

    sweep_rows: list[dict[str, Any]] = []
    method_rows: list[dict[str, Any]] = []
    if cfg.analyses:
        sweep_rows = log.stage("density sweep (TIES factor-wise)", sweep)
        method_rows = log.stage("merge-method comparison", lambda: _methods(cfg, vanilla, runs, models, ev, out, scores))
    if method_rows:
        from umerge.analysis import methods_table

        methods_table({f"{m['method']}, {m['path']}": m for m in method_rows}, figures_dir)
        figures["methods"] = "figures/methods.png"

    comparison: dict[str, Any] | None = None
    if cfg.compare_methods:
        from umerge.demo.compare import compare_methods

        def probe_int4(compared: dict[str, Path]) -> dict[str, float | None]:
            return _quantization_probe(cfg, data, {"vanilla": vanilla, **compared})["forget_knowledge_int4"]

        overrides = dict(cfg.unlearn_overrides) if opts.model_dir is None else {}
        comparison = log.stage("unlearning methods compared", lambda: compare_methods(
            cfg, data.dir, vanilla, scores, out, lambda m, name, d: ev(m, name, d),
            probe_int4 if cfg.quantize_probe else None, overrides, say=log.say, progress=opts.progress))

    report: dict[str, Any] = {
        "format": FORMAT,
        "command": opts.command(),
        "config": cfg.to_dict(),
        "seeds": {"world": cfg.seed if data.synthetic else None, "model_init": cfg.seed, "vanilla_finetune": cfg.seed,
                  "unlearning": {n: r["config"]["seed"] for n, r in runs.items()}, "dare": cfg.seed},
        "data": {"dir": str(data.dir), "synthetic": data.synthetic,
                 "mia": bool(data.members), "mmlu": str(data.mmlu) if data.mmlu else None,
                 "subset": data.subset},
        "calibration": calibration,
        "unlearning": {n: {k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()} for n, r in runs.items()},
        "unlearning_note": UNLEARN_SCALING_NOTE if opts.model_dir is None else None,
        "models": {n: str(p) for n, p in models.items()},
        "scores": scores,
        "quantization_probe": probe,
        "table1": ["vanilla", "model1", "model2", "merge-ties-factorwise", "merge-ties-full"],
        "table2": method_rows,
        "sweep": sweep_rows,
        "figures": figures,
        "figure_data": figure_data,
        "findings": _findings(scores, out, method_rows),
        **({"method_comparison": comparison} if comparison is not None else {}),
        "factorwise_update": geometry,
        "timings_s": {**log.timings, "total": round(time.perf_counter() - t_start, 1)},
        "environment": {"python": sys.version.split()[0], "torch": torch.__version__,
                        "threads": torch.get_num_threads()},
    }
    report["table1"] = [n for n in report["table1"] if n in scores]
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    from umerge.demo.render import render_report

    md = out / "report.md"
    md.write_text(render_report(json.loads((out / "report.json").read_text(encoding="utf-8"))), encoding="utf-8")
    log.say(f"total {report['timings_s']['total']:.1f}s")
    return md
