"""`umerge train` (unlearn on LoRA or every weight, with ZJUKLAB's NPO + KLR + GDR or another method)
and `umerge presets` (list the recipes).

A thin layer over `umerge.unlearn.train`: options are parsed here, everything else happens there.
torch is imported only when `train` runs; without the `train` extra the command says what to install.
For several GPUs, run the same options through accelerate:
    accelerate launch --num_processes 4 -m umerge.cli.train --model M --data D --preset zjuklab-model1 -o OUT
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import click

from umerge.errors import InputError
from umerge.unlearn.presets import METHOD_ALIASES, METHODS

_NEEDED = ("torch", "transformers", "peft", "accelerate")


def _require_train_extra() -> None:
    missing = [m for m in _NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(
            f"`umerge train` needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed: "
            'pip install "umerge[train]"'
        )


@click.command("train")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path), help="Starting model directory (also the frozen reference).")
@click.option("--data", "data", type=click.Path(path_type=Path),
              help="Directory with forget.* and retain.* (jsonl, parquet, json), or one file with a split column.")
@click.option("--forget", "forget", type=click.Path(path_type=Path), help="Forget file (overrides --data's).")
@click.option("--retain", "retain", type=click.Path(path_type=Path), help="Retain file (overrides --data's).")
@click.option("--preset", default=None,
              help="zjuklab-model1, zjuklab-model2, npo-only or a method's preset (see `umerge presets`). "
                   "Default: zjuklab-model1, or with --method the method's own preset.")
@click.option("--method", type=click.Choice([*METHODS, *METHOD_ALIASES]), default=None,
              help="The unlearning objective (see below). Alone it starts from the method's preset; with --preset "
                   "or --config it replaces that config's method and keeps the rest.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="A JSON/YAML config file instead of a preset.")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output directory (adapters, log, config).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config field, e.g. --set epochs=3 --set ga_ratio=0.5 (repeatable).")
@click.option("--resume", is_flag=True, help="Continue the run in OUT from its last saved epoch.")
@click.option("--gradient-checkpointing", is_flag=True, default=None, help="Trade compute for memory (recompute activations).")
@click.option("--eval-nll-rows", type=int, default=0, show_default=True, metavar="N",
              help="After each epoch, log the answer NLL of the first N forget and retain rows (0: off).")
@click.option("--eval-score-rows", type=int, default=0, show_default=True, metavar="N",
              help="Before training (epoch 0) and after each epoch, score the model with the task's metrics on up to N "
                   "rows per task and kind of each split, logging per-task regurgitation and knowledge for "
                   "`umerge analyze task-curves` (0: off; needs --data).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(
    model_dir: Path,
    data: Path | None,
    forget: Path | None,
    retain: Path | None,
    preset: str | None,
    method: str | None,
    config_file: Path | None,
    out: Path,
    overrides: tuple[str, ...],
    resume: bool,
    gradient_checkpointing: bool | None,
    eval_nll_rows: int,
    eval_score_rows: int,
    quiet: bool,
) -> None:
    """Unlearn a forget set, by default with NPO + KL + retain NLL on LoRA (ZJUKLAB's recipe).

    \b
    Writes OUT/epoch-K/ (adapter after each epoch), the final adapter in OUT/, OUT/train_log.jsonl
    (one JSON line per optimizer step: the loss and each of the method's terms) and
    OUT/train_config.json. With --set finetune=full every weight is trained instead (beside a frozen
    copy of the starting model) and OUT/ and OUT/epoch-K/ hold whole models.
    \b
    Examples:
        umerge train --model vanilla/ --data lume/ --preset zjuklab-model2 -o model2/ --set epochs=3
        umerge train --model vanilla/ --data lume/ --method simnpo -o simnpo/
        umerge train --model vanilla/ --data lume/ --method rmu --set rmu_layer=3 -o rmu/
        umerge train --model vanilla/ --data lume/ --method npo --set finetune=full -o npo-full/

    \b
    Methods (--method; f = forget batch, r = retain batch; formulas and sources in
    umerge.unlearn.methods; each method's parameters with `umerge presets`):
      npo_gdr_klr  npo_weight NPO(f) + kl_weight KL(p_ref||p)(r) + retain_weight NLL(r)  (ZJUKLAB)
      grad_ascent  -forget_weight NLL(f)
      grad_diff    -forget_weight NLL(f) + retain_weight NLL(r)
      npo          forget_weight NPO(f) + retain_weight NLL(r)  (Zhang et al. 2024)
      simnpo       forget_weight SimNPO(f) + retain_weight NLL(r), no reference  (Fan et al. 2024)
      dpo          forget_weight DPO(refusal over f's answer) + retain_weight NLL(r)  (alias idkdpo)
      rmu          forget_weight MSE(h_l(f), c u) + rmu_alpha MSE(h_l(r), h_l_ref(r))  (WMDP's RMU)
      undial       forget_weight CE(softmax(z_ref - undial_beta onehot(y)), p)(f) + retain_weight NLL(r)

    Loss weights of npo_gdr_klr: npo_weight, kl_weight, retain_weight; the reference code's names are
    accepted as aliases: ga_ratio = npo_weight, gd_ratio = kl_weight, gk_ratio = retain_weight.

    \b
    Several GPUs (DDP; FSDP or DeepSpeed through an accelerate config file):
        accelerate launch --num_processes 4 -m umerge.cli.train --model M --data D -o OUT --set grad_accum=1
    """
    from umerge.unlearn.data import load_task_data
    from umerge.unlearn.presets import METHOD_PRESETS, parse_override, resolve_config

    if preset is not None and config_file is not None:
        raise InputError("give --preset or --config, not both")
    if data is None and (forget is None or retain is None):
        raise InputError("give --data DIR, or both --forget FILE and --retain FILE")
    if method is not None:
        method = METHOD_ALIASES.get(method, method)
        if any(parse_override(o)[0] == "method" for o in overrides):
            raise InputError("give --method or --set method=..., not both")
        overrides = (f"method={method}", *overrides)
    default = METHOD_PRESETS[method] if method is not None else "zjuklab-model1"
    base = str(config_file) if config_file is not None else (preset or default)
    cfg = resolve_config(base, overrides)  # config errors before the heavy imports
    task = load_task_data(data, forget=forget, retain=retain)  # data errors too
    _require_train_extra()

    if eval_nll_rows < 0 or eval_score_rows < 0:
        raise InputError(f"--eval-nll-rows and --eval-score-rows must be >= 0, got {eval_nll_rows} and {eval_score_rows}")
    if eval_nll_rows and eval_score_rows:
        raise InputError("give --eval-nll-rows or --eval-score-rows, not both")
    if eval_score_rows and data is None:
        raise InputError("--eval-score-rows needs --data DIR (the rows to score, with their task names)")
    from umerge.unlearn.trainer import make_nll_hook
    from umerge.unlearn.trainer import train as run_train

    hook = make_nll_hook(task, eval_nll_rows, cfg.max_length, cfg.prompt_fraction) if eval_nll_rows else None
    if eval_score_rows:
        from umerge.evaluate.run import epoch_eval_hook

        hook = epoch_eval_hook(str(data), max_rows=eval_score_rows)
    result = run_train(
        model_dir,
        task,
        cfg,
        out,
        eval_hook=hook,
        progress=not quiet,
        resume=resume,
        gradient_checkpointing=True if gradient_checkpointing else None,
    )
    if not result.is_main_process:
        return
    last = result.last
    summary = "no steps"
    if last:
        ref = f" (ref {last['forget_nll_ref']:.3f})" if "forget_nll_ref" in last else ""
        summary = f"{cfg.method}: loss {last['loss']:.4f}, forget NLL {last['forget_nll']:.3f}{ref}"
    what = "model" if cfg.finetune == "full" else "adapter"
    click.echo(f"umerge: trained {result.steps} steps ({summary}); {what} in {result.adapter_dir}, log in {result.log_path}")


@click.command("presets")
@click.option("--show", "show", default=None, metavar="NAME", help="Print the full config of one preset as YAML.")
def presets(show: str | None) -> None:
    """List the unlearning presets (the method, its parameters, the batch size), or print one in full.

    \b
    Each line: NAME: the parameters its method reads, then the optimisation settings, the method.
    `umerge train --method NAME` alone starts from that method's preset.
    """
    from umerge.unlearn.presets import METHOD_PARAMS, PRESET_NOTES, PRESETS, get_preset

    if show is not None:
        click.echo(get_preset(show).to_yaml(), nl=False)
        return
    for name in PRESETS:
        cfg = get_preset(name)
        # The reductions are in --show; npo_gdr_klr's lines keep the three weights first, as they always read.
        hidden = {"npo_reduction", "kl_reduction"} | ({"beta"} if cfg.method == "npo_gdr_klr" else set())
        params = " ".join(f"{p}={getattr(cfg, p)}" for p in METHOD_PARAMS[cfg.method] if p not in hidden)
        click.echo(
            f"{name}: {params} batch_size={cfg.batch_size} grad_accum={cfg.grad_accum} epochs={cfg.epochs} "
            f"lr={cfg.lr} method={cfg.method}  # {PRESET_NOTES[name]}"
        )


if __name__ == "__main__":  # `accelerate launch -m umerge.cli.train ...` runs the train command
    from umerge.cli import main

    main(["train", *sys.argv[1:]])
