"""CLI commands for every merge method besides TIES, `umerge methods` and `umerge run`.

Each method command is a thin layer over its `umerge.methods` function and shares its option
definitions (output, threads, memory, shards, ...) with the others; `umerge run CONFIG.yml`
runs a mergekit YAML config through `umerge.mergekit_yaml`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from umerge.cli import mergekit_flags
from umerge.cli import options as opt
from umerge.cli._convention import canonical_name
from umerge.cli.merge import _force_bar, _print_summary

_CTX = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
F = Callable[..., Any]


def output_options(f: F) -> F:
    """Options every merge command takes: where and how the output is written, and resources."""
    return opt.apply(
        f,
        opt.out_option(),
        opt.out_dtype_option("Output dtype (default: the base's, or the first model's). Rounded to nearest even."),
        opt.threads_option(),
        opt.memory_budget_option(),
        opt.page_cache_option(),
        opt.max_shard_size_option(),
        opt.strict_option("A tensor missing from some model is an error (default: merge over the models that have it)."),
        opt.overwrite_option(),
        opt.allow_nonfinite_option(),
        opt.quiet_option(),
    )


def _models_arg(f: F) -> F:
    return click.argument("models", nargs=-1, required=True, type=opt.ModelPath())(f)


def _base_opt(f: F) -> F:
    return click.option("--base", type=opt.ModelPath("base"),
                        help="The model the fine-tunes started from (task vectors are model - base).")(f)


def _weights_opt(f: F) -> F:
    return click.option("--weight", "weights", type=float, multiple=True,
                        help="Weight of each model, given once per model in order (default 1.0 each).")(f)


def _lambda_opt(f: F) -> F:
    return click.option("--lambda", "lambda_", type=float, default=1.0, show_default=True,
                        help="Scale of the merged task vector added to the base.")(f)


def _density_opt(f: F) -> F:
    return click.option("--density", type=float, required=True,
                        help="Fraction of each task vector's entries kept (0 < D <= 1).")(f)


def _normalize_opt(default: bool) -> Callable[[F], F]:
    return click.option("--normalize/--no-normalize", default=default, show_default=True,
                        help="Divide by the sum of (agreeing) weights.")


def _sparse_task_vector_opts(f: F) -> F:
    """MODELS, --base, --density, --weight, --lambda, --no-normalize: the options of the methods
    that sparsify task vectors (magnitude_prune, dare_*, breadcrumbs*, della*)."""
    return opt.apply(f, _models_arg, _base_opt, _density_opt, _weights_opt, _lambda_opt, _normalize_opt(False))


def _random_opts(f: F) -> F:
    f = click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Seed of the random masks (recorded in the recipe). Same seed, same bytes, any thread count.")(f)
    f = click.option("--rescale", type=click.Choice(["density", "probability", "l1", "none"]), default="density",
                     show_default=True,
                     help="Kept entries: divided by their keep probability (density; DELLA's rank-based "
                          "probability; the papers' rescale, unbiased per element; 'probability' is an alias), "
                          "scaled to the tensor's L1 norm (mergekit), or left alone.")(f)
    return f


def _opts(kw: dict[str, Any]) -> dict[str, Any]:
    """The shared output options of a command, in the API's keywords."""
    quiet = kw.pop("quiet")
    kw["progress"] = (not quiet) and (sys.stderr.isatty() or _force_bar())
    return kw


def _weights(weights: tuple[float, ...], models: tuple[str, ...]) -> list[float] | None:
    # the count is checked by `umerge.merge.weight_params` (an InputError: exit 2)
    return list(weights) if weights else None


def _finish(report: Any, quiet: bool) -> None:
    _print_summary(report, quiet)


@click.command(context_settings=_CTX)
@_models_arg
@_weights_opt
@_normalize_opt(True)
@output_options
def linear(models: tuple[str, ...], weights: tuple[float, ...], normalize: bool, **kw: Any) -> None:
    """Weighted average of MODELS: sum w_i x_i / sum w_i (mergekit linear).

    \b
    Example:
        umerge linear a/ b/ --weight 0.3 --weight 0.7 -o merged/
    """
    from umerge.methods import linear as api

    quiet = kw["quiet"]
    _finish(api(list(models), weights=_weights(weights, models), normalize=normalize, **_opts(kw)), quiet)


@click.command(context_settings=_CTX)
@_models_arg
@_base_opt
@_weights_opt
@_lambda_opt
@_normalize_opt(False)
@output_options
def task_arithmetic(models: tuple[str, ...], base: str | None, weights: tuple[float, ...], lambda_: float,
                    normalize: bool, **kw: Any) -> None:
    """Task arithmetic: base + lambda * sum w_i (model_i - base).

    \b
    Example:
        umerge task-arithmetic ft1/ ft2/ --base base/ --lambda 0.5 -o merged/
    """
    from umerge.methods import task_arithmetic as api

    quiet = kw["quiet"]
    _finish(api(list(models), base, weights=_weights(weights, models), lambda_=lambda_, normalize=normalize,
                **_opts(kw)), quiet)


@click.command(context_settings=_CTX)
@_sparse_task_vector_opts
@output_options
def magnitude_prune(models: tuple[str, ...], base: str | None, density: float, weights: tuple[float, ...],
                    lambda_: float, normalize: bool, **kw: Any) -> None:
    """Keep the top floor(density * n) |task vector| entries per tensor, then a weighted sum (no sign election).

    \b
    Example:
        umerge magnitude-prune ft1/ ft2/ --base base/ --density 0.5 -o merged/
    """
    from umerge.methods import magnitude_prune as api

    quiet = kw["quiet"]
    _finish(api(list(models), base, density=density, weights=_weights(weights, models), lambda_=lambda_,
                normalize=normalize, **_opts(kw)), quiet)


def _dare_command(name: str, doc: str) -> click.Command:
    @click.command(name=canonical_name(name), context_settings=_CTX, help=doc)
    @_sparse_task_vector_opts
    @_random_opts
    @output_options
    def cmd(models: tuple[str, ...], base: str | None, density: float, weights: tuple[float, ...], lambda_: float,
            normalize: bool, rescale: str, seed: int, **kw: Any) -> None:
        import umerge.methods as m

        quiet = kw["quiet"]
        _finish(getattr(m, name)(list(models), base, density=density, weights=_weights(weights, models),
                                 lambda_=lambda_, normalize=normalize, rescale=rescale, seed=seed, **_opts(kw)),
                quiet)

    return cmd


dare_linear = _dare_command(
    "dare_linear",
    "DARE: keep each task-vector entry with probability density, rescale, weighted sum.\n\n"
    "\b\nExample:\n    umerge dare-linear ft1/ ft2/ --base base/ --density 0.5 --seed 1 -o merged/",
)
dare_ties = _dare_command(
    "dare_ties",
    "DARE masks, then TIES sign election: only entries agreeing with the sign of the weighted sum are summed.\n\n"
    "\b\nExample:\n    umerge dare-ties ft1/ ft2/ --base base/ --density 0.5 -o merged/",
)


def _breadcrumbs_command(name: str, doc: str) -> click.Command:
    @click.command(name=canonical_name(name), context_settings=_CTX, help=doc)
    @_sparse_task_vector_opts
    @click.option("--gamma", type=float, default=0.01, show_default=True,
                  help="Fraction of the largest |task vector| entries dropped as outliers (0 <= G < 1; 0 = magnitude_prune).")
    @output_options
    def cmd(models: tuple[str, ...], base: str | None, density: float, gamma: float, weights: tuple[float, ...],
            lambda_: float, normalize: bool, **kw: Any) -> None:
        import umerge.methods as m

        quiet = kw["quiet"]
        _finish(getattr(m, name)(list(models), base, density=density, gamma=gamma, weights=_weights(weights, models),
                                 lambda_=lambda_, normalize=normalize, **_opts(kw)), quiet)

    return cmd


breadcrumbs = _breadcrumbs_command(
    "breadcrumbs",
    "Model Breadcrumbs: per tensor, drop the largest gamma * n |task vector| entries as outliers, keep the next "
    "density * n, weighted sum.\n\n"
    "\b\nExample:\n    umerge breadcrumbs ft1/ ft2/ --base base/ --density 0.9 --gamma 0.01 -o merged/",
)
breadcrumbs_ties = _breadcrumbs_command(
    "breadcrumbs_ties",
    "Model Breadcrumbs masks, then TIES sign election.\n\n"
    "\b\nExample:\n    umerge breadcrumbs-ties ft1/ ft2/ --base base/ --density 0.9 --gamma 0.01 -o merged/",
)


def _della_command(name: str, normalize: bool, doc: str) -> click.Command:
    @click.command(name=canonical_name(name), context_settings=_CTX, help=doc)
    @lambda f: opt.apply(f, _models_arg, _base_opt, _density_opt, _weights_opt, _lambda_opt, _normalize_opt(normalize))
    @click.option("--epsilon", type=click.FloatRange(min=0.0), default=0.15, show_default=True,
                  help="Keep probabilities span density +- epsilon by magnitude rank within each row.")
    @_random_opts
    @output_options
    def cmd(models: tuple[str, ...], base: str | None, density: float, epsilon: float, weights: tuple[float, ...],
            lambda_: float, normalize: bool, rescale: str, seed: int, **kw: Any) -> None:
        import umerge.methods as m

        quiet = kw["quiet"]
        _finish(getattr(m, name)(list(models), base, density=density, epsilon=epsilon,
                                 weights=_weights(weights, models), lambda_=lambda_, normalize=normalize,
                                 rescale=rescale, seed=seed, **_opts(kw)), quiet)

    return cmd


della = _della_command(
    "della", True,
    "DELLA: in each row, keep entries with probability density +- epsilon rising with their magnitude rank, "
    "rescale, then TIES sign election.\n\n"
    "\b\nExample:\n    umerge della ft1/ ft2/ --base base/ --density 0.5 --epsilon 0.1 -o merged/",
)
della_linear = _della_command(
    "della_linear", False,
    "DELLA's magnitude-ranked random masks, rescale, weighted sum.\n\n"
    "\b\nExample:\n    umerge della-linear ft1/ ft2/ --base base/ --density 0.5 --epsilon 0.1 -o merged/",
)


@click.command(context_settings=_CTX)
@click.argument("model", type=opt.ModelPath())
@_base_opt
@click.option("--t", "t", type=float, required=True, help="Interpolation factor: 0 gives the base, 1 the model.")
@output_options
def slerp(model: str, base: str | None, t: float, **kw: Any) -> None:
    """Spherical interpolation, per tensor, from --base (t = 0) to MODEL (t = 1).

    \b
    Example:
        umerge slerp ft/ --base base/ --t 0.5 -o merged/
    """
    from umerge.methods import slerp as api

    quiet = kw["quiet"]
    _finish(api(model, base, t=t, **_opts(kw)), quiet)


@click.command(context_settings=_CTX)
@_models_arg
@_base_opt
@click.option("--filter-wise", is_flag=True,
              help="One interpolation factor per row (along the last dimension) instead of per tensor (mergekit's filter_wise).")
@output_options
def model_stock(models: tuple[str, ...], base: str | None, filter_wise: bool, **kw: Any) -> None:
    """Model Stock: interpolate between the base and the models' average by their offsets' mean cosine.

    \b
    Example:
        umerge model-stock ft1/ ft2/ ft3/ --base base/ -o merged/
    """
    from umerge.methods import model_stock as api

    quiet = kw["quiet"]
    _finish(api(list(models), base, filter_wise=filter_wise, **_opts(kw)), quiet)


@click.command(context_settings=_CTX)
@click.argument("models", nargs=2, type=opt.ModelPath())
@click.option("--base", type=opt.ModelPath("base"),
              help="Optional: interpolate the task vectors (model - base) and add the base back.")
@click.option("--weight", "weights", type=float, multiple=True,
              help="Weight of each of the two models, given twice in order: t = w1 / (w0 + w1) (default 1.0 each).")
@click.option("--flatten/--no-flatten", default=True, show_default=True,
              help="One vector per tensor; --no-flatten: one per row (or per column with --row-wise).")
@click.option("--row-wise", is_flag=True,
              help="With --no-flatten: vectors along the first dimension (mergekit's nuslerp_row_wise, dim 0).")
@output_options
def nuslerp(models: tuple[str, ...], base: str | None, weights: tuple[float, ...], flatten: bool, row_wise: bool,
            **kw: Any) -> None:
    """NuSLERP: spherical interpolation between two MODELS (or their task vectors with --base).

    \b
    Example:
        umerge nuslerp ft1/ ft2/ --base base/ --weight 0.4 --weight 0.6 -o merged/
    """
    from umerge.methods import nuslerp as api

    quiet = kw["quiet"]
    _finish(api(list(models), base, weights=_weights(weights, models), flatten=flatten, row_wise=row_wise,
                **_opts(kw)), quiet)


@click.command(context_settings=_CTX)
@_models_arg
@click.option("--base", type=opt.ModelPath("base"),
              help="Optional: average the task vectors (model - base) on the sphere and add the base back.")
@_weights_opt
@click.option("--normalize-weights/--no-normalize-weights", default=True, show_default=True,
              help="Divide the weights by their sum.")
@click.option("--eps", type=float, default=1e-8, show_default=True,
              help="Added to each norm before dividing; the smallest norm of the weighted mean.")
@output_options
def multislerp(models: tuple[str, ...], base: str | None, weights: tuple[float, ...], normalize_weights: bool,
               eps: float, **kw: Any) -> None:
    """Multi-SLERP: the weighted barycentre of MODELS on the sphere, scaled by their weighted mean norm.

    \b
    Example:
        umerge multislerp ft1/ ft2/ ft3/ --base base/ -o merged/
    """
    from umerge.methods import multislerp as api

    quiet = kw["quiet"]
    _finish(api(list(models), base, weights=_weights(weights, models), normalize_weights=normalize_weights, eps=eps,
                **_opts(kw)), quiet)


@click.command(context_settings=_CTX)
@_models_arg
@click.option("--max-iter", type=click.IntRange(min=0), default=10, show_default=True,
              help="Most Riemannian gradient steps.")
@click.option("--tol", type=click.FloatRange(min=0.0), default=1e-5, show_default=True,
              help="Stop when a step is shorter; norms and angles below it are left out.")
@output_options
def karcher(models: tuple[str, ...], max_iter: int, tol: float, **kw: Any) -> None:
    """Karcher mean: the Riemannian mean of MODELS' directions on the sphere, times their mean norm.

    \b
    Example:
        umerge karcher ft1/ ft2/ ft3/ -o merged/
    """
    from umerge.methods import karcher as api

    quiet = kw["quiet"]
    _finish(api(list(models), max_iter=max_iter, tol=tol, **_opts(kw)), quiet)


@click.command(context_settings=_CTX)
@click.argument("model", type=opt.ModelPath())
@_base_opt
@click.option("--t", "t", type=float, required=True,
              help="Distance below which MODEL's value is taken whole (>= 0; 0 gives the base).")
@output_options
def nearswap(model: str, base: str | None, t: float, **kw: Any) -> None:
    """NearSwap: per element, MODEL's value where it is within t of --base's, else t/|diff| of the way to it.

    \b
    Example:
        umerge nearswap ft/ --base base/ --t 0.001 -o merged/
    """
    from umerge.methods import nearswap as api

    quiet = kw["quiet"]
    _finish(api(model, base, t=t, **_opts(kw)), quiet)


@click.command(context_settings=_CTX)
@_models_arg
@_base_opt
@click.option("--select-topk", type=float, default=1.0, show_default=True,
              help="Fraction of the elements of non-zero variance across MODELS kept in every task vector, "
                   "largest variance first (0 < K <= 1; 1 keeps all).")
@output_options
def sce(models: tuple[str, ...], base: str | None, select_topk: float, **kw: Any) -> None:
    """SCE: keep the elements where MODELS' task vectors vary most, weight each model by its task
    vector's mean square, and average the entries that agree with the elected sign.

    \b
    Example:
        umerge sce ft1/ ft2/ ft3/ --base base/ --select-topk 0.1 -o merged/
    """
    from umerge.methods import sce as api

    quiet = kw["quiet"]
    _finish(api(list(models), base, select_topk=select_topk, **_opts(kw)), quiet)


@click.command(context_settings=_CTX)
@click.argument("model", type=opt.ModelPath())
@_base_opt
@output_options
def arcee_fusion(model: str, base: str | None, **kw: Any) -> None:
    """Arcee Fusion: MODEL's values where their importance (|MODEL - base| times the KL divergence of
    the rows' softmaxes) is an outlier of the tensor (above median + 1.5 IQR), --base's elsewhere.

    \b
    Example:
        umerge arcee-fusion instruct/ --base base/ -o merged/
    """
    from umerge.methods import arcee_fusion as api

    quiet = kw["quiet"]
    _finish(api(model, base, **_opts(kw)), quiet)


def _epsilon_opt(f: F) -> F:
    return click.option("--epsilon", type=float, default=1e-5, show_default=True,
                        help="A task-vector entry counts as changed when its magnitude is above this (>= 0).")(f)


@click.command(context_settings=_CTX)
@_models_arg
@_base_opt
@_epsilon_opt
@output_options
def ram(models: tuple[str, ...], base: str | None, epsilon: float, **kw: Any) -> None:
    """RAM: per element, the update of the one model that changed it, or the mean of several's.

    \b
    Example:
        umerge ram agent1/ agent2/ --base base/ -o merged/
    """
    from umerge.methods import ram as api

    quiet = kw["quiet"]
    _finish(api(list(models), base, epsilon=epsilon, **_opts(kw)), quiet)


@click.command(context_settings=_CTX)
@_models_arg
@_base_opt
@click.option("--r", "r", type=float, default=0.1, show_default=True,
              help="Strength of the rescaling of each model's unique updates (>= 0).")
@click.option("--alpha", type=float, default=0.2, show_default=True,
              help="Cap of each model's shared-to-unique ratio in the rescaling (>= 0).")
@_epsilon_opt
@output_options
def ramplus_tl(models: tuple[str, ...], base: str | None, r: float, alpha: float, epsilon: float, **kw: Any) -> None:
    """RAM+ (tensor-local): RAM with each model's unique updates scaled by 1 + r * min(shared / unique, alpha).

    \b
    Example:
        umerge ramplus-tl agent1/ agent2/ --base base/ --r 0.1 --alpha 0.2 -o merged/
    """
    from umerge.methods import ramplus_tl as api

    quiet = kw["quiet"]
    _finish(api(list(models), base, r=r, alpha=alpha, epsilon=epsilon, **_opts(kw)), quiet)


@click.command(name="methods", context_settings=_CTX)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def methods_cmd(as_json: bool) -> None:
    """List the merge methods the engine knows, and their parameters."""
    from umerge import _core

    info = json.loads(_core.method_info())
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for m in info:
        click.echo(f"{m['name']}" + (f"  (base model: {m['base']})" if "base" in m else ""))
        for p in m.get("params", []):
            scope = "per model" if p["per_model"] else "global"
            click.echo(f"    {p['name']:<14} {scope:<9} default {p['default']:<9} {p['doc']}")


@click.command(name="run", context_settings=_CTX, cls=mergekit_flags.RunCommand)
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_path", required=False, metavar="[OUT]")
@click.option("--seed", type=click.IntRange(min=0), default=None,
              help="Seed of the random masks (dare_*, della*; default 0, recorded in the recipe).")
@click.option("--print-spec", is_flag=True,
              help="Print the engine spec the config becomes (for a multi-document config: its stages, in the "
                   "order they run), and exit without merging.")
@click.option("-I", "--intermediate-dir", type=click.Path(file_okay=False), default=None,
              help="Multi-document configs: where the named documents' outputs go, as DIR/NAME "
                   "(default: OUT-intermediate beside OUT).")
@click.option("--keep-intermediate", is_flag=True,
              help="Multi-document configs: keep the named documents' outputs (default: removed once OUT is written).")
@click.option("--out-path", "multi_out", default=None, hidden=True)  # mergekit-multi's name for OUT
@output_options
@mergekit_flags.add_options
@click.pass_context
def run_cmd(ctx: click.Context, config: str, out_path: str | None, seed: int | None, print_spec: bool,
            intermediate_dir: str | None, keep_intermediate: bool, multi_out: str | None, **kw: Any) -> None:
    """Run a mergekit YAML CONFIG with the umerge engine, writing OUT (or -o).

    \b
    Supports models: or slices: (layer stacking: each slice takes a layer_range of
    each of its sources, the same number of layers from each; the output's layers are
    the slices' in order, renumbered, and config.json's layer count follows),
    merge_method linear, task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs,
    breadcrumbs_ties, della, della_linear, slerp, model_stock, nuslerp, multislerp,
    karcher, nearswap, sce, arcee_fusion, ram, ramplus_tl, passthrough (copy, times its scale
    parameter: one model, or one source per slice, as mergekit's frankenmerges); base_model;
    global, per-slice and per-model parameters, filter rules, gradients; dtype, out_dtype;
    tokenizer_source base or a model. Anything else is an error, except a mergekit parameter the
    method does not use (weight on slerp): ignored with a warning, as mergekit ignores it.
    Models are local directories (a Hub id: hf download ID --local-dir DIR first).
    models: that are all PEFT LoRA adapters are merged factor-wise (PEFT semantics, as
    `umerge ties A/ B/ --base BASE`) and folded into base_model; such a recipe also takes
    majority_sign (total|frequency) and seed (DARE) parameters: `umerge search` writes them.

    \b
    A multi-document CONFIG (mergekit-multi: documents separated by ---, each with
    name:, later ones naming earlier ones as models) runs its documents in dependency
    order: the named ones to --intermediate-dir/NAME (removed at the end unless
    --keep-intermediate), the unnamed one (else the last) to OUT. Everything is
    checked before the first merge starts: a cycle or a name that is neither a
    document nor a path is an error, and nothing is written. --out-dtype sets
    OUT's dtype only (the stages keep their configs' dtypes).

    \b
    mergekit-yaml's command line works as it is: OUT as the second argument,
    bfloat16/float16/float32 for --out-dtype, and its flags (the table below):
    -j is --threads, --random-seed is --seed, --out-shard-size (parameters) sets
    --max-shard-size (bytes); --cuda, --lazy-unpickle, --copy-tokenizer and the
    like are accepted with a note saying what umerge does instead. mergekit-multi's
    --intermediate-dir and --out-path work too.

    \b
    Examples:
        umerge run merge.yml -o merged/
        umerge run merge.yml merged/ --cuda -j 8     # as mergekit-yaml
        umerge run frankenmerge.yml -o big/          # passthrough with slices
        umerge run multi.yml -o final/ --keep-intermediate -I stages/
    """
    from umerge import mergekit_multi, mergekit_yaml
    from umerge.errors import InputError

    mapped, notes = mergekit_flags.apply(kw)
    given = ctx.get_parameter_source("out") is click.core.ParameterSource.COMMANDLINE
    for other, what in ((out_path, "the second argument"), (multi_out, "--out-path")):
        if other is None:
            continue
        if given and os.path.normpath(kw["out"]) != os.path.normpath(other):
            raise InputError(f"two outputs given, {other} ({what}) and -o {kw['out']}: give one")
        kw["out"], given = other, True
    kw["threads"] = mapped.pop("threads", kw["threads"])
    quiet = kw["quiet"]
    docs = mergekit_yaml.load_documents(config)
    multi = mergekit_multi.is_multi(docs)
    if not multi and (intermediate_dir is not None or keep_intermediate):
        raise InputError(f"--intermediate-dir and --keep-intermediate apply to multi-document configs (several YAML "
                         f"documents, each with name:), and {config} has one")
    if print_spec:
        from umerge.adapters.recipe import is_adapter_config, request_of

        if not multi and is_adapter_config(docs[0]):
            click.echo(json.dumps(request_of(docs[0], config), indent=2))
            return
        opts = _opts(dict(kw))
        opts.pop("progress")
        out = opts.pop("out")
        if multi:
            stages = mergekit_multi.check(docs, out, config, intermediate_dir)
            _notes(notes)
            click.echo(json.dumps(mergekit_multi.describe(stages), indent=2))
            return
        ignored: list[str] = []  # parameters the method does not use, said after the spec is built
        spec, _ = mergekit_yaml.to_spec(docs[0], out, where=config, seed=seed, warn=ignored.append, **mapped, **opts)
        _notes(notes)
        for line in ignored:
            click.echo(f"umerge: warning: {line}", err=True)
        click.echo(json.dumps(spec, indent=2))
        return
    opts = _opts(kw)
    out = opts.pop("out")
    if multi:
        def say(stage: mergekit_multi.Stage, k: int, n: int) -> None:
            if not quiet:
                click.echo(f"umerge: {stage.label} ({k} of {n}) -> {stage.out}", err=True)

        report = mergekit_multi.run(docs, out, where=config, intermediate_dir=intermediate_dir,
                                    keep_intermediate=keep_intermediate, seed=seed, on_stage=say, **mapped, **opts)
    else:
        report = mergekit_yaml.run_config(docs[0], out, where=config, seed=seed, **mapped, **opts)
    _notes(notes)  # once the merge is done, so that a failure stays one line
    _finish(report, quiet)


def _notes(notes: list[str]) -> None:
    for note in notes:
        click.echo(f"umerge: note: {note}", err=True)
