"""`umerge demo` (the whole paper, end to end, on a built-in synthetic world) and `umerge world`.

A thin layer over `umerge.demo`: options are parsed here, the work is done by
`umerge.demo.pipeline.run_demo` and `umerge.demo.world.write_world`. `umerge world` needs no torch.
"""

from __future__ import annotations

import click


@click.command("demo")
@click.option("-o", "--out", "out", required=True, type=click.Path(file_okay=False),
              help="Directory for everything the demo writes (data, models, report.md, report.json).")
@click.option("--quick", is_flag=True, help="The CI size: a smaller world and fewer steps (<= 3 minutes on 2 CPU cores).")
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False),
              help="Run on real data instead (a directory with forget.jsonl and retain.jsonl; "
                   "optional mia/member.jsonl, mia/nonmember.jsonl and mmlu/).")
@click.option("--subset", type=click.IntRange(min=1), default=None, metavar="N",
              help="With --data: draw N whole documents per task from each split (seeded by --seed), N further "
                   "forget documents per task as MIA nonmembers (never trained on), and a four-choice utility probe "
                   "from the drawn retain QA rows; written to OUT/data/. On LUME with the demo's model: --subset 20 took 19 minutes "
                   "on one CPU core; 40 documents per task are more than that model memorises.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Override a demo setting (repeatable), e.g. --set hidden_size=128 --set num_layers=4 or "
                   "--set unlearn_overrides.lr=5e-3; a wrong key lists the valid ones. Recorded in report.json.")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False),
              help="Start from this model instead of building and fine-tuning a tiny OLMo (used as the vanilla model).")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seed of the world, the model initialisation, the fine-tuning and DARE (the unlearning presets keep their own seed, 42).")
@click.option("--seeds", default=None, metavar="LIST",
              help="Run once per seed (a range 0-4, a list 0,2,5, or both) into OUT/seed-K/, then summarise: "
                   "mean, sd and a bootstrap 95% interval over seeds, and the criteria counted over seeds.")
@click.option("--compare-methods", is_flag=True,
              help="After the main pipeline, train every unlearning method (grad_ascent, grad_diff, npo, simnpo, dpo, "
                   "rmu, undial beside npo_gdr_klr) on the same model and data, merge each over/under pair with "
                   "TIES where the method has a retain term, and add the section 'Unlearning methods compared'. "
                   "Several times the training time; --set compare_methods=grad_diff,undial picks methods.")
@click.option("--overwrite", is_flag=True, help="Replace the output directory if it exists.")
@click.option("--quiet", is_flag=True, help="No progress output.")
def demo(out: str, quick: bool, data_dir: str | None, subset: int | None, settings: tuple[str, ...],
         model_dir: str | None, seed: int, seeds: str | None, compare_methods: bool, overwrite: bool,
         quiet: bool) -> None:
    """Reproduce "unlearning via model merging" end to end, on CPU, with no download.

    \b
    Generates a synthetic LUME-like world, trains a tokenizer and a tiny OLMo that memorises it,
    unlearns with the zjuklab-model1 and zjuklab-model2 presets (scaled down), merges the two with
    TIES (PEFT factor-wise, and on the full updates), evaluates every model with the SemEval-2025
    Task 4 metrics, runs the density sweep and the merge-method comparison, and writes
    OUT/report.md and OUT/report.json.
    \b
        umerge demo -o demo-out                  # under 15 minutes on 2 CPU cores
        umerge demo --quick -o demo-out          # under 3 minutes (CI)
        umerge demo --seeds 3-7 -o demo-seeds    # five seeds and their summary
        umerge demo --compare-methods -o demo-methods   # + every unlearning method, alone and merged
        umerge demo --quick --set compare_methods=grad_diff,undial -o demo-two   # two methods only
        umerge demo --data ../shared/data/lume --subset 20 -o demo-lume  # real LUME rows
    
    The report's finding is decided by criteria fixed in code before any run (umerge.demo.criteria):
    over-forgetting, under-forgetting, a balanced merge, a merge above both parents, TIES the best
    method; it says which hold, on how many seeds, and nothing else.
    """
    from umerge.demo.config import parse_settings
    from umerge.demo.pipeline import DemoOptions, check_inputs, run_demo

    opts = DemoOptions(out=out, quick=quick, data_dir=data_dir, model_dir=model_dir, seed=seed,
                       overwrite=overwrite, progress=not quiet, subset=subset, settings=parse_settings(settings),
                       compare_methods=compare_methods)
    opts.resolved_config()  # a wrong --set fails here, before anything is written
    check_inputs(opts)
    if seeds is not None:
        from umerge.demo.seeds import parse_seeds, run_seeds

        report = run_seeds(opts, parse_seeds(seeds))
    else:
        report = run_demo(opts)
    click.echo(f"report: {report}")


@click.command("world")
@click.option("-o", "--out", "out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--docs-per-task", default=6, show_default=True, type=int,
              help="Documents of each task (Task1-3) in each of the forget and retain splits.")
@click.option("--nonmember-docs-per-task", default=6, show_default=True, type=int,
              help="Documents of each task that are never trained on (MIA nonmembers).")
@click.option("--overwrite", is_flag=True, help="Write into a non-empty directory.")
def world(out: str, seed: int, docs_per_task: int, nonmember_docs_per_task: int, overwrite: bool) -> None:
    """Generate the demo's synthetic LUME-like data set alone (forget/retain, MIA, MMLU-format utility set)."""
    from umerge.demo.world import WorldConfig, generate_world, write_world

    cfg = WorldConfig(seed=seed, docs_per_task=docs_per_task, nonmember_docs_per_task=nonmember_docs_per_task)
    w = generate_world(cfg)
    path = write_world(w, out, overwrite=overwrite)
    click.echo(f"wrote {len(w.rows('forget'))} forget, {len(w.rows('retain'))} retain, "
               f"{len(w.rows('nonmember'))} nonmember rows and {len(w.mmlu)} MMLU-format questions to {path}")
