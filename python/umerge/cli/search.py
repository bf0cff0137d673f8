"""`umerge search`: a merge search over LoRA unlearning adapters (thin layer over `umerge.search`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from umerge.cli import options as opt
from umerge.errors import InputError

_EPILOG = """\b
Examples (DEMO is the output directory of `umerge demo -o DEMO`):
  umerge search DEMO/runs/model1 DEMO/runs/model2 --base DEMO/models/vanilla \\
      --data DEMO/data --max-new-tokens 64 --mmlu-k-shot 1 --batch-size 32 --torch-threads 1 \\
      --methods ties,dare_ties,magnitude_prune --densities 0.2:1.0:0.2 \\
      --weights 1,1 --weights 0.5,1 -o DEMO/search
  umerge search a/ b/ --base base/ --data lume/ --mia-members m.jsonl --mia-nonmembers n.jsonl \\
      --mmlu-dir mmlu/ --random 40 --seed 3 --densities 0.1,1 --weight-values 0.25,1.5 -o search/
  umerge run DEMO/search/best.yml -o merged/          # the chosen merge, folded into the base

\b
The data are split once into validation and test halves (by document, per task,
seeded by --split-seed; OUT/split/ holds both). Every candidate is scored on
validation, the best is chosen there (--objective), and only the chosen and the
default merge (TIES, density 0.8, weights 1) are scored on test: quote the test
numbers, not the validation ones. With --data DIR, DIR/mia/member.jsonl,
DIR/mia/nonmember.jsonl and DIR/mmlu/ (the layout `umerge demo` writes) are used
when present and not given.

\b
Writes OUT/search.csv, search.md, pareto.png, best.yml (runs with `umerge run`),
search.json (everything, the test comparison included), split/, test/.
"""


def _space(path: Path | None) -> dict[str, Any]:
    """The --space file's axes (YAML mapping with methods, densities, majority_signs, weights, weight_values)."""
    if path is None:
        return {}
    import yaml

    try:
        d = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"cannot read the search space {path}: {exc}".splitlines()[0]) from None
    allowed = {"methods", "densities", "majority_signs", "weights", "weight_values"}
    if not isinstance(d, dict) or set(d) - allowed:
        extra = sorted(set(d) - allowed) if isinstance(d, dict) else None
        raise InputError(f"{path}: a search space is a mapping of {', '.join(sorted(allowed))}"
                         + (f" (unknown key {extra[0]!r})" if extra else ""))
    return d


def _csv(value: Any) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


@click.command("search", epilog=_EPILOG)
@click.argument("adapters", nargs=-1, required=True, type=opt.ModelPath("adapter"))
@click.option("--base", required=True, type=opt.ModelPath("base"), help="The model the adapters were trained on.")
@opt.eval_data_options(data_help="Directory with forget.* and retain.* (LUME layout); split into validation and test.",
                       data_required=True)
@opt.out_option(None, "Output directory (built beside it and renamed in when complete).", required=True,
                type=click.Path(file_okay=False, path_type=Path))
@click.option("--grid", "grid_flag", is_flag=True, help="Score every combination of the axes (the default).")
@click.option("--random", "n_random", type=click.IntRange(min=1), metavar="N",
              help="Score N candidates drawn at random: method and sign from the lists, density and weights "
                   "uniformly between the listed minimum and maximum.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of the random draws and of DARE's masks.")
@click.option("--methods", help="Comma list of ties, dare_ties, dare_linear, magnitude_prune, linear "
                                "[default: all five].")
@click.option("--densities", help="Densities: 0.2,0.5,1 or start:stop:step [default: 0.2:1.0:0.2].")
@click.option("--weights", "weight_vectors", multiple=True, metavar="W1,W2,...",
              help="One weight per adapter; repeat for more vectors [default: the product of --weight-values].")
@click.option("--weight-values", help="Each adapter's weight from this list (the grid takes the product) [default: 1].")
@click.option("--majority-sign", "majority_signs",
              help="TIES sign election for ties and dare_ties: total, frequency or total,frequency [default: total].")
@click.option("--space", "space_file", type=click.Path(dir_okay=False, path_type=Path),
              help="YAML file with methods, densities, majority_signs, weights, weight_values (options override it).")
@click.option("--objective", type=click.Choice(["final", "task", "mia", "mmlu"]), default="final", show_default=True,
              help="Validation score the choice maximises: final aggregate, Task Aggregate, MIA score or MMLU.")
@click.option("--split-seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of the validation/test split.")
@opt.eval_settings_options()
@click.option("--torch-threads", type=click.IntRange(min=1), help="torch CPU threads (default: torch's own).")
@opt.overwrite_option("Replace an output directory written by an earlier umerge search.")
@opt.quiet_option("No progress bar and no stage messages.")
def search_cmd(adapters: tuple[str, ...], base: str, data: Path, mia_members: Path | None,
               mia_nonmembers: Path | None, mmlu_dir: Path | None, out: Path, grid_flag: bool, n_random: int | None,
               seed: int, methods: str | None, densities: str | None, weight_vectors: tuple[str, ...],
               weight_values: str | None, majority_signs: str | None, space_file: Path | None, objective: str,
               split_seed: int, batch_size: int, max_new_tokens: int, max_rows: int | None, mmlu_k_shot: int,
               min_k: float, device: str | None, torch_threads: int | None, overwrite: bool, quiet: bool) -> None:
    """Search merge recipes for two or more LoRA ADAPTERS: method, density, per-adapter
    weights and the TIES sign election, each candidate merged factor-wise in memory (PEFT
    add_weighted_adapter semantics) and scored with the SemEval-2025 Task 4 metrics on a
    validation split; the best is reported beside the default on a held-out test split."""
    from umerge.analysis.sweep import parse_densities, parse_numbers
    from umerge.search import SearchOptions, SearchSpace, search
    from umerge.search.run import command_line
    from umerge.search.space import MAJORITY_SIGNS, METHODS, parse_names

    if grid_flag and n_random is not None:
        raise InputError("give --grid or --random N, not both")
    if len(adapters) < 2:
        raise InputError(f"a merge search needs at least two adapters (got {len(adapters)})")
    f = _space(space_file)
    axes: dict[str, Any] = {}
    m = methods if methods is not None else (_csv(f["methods"]) if "methods" in f else None)
    if m is not None:
        axes["methods"] = parse_names(m, METHODS, "merge method")
    d = densities if densities is not None else (_csv(f["densities"]) if "densities" in f else None)
    if d is not None:
        axes["densities"] = tuple(parse_densities(d))
    s = majority_signs if majority_signs is not None else (_csv(f["majority_signs"]) if "majority_signs" in f else None)
    if s is not None:
        axes["majority_signs"] = parse_names(s, MAJORITY_SIGNS, "majority sign")
    vectors = list(weight_vectors) or [_csv(v) for v in f.get("weights", [])]
    if vectors:
        axes["weights"] = tuple(tuple(parse_numbers(v, "weights")) for v in vectors)
    wv = weight_values if weight_values is not None else (_csv(f["weight_values"]) if "weight_values" in f else None)
    if wv is not None:
        axes["weight_values"] = tuple(parse_numbers(wv, "weight values"))
    notes: list[str] = []
    mem, non, mmlu = Path(data) / "mia" / "member.jsonl", Path(data) / "mia" / "nonmember.jsonl", Path(data) / "mmlu"
    if mia_members is None and mia_nonmembers is None and mem.is_file() and non.is_file():
        mia_members, mia_nonmembers = mem, non
        notes.append(f"MIA members and nonmembers from {mem.parent}/ (--data's layout)")
    if mmlu_dir is None and (mmlu / "test").is_dir():
        mmlu_dir = mmlu
        notes.append(f"MMLU-format utility questions from {mmlu}/ (--data's layout)")
    argv = sys.argv[1:]
    command = command_line(argv[argv.index("search") + 1:]) if "search" in argv else None
    opts = SearchOptions(
        adapters=list(adapters), base=base, data=data, out=out, space=SearchSpace(len(adapters), **axes),
        random=n_random, seed=seed, split_seed=split_seed, objective=objective, mia_members=mia_members,
        mia_nonmembers=mia_nonmembers, mmlu_dir=mmlu_dir, batch_size=batch_size, max_new_tokens=max_new_tokens,
        max_rows=max_rows, mmlu_k_shot=mmlu_k_shot, min_k=min_k, device=device, torch_threads=torch_threads,
        overwrite=overwrite, progress=not quiet, command=command,
        notes=notes,
    )
    res = search(opts)
    c = res["comparison"]
    key = res["objective"]["key"]

    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    click.echo(f"{len(res['candidates'])} candidates scored on the validation split; chosen by {key}: "
               f"{c['chosen']['label']} ({fmt(c['chosen']['validation'].get(key))})")
    click.echo("test split (quote these): "
               f"chosen final aggregate {fmt(c['chosen']['test'].get('aggregate'))}, "
               f"default ({c['default']['label']}) {fmt(c['default']['test'].get('aggregate'))}")
    click.echo(f"wrote {out}/search.md, search.csv, pareto.png, best.yml, search.json")
