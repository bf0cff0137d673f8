"""Evaluate a model end to end, or re-score saved generations and losses without one.

`evaluate` loads the model (a directory, optionally with a PEFT adapter, or an in-memory
``(model, tokenizer)`` pair), generates on the forget and retain rows, takes the MIA losses and
MMLU accuracy when asked, scores everything with `umerge.evaluate.metrics`, and writes into
``out``:

* ``report.json`` (official keys, see `umerge.evaluate.report`) and ``report.md``;
* ``generations.jsonl``: ``{"id", "task", "split", "input", "output", "generation"}`` per row;
* ``mia_losses.jsonl``: ``{"id", "split", "loss", "token_logprobs", "token_zscores", "zlib_bytes"}``;
* ``mmlu.json``: the MMLU result (``average_acc`` included, the key the official scorer read);
* ``scores.png`` and ``mia_losses.png``: the report's figures.

With ``quantize="int4"`` (or ``"int8"``) the model directory is first fake-quantized
(`umerge.quantize`: the linear weights rounded to the integer grid, group-wise, and written back in
full precision; with an adapter, the adapter is folded into the model first, `umerge.fold`) into
a temporary directory, that model is scored, and the directory is removed; ``meta["quantized"]``
records how. This checks whether unlearning survives quantization (Zhang et al. 2025,
arXiv:2410.16454, saw forgotten knowledge come back after 4-bit quantization).

`score_only` reads the two jsonl files (and optionally an MMLU result) and produces the same
report, so any run can be re-scored, and scoring is testable without torch.

``out`` is a directory, or a path ending in ``.json``: then the report is written there, the
Markdown beside it with the same stem and ``.md``, and the other files beside it under their
fixed names.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from umerge.errors import InputError
from umerge.evaluate import data as data_io
from umerge.evaluate import metrics
from umerge.evaluate.metrics import DEFAULT_MIN_K
from umerge.evaluate.report import EvalReport, build_report


def output_paths(out: str | Path) -> dict[str, Path]:
    """Where each output file goes for an ``out`` directory or ``.json`` report path."""
    p = Path(out)
    if p.suffix == ".json":
        d, report = p.parent, p
    else:
        d, report = p, p / "report.json"
    return {
        "report": report,
        "markdown": report.with_suffix(".md"),
        "generations": d / "generations.jsonl",
        "losses": d / "mia_losses.jsonl",
        "mmlu": d / "mmlu.json",
    }


def write_outputs(
    report: EvalReport,
    out: str | Path,
    generations: Iterable[Mapping[str, Any]] | None = None,
    losses: Iterable[Mapping[str, Any]] | None = None,
    mmlu: Mapping[str, Any] | None = None,
    figures: bool = True,
    figure_losses: Iterable[Mapping[str, Any]] | None = None,
) -> dict[str, Path]:
    """Write the report (JSON, Markdown), whatever rows are given, and the report's figures
    (``scores.png``, ``mia_losses.png``; see `umerge.analysis.report_figures`); return the paths.

    ``figure_losses`` draws the MIA figure from loss rows that are not to be written again
    (re-scoring).
    """
    paths = output_paths(out)
    written: dict[str, Path] = {}
    loss_rows = list(losses) if losses is not None else None
    if generations is not None:
        data_io.write_jsonl(paths["generations"], generations)
        written["generations"] = paths["generations"]
    if loss_rows is not None:
        data_io.write_jsonl(paths["losses"], loss_rows)
        written["losses"] = paths["losses"]
    if mmlu is not None:
        paths["mmlu"].parent.mkdir(parents=True, exist_ok=True)
        paths["mmlu"].write_text(json.dumps(mmlu, indent=2) + "\n", encoding="utf-8")
        written["mmlu"] = paths["mmlu"]
    if figures:
        try:
            from umerge.analysis.report_figures import report_figures

            fig_losses = loss_rows if loss_rows is not None else (list(figure_losses) if figure_losses else None)
            written.update(report_figures(report, fig_losses, paths["report"].parent))
        except InputError as exc:  # matplotlib missing: the numbers still get written
            report.warnings.append(f"figures skipped: {exc}")
    written["report"] = report.save(paths["report"])
    paths["markdown"].write_text(report.to_markdown(), encoding="utf-8")
    written["markdown"] = paths["markdown"]
    return written


def _read_mmlu_result(mmlu: float | str | Path | Mapping[str, Any] | None) -> Any:
    if mmlu is None or isinstance(mmlu, (int, float, Mapping)):
        return mmlu
    p = Path(mmlu)
    if not p.is_file():
        raise InputError(f"{p}: no such MMLU result file (a JSON object with 'accuracy' or 'average_acc')")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{p}: not valid JSON ({exc.msg})") from None


def score_only(
    generations_path: str | Path,
    mia_losses_path: str | Path | None = None,
    out: str | Path | None = None,
    *,
    mmlu: float | str | Path | Mapping[str, Any] | None = None,
    min_k: float = DEFAULT_MIN_K,
    name: str | None = None,
) -> EvalReport:
    """Score saved GENERATIONS (and LOSSES) rows without a model; write the report when ``out`` is given.

    ``mmlu`` is an accuracy, an MMLU result mapping, or a JSON file holding one (``mmlu.json``).
    """
    gens = data_io.load_generations(generations_path)
    losses = data_io.load_losses(mia_losses_path) if mia_losses_path is not None else None
    meta: dict[str, Any] = {"generations": str(generations_path), "rows": len(gens)}
    if name:
        meta["name"] = name
    if mia_losses_path is not None:
        meta["mia_losses"] = str(mia_losses_path)
    report = build_report(gens, losses, _read_mmlu_result(mmlu), meta=meta, min_k=min_k)
    if out is not None:
        write_outputs(report, out, figure_losses=losses)
    return report


def load_model(
    model: Any, adapter: str | Path | None = None, device: str | None = None
) -> tuple[Any, Any, dict[str, Any], Any]:
    """(model, tokenizer, meta, cleanup) from a directory or a ``(model, tokenizer)`` pair.

    A directory is loaded in bfloat16 on CUDA, float32 on the CPU; an adapter on it is merged in
    (``merge_and_unload``) for speed. An in-memory model is used where it is; an adapter is wrapped
    around it and removed again afterwards (``cleanup``) so the caller's model is left unchanged.
    """
    from umerge.evaluate._torch import require_torch, require_transformers

    torch = require_torch()
    require_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta: dict[str, Any] = {}
    cleanup = None
    if isinstance(model, (str, Path)):
        path = Path(model)
        if not (path / "config.json").is_file():
            raise InputError(f"{path}: not a model directory (no config.json)")
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
        m = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(dev)
        tok = AutoTokenizer.from_pretrained(str(path))
        meta.update(model=str(path), device=dev, dtype=str(dtype).replace("torch.", ""))
        if adapter is not None:
            m = _peft(m, adapter).merge_and_unload()
    elif isinstance(model, (tuple, list)) and len(model) == 2:
        m, tok = model
        meta.update(model=type(m).__name__, device=str(next(m.parameters()).device))
        if adapter is not None:
            m = _peft(m, adapter)
            cleanup = m
    else:
        raise InputError("model must be a model directory or a (model, tokenizer) pair")
    if adapter is not None:
        meta["adapter"] = str(adapter)
    return m, tok, meta, cleanup


def _peft(model: Any, adapter: str | Path) -> Any:
    try:
        from peft import PeftModel
    except ImportError as exc:
        raise InputError('evaluating an adapter needs peft: pip install "umerge[train]"') from exc
    a = Path(adapter)
    if not (a / "adapter_config.json").is_file():
        raise InputError(f"{a}: not a PEFT adapter directory (no adapter_config.json)")
    return PeftModel.from_pretrained(model, str(a))


def evaluate(
    model: Any,
    data: Any,
    adapter: str | Path | None = None,
    mia_members: Any = None,
    mia_nonmembers: Any = None,
    mmlu_dir: str | Path | None = None,
    out: str | Path | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    progress: bool = True,
    *,
    max_rows: int | None = None,
    mmlu_k_shot: int = 5,
    min_k: float = DEFAULT_MIN_K,
    name: str | None = None,
    device: str | None = None,
    quantize: str | None = None,
    group_size: int | None = 128,
) -> EvalReport:
    """Evaluate a model with the SemEval-2025 Task 4 metrics and return the report.

    ``model``: a model directory or an in-memory ``(model, tokenizer)`` pair. ``data``: what
    `umerge.evaluate.data.load_eval_data` takes (a directory with forget/retain files, or
    ``{"forget": rows, "retain": rows}``). ``mia_members``/``mia_nonmembers``: JSON-lines files or
    lists of rows/strings (both or neither). ``max_rows`` keeps, in each split, the first N rows of
    each task and kind (so a quick run still scores all 12 values). ``quantize`` (``"int4"`` or
    ``"int8"``, with ``group_size`` input columns per scale, -1 for one per row) scores the model
    fake-quantized (see the module docstring); it needs a model directory.
    Writes the files listed in the module docstring when ``out`` is given.
    """
    if (mia_members is None) != (mia_nonmembers is None):
        raise InputError("the MIA needs both members and nonmembers (--mia-members and --mia-nonmembers)")
    rows = data_io.load_eval_data(data)
    if max_rows is not None:
        rows = {s: data_io.head_per_task(r, max_rows) for s, r in rows.items()}
    members = data_io.load_mia_documents(mia_members, "member") if mia_members is not None else None
    nonmembers = data_io.load_mia_documents(mia_nonmembers, "nonmember") if mia_nonmembers is not None else None
    if mmlu_dir is not None:
        from umerge.evaluate.mmlu import load_mmlu

        load_mmlu(mmlu_dir)  # fail on a bad directory before the slow work
    start = time.perf_counter()
    quantized_dir, quantized = None, None
    if quantize is not None:  # score the quantized copy, the adapter folded into it
        quantized_dir, quantized = _quantized_copy(model, adapter, quantize, group_size, out, progress)
    try:
        if quantized_dir is not None:
            m, tok, meta, cleanup = load_model(quantized_dir / "model", None, device)
            meta.update(model=str(model), quantized=quantized)
            if adapter is not None:
                meta["adapter"] = str(adapter)
        else:
            m, tok, meta, cleanup = load_model(model, adapter, device)
    except BaseException:
        if quantized_dir is not None:
            shutil.rmtree(quantized_dir, ignore_errors=True)
        raise
    try:
        from umerge.evaluate.generate import generate

        flat = [dict(r, split=s) for s in ("forget", "retain") for r in rows[s]]
        texts, gen_stats = generate(
            m, tok, [r["input"] for r in flat], max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress
        )
        generations = [
            {k: r[k] for k in ("id", "task", "split", "input", "output")} | {"generation": g}
            for r, g in zip(flat, texts)
        ]
        losses = None
        mia_stats = None
        if members is not None and nonmembers is not None:
            from umerge.evaluate.mia import document_losses

            losses, mia_stats = document_losses(m, tok, members + nonmembers, batch_size=batch_size, progress=progress)
        mmlu = None
        if mmlu_dir is not None:
            from umerge.evaluate.mmlu import mmlu_accuracy

            mmlu = mmlu_accuracy(m, tok, mmlu_dir, k_shot=mmlu_k_shot, batch_size=batch_size, progress=progress)
            mmlu["dir"] = str(mmlu_dir)
    finally:
        if cleanup is not None:
            cleanup.unload()
        if quantized_dir is not None:
            shutil.rmtree(quantized_dir, ignore_errors=True)
    if name:
        meta["name"] = name
    meta.update(
        data=str(data) if isinstance(data, (str, Path)) else "<in memory>",
        rows={s: len(r) for s, r in rows.items()},
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        generation=gen_stats,
        mia=mia_stats,
        seconds=time.perf_counter() - start,
    )
    report = build_report(generations, losses, mmlu, meta=meta, min_k=min_k)
    if gen_stats["truncated_prompts"]:
        report.warnings.append(
            f"{gen_stats['truncated_prompts']} prompts were longer than the context minus max_new_tokens "
            "and were cut from the left"
        )
    if mia_stats and mia_stats["truncated_documents"]:
        report.warnings.append(
            f"{mia_stats['truncated_documents']} MIA documents were longer than the context and were cut to its length"
        )
    if out is not None:
        write_outputs(report, out, generations, losses, mmlu)
    return report


def _quantized_copy(model: Any, adapter: str | Path | None, quantize: str, group_size: int | None,
                    out: str | Path | None, progress: bool) -> tuple[Path, dict[str, Any]]:
    """A temporary directory holding ``model/``: `model` (with `adapter` folded in) fake-quantized;
    and what was done, for the report's meta. The directory lies beside the report when there is an
    output (the same disk as the user chose), else in the system's temporary directory; the caller
    removes it."""
    import umerge
    from umerge.quantization import BITS, group_size_value, select_tensors

    if quantize not in BITS:
        raise InputError(f"--quantize {quantize!r} is not one of {', '.join(BITS)}")
    g = group_size_value(group_size)
    if not isinstance(model, (str, Path)):
        raise InputError("--quantize needs a model directory (an in-memory model cannot be quantized by the engine)")
    path = Path(model)
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: not a model directory (no config.json)")
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise InputError(f"{adapter}: not a PEFT adapter directory (no adapter_config.json)")
    parent = None
    if out is not None:  # nearest existing directory of the report: nothing is created for a failed run
        parent = output_paths(out)["report"].parent.absolute()
        while not parent.is_dir():
            parent = parent.parent
    tmp = Path(tempfile.mkdtemp(prefix=".umerge-eval-quantized-", dir=parent))
    try:
        source = path
        if adapter is not None:
            umerge.fold(str(adapter), base=str(path), out=str(tmp / "folded"), progress=progress)
            source = tmp / "folded"
        tensors = select_tensors(source)
        report = umerge.quantize(source, tmp / "model", bits=BITS[quantize], group_size=group_size, progress=progress)
        if adapter is not None:
            shutil.rmtree(tmp / "folded")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info: dict[str, Any] = {
        "scheme": quantize, "bits": BITS[quantize], "group_size": -1 if g is None else g,
        "rounding": "round to nearest, ties to even; symmetric, scale = max|w| / (2^(bits-1) - 1) per group",
        "tensors": len(tensors), "adapter_folded_first": adapter is not None, "seconds": round(report.seconds, 3),
    }
    return tmp, info


def per_task_scores(rep: Any) -> dict[str, float | None]:
    """``{"forget/Task1/regurgitation": v, ...}``: each split's regurgitation and knowledge per task."""
    out: dict[str, float | None] = {}
    for split_name, split in (("forget", rep.forget_set), ("retain", rep.retain_set)):
        for task in metrics.split_tasks(split):
            for metric, key in (("regurgitation", metrics.REGURGITATION), ("knowledge", metrics.KNOWLEDGE)):
                value = split[task].get(key)
                out[f"{split_name}/{task}/{metric}"] = None if value is None else float(value)
    return out


def epoch_eval_hook(
    data: Any,
    *,
    max_rows: int | None = 8,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    mia_members: Any = None,
    mia_nonmembers: Any = None,
) -> Any:
    """A trainer eval hook ``(model, tokenizer, epoch) -> dict`` for the paper's score curves.

    Evaluates the in-training model on a subset (``max_rows`` per task and kind in each split)
    and returns flat scores: ``task_aggregate``, ``forget_regurgitation``, ``forget_knowledge``,
    ``retain_regurgitation``, ``retain_knowledge``, the same per task as
    ``{split}/{task}/{regurgitation|knowledge}`` (the paper's Figure 2, e.g.
    ``forget/Task1/regurgitation``), and ``mia_auc``/``mia_score`` when MIA documents are given.
    Pass it as ``umerge.unlearn.train(..., eval_hook=epoch_eval_hook(data))``; the trainer calls it
    at epoch 0 (the starting model) too.
    """
    rows = data_io.load_eval_data(data)

    def hook(model: Any, tokenizer: Any, epoch: int) -> dict[str, Any]:
        rep = evaluate(
            (model, tokenizer), rows, mia_members=mia_members, mia_nonmembers=mia_nonmembers,
            batch_size=batch_size, max_new_tokens=max_new_tokens, progress=False, max_rows=max_rows,
        )
        out = {
            "task_aggregate": rep.task_aggregate,
            "forget_regurgitation": rep.forget_set.get("overall-regurgitation-score"),
            "forget_knowledge": rep.forget_set.get("overall-knowledge-score"),
            "retain_regurgitation": rep.retain_set.get("overall-regurgitation-score"),
            "retain_knowledge": rep.retain_set.get("overall-knowledge-score"),
        }
        out.update(per_task_scores(rep))
        if rep.mia is not None:
            out["mia_auc"] = rep.mia_auc
            out["mia_score"] = rep.mia_final_score
        return out

    return hook
