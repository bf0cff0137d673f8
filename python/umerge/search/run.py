"""`umerge.search.search`: score many factor-wise merges of the same LoRA adapters, choose one on a
validation split, and report it beside the default merge on a held-out test split.

Steps: load the adapters (`umerge.adapters.lora.load_adapter`) and the base model once
(`umerge.search.inmemory.MergedModel`); split the evaluation data (`umerge.search.split`); for each
candidate of the grid or the random draw (`umerge.search.space`), merge the factors in memory, put
W + ΔW into the model, score it on the validation part with `umerge.evaluate.evaluate` (the
SemEval-2025 Task 4 metrics, unchanged) and restore the weights; choose the best by the objective
(`umerge.search.results.choose`); score the chosen candidate and the default (TIES, density 0.8,
weights 1) on the test part, each once; write the outputs. Nothing is written per candidate.

Outputs, built in a temporary directory beside ``out`` and renamed into place when complete:
``search.csv`` and ``search.md`` (every candidate's recipe and validation scores), ``pareto.png``,
``best.yml`` (the chosen recipe, which ``umerge run best.yml -o DIR`` merges and folds:
`umerge.adapters.recipe`), ``search.json`` (all of it, with the test-split comparison), ``split/``
(the two data parts and split.json) and ``test/{chosen,default}/`` (the test reports).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from umerge.errors import InputError
from umerge.search.results import OBJECTIVES
from umerge.search.space import Candidate, SearchSpace, default_candidate, grid, random_candidates

FORMAT = "umerge-search/1"
MARKER = "search.json"  # --overwrite replaces only a directory that holds one (written by a search)


@dataclass
class SearchOptions:
    """What the user asked for (the CLI's options, in the API's terms)."""

    adapters: Sequence[str | Path]
    base: str | Path
    data: str | Path
    out: str | Path
    space: SearchSpace | None = None  # None: the default space for len(adapters)
    random: int | None = None  # None: the grid; N: N seeded random candidates
    seed: int = 0  # random draws and DARE's masks
    split_seed: int = 0
    objective: str = "final"
    mia_members: str | Path | None = None
    mia_nonmembers: str | Path | None = None
    mmlu_dir: str | Path | None = None
    batch_size: int = 8
    max_new_tokens: int = 256
    max_rows: int | None = None
    mmlu_k_shot: int = 5
    min_k: float = 0.2
    device: str | None = None
    torch_threads: int | None = None
    overwrite: bool = False
    progress: bool = True
    command: str | None = None  # the command line, recorded
    notes: list[str] = field(default_factory=list)  # said to the user and recorded (e.g. data found by layout)


def _log(opts: SearchOptions, msg: str) -> None:
    if opts.progress:
        print(f"[search] {msg}", file=sys.stderr, flush=True)


def candidates_for(opts: SearchOptions, n_adapters: int) -> tuple[list[Candidate], int]:
    """The candidates to score, the default among them (added first when the space lacks it), and
    the default's position."""
    space = opts.space or SearchSpace(n_adapters)
    if space.n_adapters != n_adapters:
        raise InputError(f"the search space is for {space.n_adapters} adapters, {n_adapters} given")
    cands = random_candidates(space, opts.random, opts.seed) if opts.random is not None else grid(space)
    d = default_candidate(n_adapters)
    if d not in cands:
        cands = [d, *cands]
    return cands, cands.index(d)


def _check(opts: SearchOptions) -> Any:
    from umerge.adapters.lora import check_same_modules, load_adapter

    if len(opts.adapters) < 2:
        raise InputError(f"a merge search needs at least two adapters (got {len(opts.adapters)})")
    if opts.objective not in OBJECTIVES:
        raise InputError(f"unknown objective {opts.objective!r} (choose from {', '.join(OBJECTIVES)})")
    needs = OBJECTIVES[opts.objective][2]
    if "mia" in needs and opts.mia_members is None:
        raise InputError(f"--objective {opts.objective} needs the MIA: give --mia-members and --mia-nonmembers")
    if "mmlu" in needs and opts.mmlu_dir is None:
        raise InputError(f"--objective {opts.objective} needs MMLU: give --mmlu-dir")
    if (opts.mia_members is None) != (opts.mia_nonmembers is None):
        raise InputError("the MIA needs both members and nonmembers (--mia-members and --mia-nonmembers)")
    loaded = [load_adapter(a) for a in opts.adapters]
    check_same_modules(loaded)
    ranks = {a.config.r for a in loaded}
    if len(ranks) != 1:
        raise InputError(f"the factor-wise merges need adapters of one rank, got {', '.join(f'{a.path} r={a.config.r}' for a in loaded)}")
    return loaded


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuses an output that is a file, a non-empty directory without --overwrite, or one not
    written by a search (--overwrite replaces only those), before any work."""
    if out.exists() and not out.is_dir():
        raise InputError(f"the output {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise InputError(f"the output directory {out} exists and is not empty (use --overwrite)")
        if not (out / MARKER).is_file():
            raise InputError(f"{out} is not empty and holds no {MARKER}: not written by umerge search, refusing to replace it")
    if not out.absolute().parent.is_dir():
        raise InputError(f"the output's parent directory {out.absolute().parent} does not exist")


def _scores(report: Any) -> dict[str, float | None]:
    from umerge.analysis.sweep import score_row

    return score_row(report)


def search(opts: SearchOptions) -> dict[str, Any]:
    """Run the search (see the module docstring); returns the content of search.json."""
    from umerge.evaluate._torch import require_torch

    loaded = _check(opts)  # bad input fails here, in one line, before torch is imported
    _check_out(Path(opts.out), opts.overwrite)
    torch = require_torch()
    threads = torch.get_num_threads()
    if opts.torch_threads:
        torch.set_num_threads(opts.torch_threads)
    try:
        return _search(opts, loaded)
    finally:
        torch.set_num_threads(threads)


def _search(opts: SearchOptions, loaded: Sequence[Any]) -> dict[str, Any]:
    from umerge.adapters.merge import merged_tensors
    from umerge.evaluate import evaluate
    from umerge.search.inmemory import MergedModel
    from umerge.search.results import choose, markdown, pareto_figure, write_table_csv
    from umerge.search.split import split_data

    t_start = time.perf_counter()
    cands, default_at = candidates_for(opts, len(loaded))
    out = Path(opts.out)
    tmp = Path(tempfile.mkdtemp(prefix=f".umerge-search-{out.name}-", dir=out.absolute().parent))
    try:
        for note in opts.notes:
            _log(opts, note)
        parts, manifest = split_data(opts.data, tmp / "split", seed=opts.split_seed, members=opts.mia_members,
                                     nonmembers=opts.mia_nonmembers, mmlu_dir=opts.mmlu_dir)
        counts = {p: manifest["parts"][p]["rows"] for p in parts}
        _log(opts, "split: " + "; ".join(f"{p} " + ", ".join(f"{k} {v}" for k, v in c.items()) for p, c in counts.items()))
        t_load = time.perf_counter()
        model = MergedModel(opts.base, loaded, device=opts.device)
        load_s = time.perf_counter() - t_load
        eval_kw: dict[str, Any] = dict(batch_size=opts.batch_size, max_new_tokens=opts.max_new_tokens, max_rows=opts.max_rows,
                       mmlu_k_shot=opts.mmlu_k_shot, min_k=opts.min_k, progress=False)
        key = OBJECTIVES[opts.objective][0]

        def score(c: Candidate, part: str, report_dir: Path | None = None) -> tuple[dict[str, Any], float, float]:
            t0 = time.perf_counter()
            tensors, rank = merged_tensors(loaded, c.method, c.weights, density=c.density,
                                           majority_sign=c.majority_sign, seed=opts.seed)
            model.apply(tensors, rank)
            t1 = time.perf_counter()
            try:
                rep = evaluate(model.pair(), **parts[part].evaluate_kwargs(), out=report_dir, name=c.label, **eval_kw)
            finally:
                model.restore()
            return _scores(rep), t1 - t0, time.perf_counter() - t1

        rows: list[dict[str, Any]] = []
        from tqdm.auto import tqdm

        bar = tqdm(cands, desc="candidates", unit="merge", disable=not opts.progress, file=sys.stderr,
                   dynamic_ncols=True)
        best_v: float | None = None
        for i, c in enumerate(bar):
            s, merge_s, eval_s = score(c, "validation")
            rows.append({"index": i, "label": c.label, **c.to_dict(), "default": i == default_at, **s,
                         "seconds": round(merge_s + eval_s, 3), "merge_seconds": round(merge_s, 3),
                         "eval_seconds": round(eval_s, 3)})
            if s.get(key) is not None and (best_v is None or s[key] > best_v):
                best_v = s[key]
            bar.set_postfix_str(f"best {key} {best_v:.3f}" if best_v is not None else "", refresh=False)
        bar.close()
        chosen_at = choose(rows, opts.objective)
        _log(opts, f"chosen on validation: {rows[chosen_at]['label']} ({key} {rows[chosen_at][key]:.4f}); "
                   f"scoring it and the default on the test split")
        test: dict[str, dict[str, Any]] = {}
        for name, idx in (("chosen", chosen_at), ("default", default_at)):
            if name == "default" and idx == chosen_at:
                test[name] = test["chosen"]  # the same merge: scored once
                shutil.copytree(tmp / "test" / "chosen", tmp / "test" / "default")
                continue
            s, _, _ = score(cands[idx], "test", tmp / "test" / name)
            test[name] = s
        comparison: dict[str, Any] = {name: {"index": idx, "label": cands[idx].label, "recipe": cands[idx].to_dict(),
                             "validation": {k: rows[idx].get(k) for k in rows[idx] if k in test[name]},
                             "test": test[name]}
                      for name, idx in (("chosen", chosen_at), ("default", default_at))}
        comparison["same_candidate"] = chosen_at == default_at
        protocol = _protocol(opts, manifest, len(cands), key)
        write_table_csv(tmp / "search.csv", rows)
        (tmp / "search.md").write_text(markdown(rows, opts.objective, chosen_at, comparison, protocol), encoding="utf-8")
        pareto_figure(rows, chosen_at, default_at, tmp / "pareto.png")
        _write_best(tmp / "best.yml", opts, cands[chosen_at], rows[chosen_at], test["chosen"], test["default"], key)
        result = {
            "format": FORMAT,
            "command": opts.command,
            "adapters": [str(Path(a).absolute()) for a in opts.adapters],
            "base": str(Path(opts.base).absolute()),
            "data": {"dir": str(opts.data), "mia_members": _str(opts.mia_members),
                     "mia_nonmembers": _str(opts.mia_nonmembers), "mmlu_dir": _str(opts.mmlu_dir)},
            "notes": opts.notes,
            "protocol": protocol,
            "objective": {"name": opts.objective, "key": key, "description": OBJECTIVES[opts.objective][1]},
            "mode": "random" if opts.random is not None else "grid",
            "seed": opts.seed,
            "space": (opts.space or SearchSpace(len(loaded))).to_dict(),
            "evaluation": {k: v for k, v in eval_kw.items() if k != "progress"} | {"device": model.device,
                                                                                      "dtype": str(model.eval_dtype)},
            "split": manifest,
            "candidates": rows,
            "chosen": chosen_at,
            "default": default_at,
            "comparison": comparison,
            "timings_s": {"load": round(load_s, 2), "candidates": round(sum(r["seconds"] for r in rows), 2),
                          "total": round(time.perf_counter() - t_start, 2)},
            "environment": {"python": sys.version.split()[0], "torch_threads": _torch_threads()},
        }
        (tmp / "search.json").write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def _str(p: Any) -> str | None:
    return None if p is None else str(p)


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def _protocol(opts: SearchOptions, manifest: dict[str, Any], n: int, key: str) -> list[str]:
    """The lines search.md and search.json state before any number."""
    rows = manifest["parts"]
    mode = (f"{n} candidates: {opts.random} drawn at random with seed {opts.seed}" if opts.random is not None
            else f"{n} candidates: the grid") + " (the default added when the space lacks it)"
    return [
        f"- Candidates: {mode}; every merge factor-wise with PEFT's add_weighted_adapter semantics, "
        f"applied in memory to the base model (DARE masks seeded by {opts.seed}).",
        f"- Split (seed {opts.split_seed}): documents halved per split and task, a document never in both parts; "
        "validation " + ", ".join(f"{k} {v}" for k, v in rows["validation"]["rows"].items())
        + "; test " + ", ".join(f"{k} {v}" for k, v in rows["test"]["rows"].items()) + ".",
        f"- Choice: the highest validation {key} ({OBJECTIVES[opts.objective][1]}); equal scores: the earlier candidate.",
        "- Reported: the chosen candidate and the default (TIES, density 0.8, weights 1) on the test split, each "
        "scored once after the choice. Validation scores are optimistic for the chosen candidate (it was picked "
        "for them); the test scores are the ones to quote.",
    ]


def _write_best(path: Path, opts: SearchOptions, c: Candidate, row: dict[str, Any], test: dict[str, Any],
                default_test: dict[str, Any], key: str) -> None:
    from umerge.adapters.recipe import recipe_for, write_recipe

    def f(v: Any) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    comment = [
        f"The merge `umerge search` chose: {c.label} (candidate {row['index']}).",
        f"Validation {key} {f(row.get(key))} (the split it was chosen on).",
        f"Test final aggregate {f(test.get('aggregate'))}, Task Aggregate {f(test.get('task_aggregate'))}, "
        f"MIA score {f(test.get('mia_score'))}, MMLU {f(test.get('mmlu'))};",
        f"the default (TIES d=0.8, weights 1) on the same test split: final aggregate {f(default_test.get('aggregate'))}.",
        "",
        "Factor-wise with PEFT's add_weighted_adapter semantics, folded into base_model:",
        "    umerge run best.yml -o merged/",
    ]
    if opts.command:
        comment += ["", "Written by: " + opts.command]
    recipe = recipe_for(c.method, [str(Path(a).absolute()) for a in opts.adapters], list(c.weights),
                        base=str(Path(opts.base).absolute()), density=c.density, majority_sign=c.majority_sign,
                        seed=opts.seed, comment=comment)
    write_recipe(recipe, path)


def command_line(argv: Sequence[str]) -> str:
    """``umerge search ...`` as typed (for the record)."""
    return shlex.join(["umerge", "search", *argv])


__all__ = ["FORMAT", "SearchOptions", "candidates_for", "command_line", "search"]
