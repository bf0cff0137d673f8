"""The unlearning loop: LoRA (or every weight) on the starting model, per-epoch checkpoints, resumable.

What one optimizer step does (see `losses.py` and `methods.py` for the formulas):

1. a micro-batch holds `batch_size` forget rows and their paired retain rows;
2. `umerge.unlearn.step.step_terms` gives its loss, the function researchers can call themselves:
   the rows tokenised as the reference trainer did, all of a step's rows through the model in one
   forward pass, the reference logits (for the methods that use them) from the same model with the
   LoRA adapter switched off (`PeftModel.disable_adapter()`), in eval mode under no_grad, so the
   reference is exactly the starting model and no second copy of the weights is held;
3. the loss of `config.method`: by default ZJUKLAB's npo_weight * NPO(forget) + kl_weight *
   KL(p_ref || p_theta)(retain) + retain_weight * NLL(retain); or grad_ascent, grad_diff, npo, simnpo,
   dpo, rmu, undial (`umerge.unlearn.methods`). It is backpropagated into the trained parameters
   only; gradients accumulate over `grad_accum` micro-batches, are clipped to `max_grad_norm`, and
   AdamW steps; the learning rate warms up linearly over `warmup_epochs` epochs and decays linearly
   to 0 at the end.

What is trained (config `finetune`): "lora" (the default), LoRA factors on every linear layer but
lm_head (or `lora_targets`); "full", every weight of the model, beside a frozen copy of the starting
model as the reference (held only for the methods that use one; it doubles the weights' memory).
`rmu` trains only the layers it names (`rmu_trainable_layers`): with LoRA, adapters on those layers
alone (PEFT's `layers_to_transform`); in full fine-tuning, only those layers' weights require grad.

Precision: bf16 weights on CUDA, float32 on CPU (config `dtype`); LoRA factors stay float32 (PEFT's
default). Optimizer: `bitsandbytes.optim.PagedAdamW` when bitsandbytes is installed and the run is on
CUDA (config optimizer "auto"), else `torch.optim.AdamW`.

Several GPUs or nodes: everything goes through `accelerate.Accelerator` (device placement, DDP/FSDP/
DeepSpeed wrapping, gradient accumulation, gradient sync, clipping); nothing is home-made. Launch with
`accelerate launch` instead of `umerge train`:

    accelerate launch --num_processes 4 -m umerge.cli.train --model M --data D --preset zjuklab-model1 -o OUT
    accelerate launch --config_file fsdp.yaml -m umerge.cli.train ...        # FSDP (see `accelerate config`)
    accelerate launch --use_deepspeed --zero_stage 2 -m umerge.cli.train ... # DeepSpeed ZeRO-2

    ACCELERATE_USE_CPU=true torchrun --standalone --nproc_per_node 2 -m umerge.cli.train ...  # DDP on CPU (gloo)

`batch_size` is per process, so the effective batch is batch_size * grad_accum * processes; keep it at
the paper's value by lowering grad_accum (`--set grad_accum=1` on 4 GPUs). What is tested: one process,
and DDP with two CPU processes (the torchrun line above; each process sees half the forget rows, the
main process alone writes the log and the adapters). FSDP and DeepSpeed go through the same
`Accelerator` calls (the adapter is gathered with `accelerator.get_state_dict` before saving) but have
not been run here; their optimizer state is sharded and is not saved, so `--resume` restores the
adapter, the schedule and the counters, and AdamW restarts its moments (with a warning).

Output directory:
    OUT/train_config.json           the resolved config
    OUT/train_log.jsonl             {"type": "step", ...} per optimizer step (the loss, each of the
                                    method's terms and its monitors), {"type": "eval", ...} per epoch hook
    OUT/epoch-{k}/                  adapter after epoch k (adapter_config.json, adapter_model.safetensors);
                                    with finetune "full", the whole model (config.json, model.safetensors,
                                    tokenizer files), loadable as a model directory
    OUT/epoch-{k}/trainer_state.pt  optimizer, scheduler, RNG and counters (kept for the last epoch only)
    OUT/adapter_config.json, OUT/adapter_model.safetensors, tokenizer files: the final adapter
                                    (with finetune "full": the final model)
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from umerge.errors import InputError
from umerge.unlearn import methods
from umerge.unlearn.data import TaskData, load_task_data
from umerge.unlearn.losses import token_nll
from umerge.unlearn.presets import UnlearnConfig, resolve_config
from umerge.unlearn.step import step_terms
from umerge.unlearn.tokenize import EpochShuffleSampler, UnlearnDataset, collate, encode_rows, pair_rows

EvalHook = Callable[[Any, Any, int], Mapping[str, Any]]

STATE_FILE = "trainer_state.pt"
#: Config fields a resumed run may change (everything else must match the saved run).
_RESUME_MAY_CHANGE = frozenset({"preset", "gradient_checkpointing", "save_every_epoch", "dtype", "optimizer"})
LOG_FILE = "train_log.jsonl"
CONFIG_FILE = "train_config.json"


@dataclass
class TrainResult:
    """Where a run put its outputs, and a summary of it."""

    out_dir: Path
    adapter_dir: Path  # the final adapter, or with finetune "full" the final model (== out_dir)
    epoch_dirs: list[Path]  # OUT/epoch-1 .. OUT/epoch-K that exist
    log_path: Path
    config: UnlearnConfig
    steps: int  # optimizer steps taken in total (including before a resume)
    resumed_from_epoch: int = 0
    last: dict[str, float] = field(default_factory=dict)  # the last logged step
    is_main_process: bool = True  # False in the other processes of a distributed run


def load_causal_lm(path: str | Path, dtype: torch.dtype) -> Any:
    """`AutoModelForCausalLM.from_pretrained` in `dtype` (the keyword is `dtype` from transformers
    4.56, `torch_dtype` before)."""
    import transformers
    from transformers import AutoModelForCausalLM

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return AutoModelForCausalLM.from_pretrained(str(path), **{key: dtype})


def _resolve_dtype(cfg: UnlearnConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[cfg.dtype]


def lora_target_modules(model: torch.nn.Module, exclude: Iterable[str] = ("lm_head",)) -> list[str]:
    """Names (last path component) of every nn.Linear in `model`, except those named in `exclude`.

    For OLMo/Llama this is q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.
    """
    excluded = set(exclude)
    names: set[str] = set()
    for full, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            leaf = full.rsplit(".", 1)[-1]
            if leaf not in excluded:
                names.add(leaf)
    if not names:
        raise InputError("the model has no linear layers to put LoRA on")
    return sorted(names)


def _enable_checkpointing(model: Any) -> None:
    """Recompute activations in backward. Non-reentrant checkpointing, so the frozen embeddings need
    no `enable_input_require_grads` hack under LoRA. transformers 5 renamed the method."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _params_sharded(accelerator: Any) -> bool:
    """True under FSDP and DeepSpeed, where parameters or optimizer state live in shards."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def _save_adapter(accelerator: Any, model: Any, unwrapped: Any, path: Path, tokenizer: Any = None) -> None:
    """Write the LoRA adapter (adapter_config.json, adapter_model.safetensors) from the main process;
    with full fine-tuning the whole model (and `tokenizer`, so the directory loads as a model).

    Under FSDP/DeepSpeed the full state dict is first gathered by every process
    (`accelerator.get_state_dict`, a collective); PEFT keeps only the adapter's tensors from it.
    """
    state = accelerator.get_state_dict(model) if _params_sharded(accelerator) else None
    if accelerator.is_main_process:
        if state is not None:
            unwrapped.save_pretrained(str(path), state_dict=state)
        else:
            unwrapped.save_pretrained(str(path))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(path))


def _make_optimizer(cfg: UnlearnConfig, params: list[torch.nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    want_paged = cfg.optimizer == "paged_adamw" or (cfg.optimizer == "auto" and device.type == "cuda")
    if want_paged:
        try:
            import bitsandbytes as bnb  # type: ignore[import-not-found]

            return bnb.optim.PagedAdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        except ImportError:
            if cfg.optimizer == "paged_adamw":
                raise InputError("optimizer paged_adamw needs bitsandbytes (pip install bitsandbytes)") from None
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _existing_epochs(out: Path) -> list[int]:
    ks = []
    for p in out.glob("epoch-*"):
        try:
            ks.append(int(p.name.split("-", 1)[1]))
        except ValueError:
            continue
    return sorted(ks)


def _truncate_log(log_path: Path, keep_steps: int) -> None:
    """Drop step/eval rows written after the checkpoint we resume from (a crash mid-epoch)."""
    if not log_path.exists():
        return
    kept = []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("type") == "step" and rec.get("step", 0) > keep_steps:
            continue
        if rec.get("type") == "eval" and rec.get("step", 0) > keep_steps:
            continue
        kept.append(line)
    log_path.write_text("".join(x + "\n" for x in kept), encoding="utf-8")


def _log_eval(hook: EvalHook, model: Any, unwrapped: Any, tokenizer: Any, epoch: int, step: int, log_fh: Any) -> None:
    """Run the eval hook on the model in eval mode (adapter active) and log its scores as an eval row."""
    model.eval()
    with torch.no_grad():
        result = dict(hook(unwrapped, tokenizer, epoch))
    model.train()
    rec = {"type": "eval", "epoch": epoch, "step": step, **result}
    if log_fh is not None:
        log_fh.write(json.dumps(rec, default=float) + "\n")
        log_fh.flush()


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def train(
    model_dir: str | Path,
    data: str | Path | TaskData,
    preset_or_config: str | Path | UnlearnConfig | Mapping[str, Any],
    out: str | Path,
    overrides: Iterable[str] | Mapping[str, Any] | None = None,
    eval_hook: EvalHook | None = None,
    progress: bool = True,
    resume: bool = False,
    gradient_checkpointing: bool | None = None,
) -> TrainResult:
    """Unlearn the forget set of `data` from the model in `model_dir` with LoRA (or, with finetune
    "full", every weight); write adapters (or models) to `out`.

    `preset_or_config`: a preset name (zjuklab-model1, zjuklab-model2, npo-only, or a method's preset:
    grad-ascent, grad-diff, simnpo, dpo, rmu, undial), a JSON/YAML config file, an `UnlearnConfig` or
    a dict; `overrides` ("key=value" strings, e.g. "method=simnpo", or a dict) are applied on top.
    `eval_hook(model, tokenizer, epoch) -> dict` runs before training (epoch 0, the starting model;
    not again on resume) and after each epoch (on the main process, model in
    eval mode with the adapter active); its result is logged as {"type": "eval", "epoch": k, ...}.
    `resume=True` continues from the last OUT/epoch-k that holds a trainer state.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, get_linear_schedule_with_warmup

    cfg = resolve_config(preset_or_config, overrides)
    if gradient_checkpointing is not None:
        cfg.gradient_checkpointing = gradient_checkpointing
    out = Path(out)
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise InputError(f"{model_dir}: not a model directory (no config.json)")

    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum)
    is_main = accelerator.is_main_process
    device = accelerator.device
    log_path = out / LOG_FILE

    # -- resume bookkeeping (decided before anything is written) --------------------------------
    start_epoch = 0
    state: dict[str, Any] | None = None
    if out.exists() and any(out.iterdir()):
        if not resume:
            raise InputError(f"{out}: output directory is not empty (pass --resume to continue that run, or choose another -o)")
        saved = [k for k in _existing_epochs(out) if (out / f"epoch-{k}" / STATE_FILE).is_file()]
        if saved:
            start_epoch = saved[-1]
            state = torch.load(out / f"epoch-{start_epoch}" / STATE_FILE, map_location="cpu", weights_only=True)
            prev = state.get("config", {})
            for key, now in cfg.to_dict().items():
                if key in _RESUME_MAY_CHANGE:
                    continue
                if key in prev and prev[key] != now:
                    raise InputError(
                        f"{out}: cannot resume: {key} was {prev[key]!r} in the saved run but is {now!r} now"
                    )
    # Every process has looked at OUT before the main process writes to it.
    accelerator.wait_for_everyone()
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.to_json(out / CONFIG_FILE)
        if state is not None:
            _truncate_log(log_path, int(state["global_step"]))
        elif log_path.exists():
            log_path.unlink()

    set_seed(cfg.seed)

    # -- data -------------------------------------------------------------------------------
    task = load_task_data(data).head(cfg.max_forget_rows, cfg.max_retain_rows)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.eos_token_id is None:
        raise InputError(f"{model_dir}: the tokenizer has no eos token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = UnlearnDataset(task.forget, task.retain, cfg.pairing, cfg.seed)
    sampler = EpochShuffleSampler(len(dataset), cfg.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, collate_fn=pair_rows)

    # -- model --------------------------------------------------------------------------------
    dtype = _resolve_dtype(cfg, device)
    full = cfg.finetune == "full"
    # A resumed full fine-tune continues from its last saved weights; the reference stays the start.
    base = load_causal_lm(out / f"epoch-{start_epoch}" if full and state is not None else model_dir, dtype)
    rmu_train = None
    if cfg.method == "rmu":
        _, rmu_train = methods.rmu_layers(len(methods.decoder_layers(base)), cfg.rmu_layer, cfg.rmu_trainable_layers)
    reference = None
    if full and cfg.method in methods.NEEDS_REFERENCE:
        # disable_adapter is a LoRA device: full fine-tuning compares with a frozen copy of the start.
        reference = load_causal_lm(model_dir, dtype) if state is not None else copy.deepcopy(base)
        reference.requires_grad_(False)
        reference.eval()
        reference.to(device)
    if cfg.gradient_checkpointing:
        _enable_checkpointing(base)
    if full:
        model = base
        if rmu_train is not None:  # only the layers RMU names are trained
            model.requires_grad_(False)
            layers = methods.decoder_layers(model)
            for i in rmu_train:
                layers[i].requires_grad_(True)
    else:
        targets = cfg.lora_targets or lora_target_modules(base)
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=targets,
            bias="none",
            task_type="CAUSAL_LM",
            layers_to_transform=rmu_train,  # None: every layer
        )
        with warnings.catch_warnings():
            # PEFT probes `is_gradient_checkpointing`, which transformers 5 deprecates noisily.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(base, lora)
        if state is not None:
            adapter_file = out / f"epoch-{start_epoch}" / "adapter_model.safetensors"
            set_peft_model_state_dict(model, load_file(str(adapter_file)))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _make_optimizer(cfg, params, device)

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    steps_per_epoch = max(1, math.ceil(len(loader) / cfg.grad_accum))
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))
    # The Hugging Face Trainer's schedule: factor step/warmup, then (total - step)/(total - warmup).
    # Stepped by hand once per optimizer step (not prepared: accelerate would step it once per process).
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    global_step = 0
    if state is not None:
        global_step = int(state["global_step"])
        if "optimizer" in state and not _params_sharded(accelerator):
            optimizer.load_state_dict(state["optimizer"])
        else:
            accelerator.print("umerge: warning: no optimizer state to restore (sharded run); AdamW restarts its moments")
        scheduler.load_state_dict(state["scheduler"])
        if "torch_rng" in state:
            torch.random.set_rng_state(state["torch_rng"])

    unwrapped = accelerator.unwrap_model(model)
    bar = None
    if progress and is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=global_step, desc=f"unlearn {cfg.preset or cfg.method}".strip(), unit="step",
                   dynamic_ncols=True)
    # What each step row holds beside the loss: the method's terms, then its monitors.
    logged = [t for t, _ in methods.OBJECTIVES[cfg.method]]
    logged += [m for m in ("forget_nll", "retain_nll", "forget_nll_ref") if m not in logged]
    saved_tokenizer = tokenizer if full else None

    last: dict[str, float] = {}
    log_fh = open(log_path, "a", encoding="utf-8") if is_main else None
    t_start = time.perf_counter()
    try:
        if eval_hook is not None and is_main and start_epoch == 0:  # epoch 0: the starting model
            _log_eval(eval_hook, model, unwrapped, tokenizer, 0, 0, log_fh)
        accelerator.wait_for_everyone()
        for epoch in range(start_epoch, cfg.epochs):
            # The prepared loader's set_epoch passes the epoch on to our sampler and data set
            # (accelerate would otherwise count epochs from 0 again after a resume).
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)
            model.train()
            acc: dict[str, float] = {}
            n_micro = 0
            tokens = 0
            t_window = time.perf_counter()
            for batch in loader:
                with accelerator.accumulate(model):
                    terms = step_terms(model, reference, batch["forget"], batch["retain"], tokenizer, cfg)
                    tokens += int(terms.pop("tokens"))
                    accelerator.backward(terms["total"])
                    grad_norm = None
                    if accelerator.sync_gradients:
                        if cfg.max_grad_norm is not None:
                            grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                        else:
                            grad_norm = accelerator.clip_grad_norm_(params, float("inf"))
                    lr_used = optimizer.param_groups[0]["lr"]
                    optimizer.step()
                    if accelerator.sync_gradients:
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                for term, v in terms.items():
                    acc[term] = acc.get(term, 0.0) + float(v.detach())
                n_micro += 1
                if accelerator.sync_gradients:
                    global_step += 1
                    means = {k: v / n_micro for k, v in acc.items()}
                    red = accelerator.reduce(torch.tensor([means[k] for k in sorted(means)], device=device), "mean")
                    means = dict(zip(sorted(means), red.tolist()))
                    elapsed = time.perf_counter() - t_window
                    tok_total = int(accelerator.reduce(torch.tensor(tokens, device=device), "sum"))
                    rec = {
                        "type": "step",
                        "step": global_step,
                        "epoch": epoch + 1,
                        "epoch_progress": round(epoch + (global_step - epoch * steps_per_epoch) / steps_per_epoch, 6),
                        "loss": means["total"],
                        **{k: means[k] for k in logged if k in means},
                        "lr": lr_used,
                        "grad_norm": float(grad_norm) if grad_norm is not None else None,
                        "micro_batches": n_micro,
                        "tokens": tok_total,
                        "tokens_per_s": tok_total / elapsed if elapsed > 0 else None,
                        "elapsed_s": round(time.perf_counter() - t_start, 3),
                    }
                    if device.type == "cuda":
                        rec["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                    last = rec
                    if log_fh is not None:
                        log_fh.write(json.dumps(rec) + "\n")
                        log_fh.flush()
                    if bar is not None:
                        bar.update(1)
                        shown = {"loss": _fmt(rec["loss"]), **{t: _fmt(rec[t]) for t, _ in methods.OBJECTIVES[cfg.method]}}
                        bar.set_postfix(ordered_dict={**shown, "epoch": epoch + 1})
                    acc, n_micro, tokens = {}, 0, 0
                    t_window = time.perf_counter()

            # -- end of epoch: save, evaluate ---------------------------------------------------
            accelerator.wait_for_everyone()
            k = epoch + 1
            if cfg.save_every_epoch or k == cfg.epochs:
                edir = out / f"epoch-{k}"
                _save_adapter(accelerator, model, unwrapped, edir, saved_tokenizer)
            if is_main and (cfg.save_every_epoch or k == cfg.epochs):
                trainer_state = {
                    "epoch": k,
                    "global_step": global_step,
                    "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.random.get_rng_state(),
                    "config": cfg.to_dict(),
                }
                if not _params_sharded(accelerator):  # a sharded optimizer's state is per process
                    trainer_state["optimizer"] = optimizer.state_dict()
                torch.save(trainer_state, edir / STATE_FILE)
                for old in _existing_epochs(out):
                    if old != k:
                        stale = out / f"epoch-{old}" / STATE_FILE
                        if stale.exists():
                            stale.unlink()
            if eval_hook is not None and is_main:
                _log_eval(eval_hook, model, unwrapped, tokenizer, k, global_step, log_fh)
            accelerator.wait_for_everyone()
    finally:
        if bar is not None:
            bar.close()
        if log_fh is not None:
            log_fh.close()

    _save_adapter(accelerator, model, unwrapped, out)
    if is_main:
        tokenizer.save_pretrained(str(out))
    accelerator.wait_for_everyone()
    epoch_dirs = [out / f"epoch-{k}" for k in _existing_epochs(out)]
    return TrainResult(
        out_dir=out,
        adapter_dir=out,
        epoch_dirs=epoch_dirs,
        log_path=log_path,
        config=cfg,
        steps=global_step,
        resumed_from_epoch=start_epoch,
        last={k: v for k, v in last.items() if isinstance(v, (int, float))},
        is_main_process=is_main,
    )


def batch_nll(
    model: torch.nn.Module, tokenizer: Any, rows: list, max_length: int, batch_size: int = 16, prompt_fraction: float = 0.8
) -> float:
    """Mean token NLL over all answer tokens (+eos) of `rows`, with the training tokenisation."""
    enc = encode_rows(tokenizer, rows, max_length, prompt_fraction)
    device = next(model.parameters()).device
    total, count = 0.0, 0.0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(enc), batch_size):
            b = collate(enc[i : i + batch_size], tokenizer.pad_token_id)
            logits = model(
                input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device), use_cache=False
            ).logits
            nll, m = token_nll(logits, b["labels"].to(device))
            total += float(nll.sum())
            count += float(m.sum())
    if was_training:
        model.train()
    return total / max(count, 1.0)


def make_nll_hook(data: TaskData, n_rows: int | None = 32, max_length: int = 256, prompt_fraction: float = 0.8) -> EvalHook:
    """An epoch hook logging the answer NLL of the first `n_rows` forget and retain rows.

    A cheap stand-in for the paper's score curves (which need generation and the task metrics:
    `umerge.evaluate`); returns {"forget_nll": ..., "retain_nll": ...}.
    """
    forget, retain = list(data.forget[:n_rows]), list(data.retain[:n_rows])

    def hook(model: Any, tokenizer: Any, epoch: int) -> dict[str, float]:
        return {
            "forget_nll": batch_nll(model, tokenizer, forget, max_length, prompt_fraction=prompt_fraction),
            "retain_nll": batch_nll(model, tokenizer, retain, max_length, prompt_fraction=prompt_fraction),
        }

    return hook


__all__ = ["train", "TrainResult", "lora_target_modules", "batch_nll", "make_nll_hook", "EvalHook"]
