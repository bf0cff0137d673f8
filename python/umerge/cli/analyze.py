"""`umerge analyze`: the paper's figures and tables (thin layer over `umerge.analysis`).

Subcommands, each writing a PNG and its numbers (CSV/JSON) into ``-o DIR``:

    loss-curves    LOG...                      loss terms over steps            (Figure 3)
    task-curves    LOG...                      per-task scores from epoch 0     (Figure 2)
    score-curves   LOG... | --report E=PATH    overall scores over epochs       (Figure 2b)
    angles         RUN_DIR... [--s K]          parameter-change angles + null   (Figure 4)
    density-sweep  --merge-cmd ... | --report D=PATH   scores against density   (Figure 5)
    methods        NAME=REPORT...              merge-method table               (Table 2)
"""

from __future__ import annotations

from pathlib import Path

import click

from umerge.cli import options as opt
from umerge.cli._convention import ConventionGroup
from umerge.errors import InputError

_OUT = opt.out_option(None, "Output directory (created).", hidden_aliases=("--output",), required=True,
                      type=click.Path(file_okay=False, path_type=Path))


def _pairs(items: tuple[str, ...], what: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise InputError(f"{what} {item!r}: expected KEY=PATH")
        out.append((key, value))
    return out


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InputError(f"{what} {text!r} is not a number") from None


def _done(paths: dict) -> None:
    for key, p in paths.items():
        if isinstance(p, Path):
            click.echo(f"{key}: {p}")


@click.group("analyze", cls=ConventionGroup)
def analyze() -> None:
    """The paper's analyses: loss and score curves, parameter-change angles, density sweeps,
    merge-method tables. Each writes a PNG and its numbers (CSV/JSON) into -o DIR."""


@analyze.command("loss-curves")
@click.argument("logs", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--label", "labels", multiple=True, help="Label per log, in order (default: the run directory name).")
@_OUT
def loss_curves_cmd(logs: tuple[Path, ...], labels: tuple[str, ...], out: Path) -> None:
    """Loss terms (total, NPO, KL, retain NLL, lr, grad norm) against the step, from train_log.jsonl files."""
    from umerge.analysis.curves import loss_curves

    _done(loss_curves(list(logs), out, labels=list(labels) or None))


@analyze.command("score-curves")
@click.argument("logs", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--label", "labels", multiple=True, help="Label per log, in order.")
@click.option("--report", "reports", multiple=True, metavar="EPOCH=REPORT",
              help="A per-epoch report.json (repeat); they form one series.")
@click.option("--report-label", default="reports", show_default=True, help="Label of the --report series.")
@_OUT
def score_curves_cmd(logs: tuple[Path, ...], labels: tuple[str, ...], reports: tuple[str, ...],
                     report_label: str, out: Path) -> None:
    """Scores against the epoch: eval rows of training logs, or per-epoch reports."""
    from umerge.analysis.curves import default_labels, score_curves

    if not logs and not reports:
        raise InputError("give training logs or --report EPOCH=REPORT")
    sources: dict = dict(zip(default_labels(list(logs), list(labels) or None), logs))
    if reports:
        sources[report_label] = {_number(e, "epoch"): Path(p) for e, p in _pairs(reports, "--report")}
    _done(score_curves(sources, out))


@analyze.command("task-curves")
@click.argument("logs", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--label", "labels", multiple=True, help="Label per log, in order (default: the run directory name).")
@_OUT
def task_curves_cmd(logs: tuple[Path, ...], labels: tuple[str, ...], out: Path) -> None:
    """Regurgitation and knowledge per task and split against the epoch, from epoch 0 (the per-task
    eval rows that `umerge train --eval-data` / umerge.evaluate.epoch_eval_hook log)."""
    from umerge.analysis.curves import default_labels, task_curves

    _done(task_curves(dict(zip(default_labels(list(logs), list(labels) or None), logs)), out))


@analyze.command("angles")
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--base", type=click.Path(path_type=Path), help="Starting model, for full (non-LoRA) checkpoints.")
@click.option("--s", "s", type=int, help="The epoch s to report (default: where the run's forget loss plateaus, "
              "read from RUN_DIR/train_log.jsonl).")
@_OUT
def angles_cmd(runs: tuple[Path, ...], base: Path | None, s: int | None, out: Path) -> None:
    """Angles between ΔP(0→s), ΔP(s→F), ΔP(0→F) from RUN_DIR/epoch-<k>/ checkpoints, each with the
    95% band of two random directions of the same dimension and norms (random high-dimensional
    directions are near 90 degrees too)."""
    from umerge.analysis.angles import angle_analysis

    _done(angle_analysis(list(runs), out, base=base, s=s))


@analyze.command("density-sweep")
@click.option("--merge-cmd", help="Merge command with {density} and {out}, e.g. "
              "'umerge ties m1/ m2/ --base base/ --density {density} -o {out}'.")
@click.option("--report", "reports", multiple=True, metavar="DENSITY=REPORT",
              help="Plot existing reports instead of merging (repeat).")
@click.option("--densities", default="0.1:1.0:0.1", show_default=True, help="Comma list or start:stop:step.")
@click.option("--data", type=click.Path(path_type=Path), help="Evaluation data (forget/retain).")
@click.option("--model", "adapter_on", type=click.Path(file_okay=False, path_type=Path),
              help="Base model: the merge output is then a PEFT adapter evaluated on it.")
@click.option("--mia-members", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--mia-nonmembers", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--mmlu-dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--max-rows", type=click.IntRange(min=1), help="First N rows of each task and kind per split.")
@click.option("--max-new-tokens", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--keep-models", is_flag=True, help="Keep the merged models (default: delete after scoring).")
@_OUT
def density_sweep_cmd(merge_cmd: str | None, reports: tuple[str, ...], densities: str, data: Path | None,
                      adapter_on: Path | None, mia_members: Path | None, mia_nonmembers: Path | None,
                      mmlu_dir: Path | None, max_rows: int | None, max_new_tokens: int, batch_size: int,
                      keep_models: bool, out: Path) -> None:
    """Merge at each density and score each merge (or plot given reports)."""
    from umerge.analysis.sweep import command_merger, density_sweep, model_scorer, parse_densities

    if bool(merge_cmd) == bool(reports):
        raise InputError("give either --merge-cmd (with --data) or --report DENSITY=REPORT")
    if reports:
        given = {_number(d, "density"): Path(p) for d, p in _pairs(reports, "--report")}
        res = density_sweep(lambda d, _out: given[d], lambda p: p, out, densities=sorted(given), progress=False)
    else:
        if data is None:
            raise InputError("--merge-cmd needs --data to score the merges")
        scorer = model_scorer(adapter_on, data=data, mia_members=mia_members, mia_nonmembers=mia_nonmembers,
                              mmlu_dir=mmlu_dir, max_rows=max_rows, max_new_tokens=max_new_tokens,
                              batch_size=batch_size, progress=False)
        res = density_sweep(command_merger(merge_cmd or ""), scorer, out, densities=parse_densities(densities),
                            keep_models=keep_models)
    _done(res)


@analyze.command("methods")
@click.argument("entries", nargs=-1, required=True, metavar="NAME=REPORT...")
@_OUT
def methods_cmd(entries: tuple[str, ...], out: Path) -> None:
    """Compare merge methods (Table 2 layout) from their report.json files."""
    from umerge.analysis.sweep import methods_table

    click.echo(methods_table({k: Path(v) for k, v in _pairs(entries, "entry")}, out), nl=False)
    click.echo(f"table: {out / 'methods.md'}")
