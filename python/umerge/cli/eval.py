"""`umerge eval`: score a model, re-score saved generations, or compare reports (thin layer over
`umerge.evaluate`)."""

from __future__ import annotations

from pathlib import Path

import click

from umerge.cli import options as opt
from umerge.errors import InputError

_EPILOG = """\b
Examples:
  umerge eval --model vanilla/ --data lume/ --mia-members m.jsonl --mia-nonmembers n.jsonl \\
              --mmlu-dir mmlu/ -o runs/vanilla/report.json
  umerge eval --model base/ --adapter runs/model1/ --data lume/ -o runs/model1/
  umerge eval --score-only runs/model1/generations.jsonl --mia-losses runs/model1/mia_losses.jsonl \\
              --mmlu runs/model1/mmlu.json -o rescored.json
  umerge eval --model base/ --adapter runs/model1/ --data lume/ --quantize int4 -o runs/model1-int4/
  umerge eval --compare runs/*/report.json
"""


@click.command("eval", epilog=_EPILOG)
@click.argument("reports", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model", type=click.Path(file_okay=False, path_type=Path), help="Model directory to evaluate.")
@click.option("--adapter", type=click.Path(file_okay=False, path_type=Path), help="PEFT adapter on top of --model.")
@opt.eval_data_options()
@click.option("--score-only", "score_only_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Score a GENERATIONS.jsonl without a model.")
@click.option("--mia-losses", type=click.Path(dir_okay=False, path_type=Path),
              help="With --score-only: the LOSSES.jsonl of the MIA.")
@click.option("--mmlu", "mmlu_result", help="With --score-only: an MMLU accuracy, or a JSON file (mmlu.json).")
@click.option("--compare", "compare_flag", is_flag=True, help="Print the Table 1 layout for the REPORTS given.")
@click.option("--names", help="With --compare: comma-separated display names, one per report.")
@opt.out_option(None, "report.json path, or a directory for report.json, report.md, generations.jsonl, "
                "mia_losses.jsonl.", hidden_aliases=("--output",), type=click.Path(path_type=Path))
@opt.eval_settings_options()
@click.option("--name", help="Display name of the model in reports.")
@click.option("--quantize", type=click.Choice(["int4", "int8"]), default=None,
              help="Score the model fake-quantized (the adapter folded in first): its linear weights rounded to "
                   "int4/int8, symmetric round to nearest (see umerge quantize --help), in a temporary directory "
                   "removed afterwards. Does forgetting survive quantization?")
@click.option("--group-size", type=int, default=128, show_default=True,
              help="With --quantize: input columns sharing one scale; -1: one per row.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def eval_cmd(
    reports: tuple[Path, ...],
    model: Path | None,
    adapter: Path | None,
    data: Path | None,
    mia_members: Path | None,
    mia_nonmembers: Path | None,
    mmlu_dir: Path | None,
    score_only_path: Path | None,
    mia_losses: Path | None,
    mmlu_result: str | None,
    compare_flag: bool,
    names: str | None,
    out: Path | None,
    batch_size: int,
    max_new_tokens: int,
    max_rows: int | None,
    mmlu_k_shot: int,
    min_k: float,
    name: str | None,
    device: str | None,
    quantize: str | None,
    group_size: int,
    quiet: bool,
) -> None:
    """Score a model with the SemEval-2025 Task 4 metrics (regurgitation, knowledge, Task Aggregate,
    MIA, MMLU, final aggregate), re-score saved generations, or compare reports."""
    modes = [m for m, on in (("--model", model), ("--score-only", score_only_path), ("--compare", compare_flag)) if on]
    if len(modes) != 1:
        raise InputError("give exactly one of --model, --score-only or --compare (see umerge eval --help)")
    if quantize is not None and model is None:
        raise InputError("--quantize goes with --model (it quantizes the model before scoring it)")
    if reports and not compare_flag:
        raise InputError(f"unexpected arguments {' '.join(map(str, reports))} (report files go with --compare)")
    if compare_flag:
        from umerge.evaluate import compare

        if not reports:
            raise InputError("--compare needs at least one report.json")
        name_list = [n.strip() for n in names.split(",")] if names else None
        table = compare(reports, names=name_list)
        click.echo(table, nl=False)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(table, encoding="utf-8")
        return
    if out is None:
        raise InputError("-o/--out is required (a report.json path or a directory)")
    if score_only_path is not None:
        from umerge.evaluate import score_only

        mmlu: float | str | None = None
        if mmlu_result is not None:
            try:
                mmlu = float(mmlu_result)
            except ValueError:
                mmlu = mmlu_result
        report = score_only(score_only_path, mia_losses, out, mmlu=mmlu, min_k=min_k, name=name)
    else:
        if data is None:
            raise InputError("--model needs --data (a directory with forget.jsonl and retain.jsonl)")
        if mia_losses is not None or mmlu_result is not None:
            raise InputError("--mia-losses and --mmlu go with --score-only; with --model use --mia-members/--mmlu-dir")
        from umerge.evaluate import evaluate

        report = evaluate(
            model, data, adapter=adapter, mia_members=mia_members, mia_nonmembers=mia_nonmembers,
            mmlu_dir=mmlu_dir, out=out, batch_size=batch_size, max_new_tokens=max_new_tokens,
            progress=not quiet, max_rows=max_rows, mmlu_k_shot=mmlu_k_shot, min_k=min_k, name=name,
            device=device, quantize=quantize, group_size=group_size,
        )
    click.echo(report.to_markdown(), nl=False)  # warnings (MMLU < 0.371, left-out groups) are in it
    from umerge.evaluate.run import output_paths

    click.echo(f"report: {output_paths(out)['report']}")
