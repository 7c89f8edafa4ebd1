"""The `alexnet-mlflow` command. Thin: it parses, calls the library, and renders.

Importing this module imports no torch and no mlflow, so `--help` answers in well under a second;
commands import what they need when they run.
"""

from __future__ import annotations

import functools
import inspect
import sys
import typing
from typing import Annotated, Optional

import typer

from alexnet_mlflow import compare as compare_defaults  # imports no torch and no mlflow
from alexnet_mlflow import config as config_module
from alexnet_mlflow import runtime
from alexnet_mlflow import space as spaces  # space and sweep import no torch, optuna or mlflow
from alexnet_mlflow import sweep as sweeps
from alexnet_mlflow.config import TrainConfig
from alexnet_mlflow.errors import ConfigError, Terminated, UserError
from alexnet_mlflow.tracking import (  # mlflow is imported lazily there
    DEFAULT_EXPERIMENT,
    SYNC_TIMEOUT_S,
    redact_uri,
)

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.callback()
def _app() -> None:
    """Train AlexNet on CIFAR-10, track every run in MLflow, and rank runs in tables."""
    # The app-level help; a callback also keeps every command a subcommand.


# Options shared by commands, declared once.
Experiment = Annotated[str, typer.Option(
    envvar="MLFLOW_EXPERIMENT_NAME", help="MLflow experiment name.", rich_help_panel="Tracking")]
TrackingUri = Annotated[Optional[str], typer.Option(
    envvar="MLFLOW_TRACKING_URI", show_default="sqlite:///mlflow.db in this folder",
    help="MLflow tracking URI, e.g. http://127.0.0.1:5000.", rich_help_panel="Tracking")]
RunName = Annotated[Optional[str], typer.Option(
    show_default="from the key params, e.g. relu-lr1e-4-bs64-do0.8", help="MLflow run name.",
    rich_help_panel="Tracking")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")]
DryRun = Annotated[bool, typer.Option(
    "--dry-run", help="Check the config, server, device and data, run one batch, log nothing.")]


def with_config_options(command):
    """Replace the command's `config: TrainConfig` parameter by one option per TrainConfig field,
    with the field's name, type, default and help, and pass the built TrainConfig back in."""
    signature = inspect.signature(command, eval_str=True)
    hints = typing.get_type_hints(TrainConfig)
    options = []
    for f in config_module.fields():
        help_text = f.metadata["help"]
        if f.metadata["choices"]:
            help_text += f" One of: {', '.join(f.metadata['choices'])}."
        kind = hints[f.name]
        number = {"parser": _number_parser(kind), "metavar": kind.__name__.upper()} if kind in (int, float) else {}
        options.append(inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
            annotation=Annotated[kind, typer.Option(help=help_text, rich_help_panel="Training", **number)],
        ))
    others = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
              for name, p in signature.parameters.items() if name != "config"]

    @functools.wraps(command)
    def wrapper(**kwargs):
        config = TrainConfig(**{f.name: kwargs.pop(f.name) for f in config_module.fields()})
        return command(config=config, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=options + others)
    wrapper.__annotations__ = {p.name: p.annotation for p in options + others}
    return wrapper


def _number_parser(kind: type):
    """int or float from text, with an error that names the text (typer's own does not).

    Integers also accept "2.0": MLproject's only numeric type is float.
    """
    accepted = "an integer" if kind is int else "a number"

    def parse(text) -> int | float:
        try:
            return kind(text)
        except ValueError:
            if kind is int and _is_integral(text):
                return int(float(text))
            raise typer.BadParameter(f"{text!r} is not {accepted}") from None

    return parse


def _is_integral(text: str) -> bool:
    try:
        return float(text).is_integer()
    except ValueError:
        return False


SyncTimeout = Annotated[float, typer.Option(
    help="At the end, seconds to keep trying an absent tracking server; then `alexnet-mlflow sync` sends the rest.",
    rich_help_panel="Tracking", parser=_number_parser(float), metavar="SECONDS")]


@app.command()
@with_config_options
def train(
    config: TrainConfig,
    experiment: Experiment = DEFAULT_EXPERIMENT,
    tracking_uri: TrackingUri = None,
    run_name: RunName = None,
    quiet: Quiet = False,
    dry_run: DryRun = False,
    resume: Annotated[Optional[str], typer.Option(
        metavar="RUN_ID", help="Continue this killed or interrupted run from its last checkpoint, with its own "
        "parameters (training options are ignored).", rich_help_panel="Tracking")] = None,
    sync_timeout: SyncTimeout = SYNC_TIMEOUT_S,
    register_as: Annotated[Optional[str], typer.Option(
        metavar="NAME", help="Register the run's model as a new version of this registered model.",
        rich_help_panel="Tracking")] = None,
) -> None:
    """Train AlexNet and log the run (params, per-epoch metrics, checkpoints, model, plots) to MLflow."""
    from alexnet_mlflow import job
    from alexnet_mlflow.progress import RichProgress

    if dry_run:
        summary = job.dry_run(config, tracking_uri)
        typer.echo(f"dry run ok: {summary}")
        return
    if resume:
        outcome = job.resume_and_track(resume, tracking_uri, None if quiet else RichProgress, sync_timeout)
    elif quiet:
        outcome = job.train_and_track(config, experiment, tracking_uri, run_name, sync_timeout=sync_timeout)
    else:
        with RichProgress(config.epochs) as progress:
            outcome = job.train_and_track(config, experiment, tracking_uri, run_name, progress,
                                          sync_timeout=sync_timeout)
    result = outcome.result
    test = (f"test_loss {result.test_loss:.4f} test_acc {result.test_acc:.4f}" if result.test_acc is not None
            else "no test split: test metrics not logged")
    typer.echo(
        f"run {outcome.run_id} FINISHED in experiment {outcome.experiment!r} at {redact_uri(tracking_uri)}\n"
        f"best epoch {result.best.epoch}: val_loss {result.best.val_loss:.4f} val_acc {result.best.val_acc:.4f}; "
        f"{test}\nmodel: {outcome.model_uri}"
    )
    if register_as and not outcome.undelivered:
        from alexnet_mlflow.tracking import register_model

        version = register_model(outcome.model_uri, register_as, tracking_uri)
        typer.echo(f"registered {outcome.model_uri} as {register_as} version {version}")
    if outcome.undelivered:
        typer.echo(f"alexnet-mlflow: warning: the tracking server did not answer for {sync_timeout:g} s: "
                   f"{outcome.undelivered} logged item(s) wait on this machine; run `alexnet-mlflow sync` "
                   "when it is back", err=True)


@app.command()
def sync(
    tracking_uri: Annotated[Optional[str], typer.Option(
        show_default="each run's own", help="Send to this server instead.", rich_help_panel="Tracking")] = None,
    timeout: Annotated[float, typer.Option(
        help="Seconds to keep trying while the server does not answer.", parser=_number_parser(float),
        metavar="SECONDS")] = 0.0,
) -> None:
    """Send what training logged while the tracking server was away (metrics, tags, artifacts, status)."""
    from alexnet_mlflow import render, tracking
    from alexnet_mlflow.compare import Table

    results = tracking.sync(tracking_uri, timeout)
    if not results:
        typer.echo("nothing to sync: every run's journal was delivered")
        return
    render.print_rich(Table("journals", ("run_id", "tracking_uri", "delivered", "pending"),
                            tuple((r.run_id, r.tracking_uri, r.delivered, r.pending) for r in results)))
    pending = sum(r.pending for r in results)
    if pending:
        _fail(f"{pending} item(s) still pending: the server does not answer; run sync again when it does", 1)


def _split(items: list[str] | None) -> tuple[str, ...]:
    """Repeatable options also take comma-separated values: MLproject passes one string."""
    return tuple(part.strip() for item in items or () for part in item.split(",") if part.strip())


@app.command()
def compare(
    metric: Annotated[str, typer.Option(help="Metric to rank by.")] = "val_loss",
    agg: Annotated[str, typer.Option(
        help="Value that stands for a run: last, or min / max over its history.")] = "last",
    asc: Annotated[bool, typer.Option("--asc", help="Lowest first (default for losses and errors).")] = False,
    desc: Annotated[bool, typer.Option("--desc", help="Highest first (default for accuracies).")] = False,
    experiment: Annotated[Optional[list[str]], typer.Option(
        envvar="MLFLOW_EXPERIMENT_NAME", show_default=compare_defaults.DEFAULT_SCOPE,
        help="Experiment(s) to read; repeat or separate with commas. By default also the trainings that "
             "`mlflow run` without --experiment-name put in MLflow's Default experiment.",
    )] = None,
    filter: Annotated[str, typer.Option(help="MLflow search filter, e.g. \"params.lr = '0.0001'\".")] = "",
    where: Annotated[Optional[list[str]], typer.Option(
        help="PARAM=VALUE that must hold; repeat or separate with commas.")] = None,
    status: Annotated[str, typer.Option(help="Run status to show; ALL for every status.")] = "FINISHED",
    all_statuses: Annotated[bool, typer.Option("--all", help="Every status (same as --status ALL).")] = False,
    parent: Annotated[str, typer.Option(help="Only the children of this run id (a sweep).")] = "",
    top: Annotated[int, typer.Option(help="Show the best N runs (0 = all).")] = 0,
    params: Annotated[str, typer.Option(help="Param columns, comma-separated.")] = ",".join(compare_defaults.KEY_PARAMS),
    metrics: Annotated[str, typer.Option(
        show_default="the headline metrics", help="Other metric columns, comma-separated.")] = "",
    epochs: Annotated[str, typer.Option(
        help="Epoch table instead: one row per epoch (e.g. 1,5,10,15,20,30,40,50), one column per run.")] = "",
    group_by: Annotated[Optional[list[str]], typer.Option(
        help="Group table instead: mean ± std over runs sharing these params (e.g. seeds); "
             "with --epochs, each group's mean per epoch.")] = None,
    format: Annotated[str, typer.Option(help="table, csv, markdown or json.")] = "table",
    output: Annotated[str, typer.Option(help="Write to this file instead of standard output.")] = "",
    plot: Annotated[str, typer.Option(help="Also draw the metric's per-epoch curves of the top runs to this PNG.")] = "",
    register_best: Annotated[str, typer.Option(
        metavar="NAME", help="Register the top run's model as a new version of NAME, with the alias champion.")] = "",
    tracking_uri: TrackingUri = None,
) -> None:
    """Rank runs by a metric, from the tracking server: which configuration is best, and by how much."""
    from alexnet_mlflow import compare as comparing
    from alexnet_mlflow import render

    if asc and desc:
        raise ConfigError("--asc and --desc contradict each other: pass one of them")
    if format not in render.FORMATS:
        raise ConfigError(f"format {format!r} is not one of {', '.join(render.FORMATS)}")
    status_filter = None if all_statuses or status.upper() == "ALL" else status.upper()
    query = comparing.CompareQuery(
        metric=metric, agg=agg, descending=True if desc else False if asc else None,
        experiments=_split(experiment), filter=filter, where=_split(where),
        status=status_filter, parent=parent or None, top=top or None, params=_split([params]),
        metrics=_split([metrics]) or None, epochs=_parse_epochs(epochs), group_by=_split(group_by),
    )
    table, ranked = comparing.compare(query, tracking_uri)
    if plot:
        from alexnet_mlflow.plots import metric_curves_figure

        metric_curves_figure(comparing.curves(query, ranked, tracking_uri), query.metric).savefig(plot, dpi=120)
    _emit(table, format, output)
    if register_best:
        from alexnet_mlflow.tracking import register_model

        best = next(r for r in ranked if r.rank is not None)
        model_uri = f"runs:/{best.run.run_id}/model"
        version = register_model(model_uri, register_best, tracking_uri, alias=CHAMPION)
        # stderr: stdout may be a csv or json table someone parses
        typer.echo(f"registered {model_uri} ({best.run.name}) as {register_best} version {version}, "
                   f"alias {CHAMPION}", err=True)


CHAMPION = "champion"


@app.command()
def predict(
    paths: Annotated[list[str], typer.Argument(help="Image files, or folders of them (PNG, JPEG, ...; any size).")],
    model: Annotated[Optional[str], typer.Option(
        help="Model URI: runs:/RUN_ID/model, models:/NAME/VERSION or models:/NAME@ALIAS.")] = None,
    best: Annotated[bool, typer.Option("--best", help="Use the model of the top run of compare by --metric.")] = False,
    metric: Annotated[str, typer.Option(help="With --best: the metric that ranks runs.")] = "val_loss",
    experiment: Annotated[Optional[str], typer.Option(
        envvar="MLFLOW_EXPERIMENT_NAME", show_default=compare_defaults.DEFAULT_SCOPE,
        help="With --best: the experiment to rank, as in compare.")] = None,
    top: Annotated[int, typer.Option(help="Classes with their probabilities per image.")] = 3,
    format: Annotated[str, typer.Option(help="table, csv, markdown or json.")] = "table",
    output: Annotated[str, typer.Option(help="Write to this file instead of standard output.")] = "",
    tracking_uri: TrackingUri = None,
) -> None:
    """Classify images with a logged model: each file's predicted class and top classes."""
    from alexnet_mlflow import compare as comparing
    from alexnet_mlflow import predict as predicting
    from alexnet_mlflow import render, tracking

    if format not in render.FORMATS:
        raise ConfigError(f"format {format!r} is not one of {', '.join(render.FORMATS)}")
    if model and best:
        raise ConfigError("--model and --best both choose a model: pass one of them")
    if not model and not best:
        raise ConfigError("no model: pass --model URI or --best (the top run of compare)")
    if not 1 <= top <= 10:
        raise ConfigError(f"top={top} is invalid: expected an integer from 1 to 10")
    files = predicting.image_files(paths)
    if best:
        query = comparing.CompareQuery(metric=metric, experiments=(experiment,) if experiment else ())
        ranked = comparing.ranked_runs(query, tracking_uri)
        model = f"runs:/{ranked[0].run.run_id}/model"
    loaded, classes = tracking.load_model(model, tracking_uri)
    _emit(predicting.prediction_table(predicting.predict(loaded, classes, files, top), model), format, output)


def with_space_options(command):
    """Replace the command's `space: dict` parameter by one text option per TrainConfig field:
    one value fixes the field for every trial, comma-separated values sweep it."""
    signature = inspect.signature(command, eval_str=True)
    options = []
    for f in config_module.fields():
        options.append(inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
            annotation=Annotated[Optional[str], typer.Option(
                show_default=config_module.format_param(f.default), rich_help_panel="Search space",
                help=f"{f.metadata['help']} Comma-separated values are swept.")],
        ))
    others = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
              for name, p in signature.parameters.items() if name != "space"]

    @functools.wraps(command)
    def wrapper(**kwargs):
        space = {f.name: kwargs.pop(f.name) for f in config_module.fields()}
        return command(space=space, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=options + others)
    wrapper.__annotations__ = {p.name: p.annotation for p in options + others}
    return wrapper


def _optional_number(kind: type):
    """A number option that MLproject can leave unset with an empty string."""
    parse = _number_parser(kind)
    return lambda text: None if text in ("", None) else parse(text)


SPEC = spaces.SweepSpec.__dataclass_fields__
RUNTIME = sweeps.SweepOptions.__dataclass_fields__


def _spec_option(name: str, kind: type, help: str, **extra):
    """A sweep setting whose default lives in SweepSpec / SweepOptions (None = that default)."""
    field = SPEC.get(name) or RUNTIME[name]
    parser = {"parser": _optional_number(kind), "metavar": kind.__name__.upper()} if kind in (int, float) else {}
    return Annotated[Optional[kind], typer.Option(show_default=str(field.default), help=help,
                                                  rich_help_panel="Sweep", **parser, **extra)]


@app.command()
@with_space_options
def sweep(
    space: dict,
    preset: Annotated[Optional[str], typer.Option(
        help=f"A packaged search space: {', '.join(spaces.PRESETS)} (the report's 6 configurations x 3 seeds).",
        rich_help_panel="Sweep")] = None,
    space_file: Annotated[Optional[str], typer.Option(
        "--space", help="YAML search space (see docs/sweeps.md); options override it.", rich_help_panel="Sweep")] = None,
    seeds: _spec_option("seeds", int, "Grid: train every point with this many seeds (--seed, --seed+1, ...).") = None,
    sampler: _spec_option("sampler", str, f"One of: {', '.join(spaces.SAMPLERS)}.") = None,
    n_trials: _spec_option("n_trials", int, "Trials of random and tpe (a grid runs every point).") = None,
    metric: _spec_option("metric", str, "Metric the study optimises and the tables rank by.") = None,
    prune: Annotated[bool, typer.Option(
        "--prune", help="Stop unpromising trials early (Optuna's MedianPruner on the per-epoch metric).",
        rich_help_panel="Sweep")] = False,
    prune_startup_trials: _spec_option("prune_startup_trials", int, "Trials that finish before any is pruned.") = None,
    prune_warmup_epochs: _spec_option("prune_warmup_epochs", int, "Epochs a trial runs before it may be pruned.") = None,
    study: Annotated[Optional[str], typer.Option(
        show_default="sweep-<hash of the sweep's settings>", help="Optuna study name.", rich_help_panel="Sweep")] = None,
    storage: Annotated[Optional[str], typer.Option(
        show_default="sqlite optuna.db beside a sqlite mlflow.db, or in this folder",
        help="Optuna storage URL; share one database between machines.", rich_help_panel="Sweep")] = None,
    workers: _spec_option("workers", int, "Local worker processes.") = None,
    stale_after: _spec_option("stale_after", float,
                              "Seconds without a heartbeat before another worker reruns a trial.") = None,
    experiment: Experiment = DEFAULT_EXPERIMENT,
    tracking_uri: TrackingUri = None,
    quiet: Quiet = False,
) -> None:
    """Run a study: many trainings as child runs of one MLflow run, on Optuna, in parallel."""
    from alexnet_mlflow import render

    if preset and space_file:
        raise ConfigError("--preset and --space both give a search space: pass one of them")
    loaded = spaces.preset_space(preset) if preset else spaces.load_space(space_file) if space_file else {}
    spec = spaces.build_spec(
        loaded, space, seeds=seeds, sampler=sampler, n_trials=n_trials, metric=metric, prune=prune or None,
        prune_startup_trials=prune_startup_trials, prune_warmup_epochs=prune_warmup_epochs,
    )
    runtime = {"workers": workers, "stale_after": stale_after}
    options = sweeps.SweepOptions(experiment=experiment, tracking_uri=tracking_uri, study=study or None,
                                    storage=storage or None, **{k: v for k, v in runtime.items() if v is not None})
    if quiet:
        tables, outcome = sweeps.run_sweep(spec, options)
    else:
        from alexnet_mlflow.progress import TrialProgress

        with TrialProgress() as progress:
            tables, outcome = sweeps.run_sweep(spec, options, progress.update)
    for table in tables:
        render.print_rich(table)
    states = ", ".join(f"{n} {state}" for state, n in sorted(outcome.states.items())) or "none"
    best = f"; best {spec.metric} {outcome.best_value:.4f} (run {outcome.best_run_id})" if outcome.best_run_id else ""
    typer.echo(f"sweep {outcome.study} (storage {outcome.storage}): trained {outcome.trained} trial(s) now; "
               f"trials: {states}{best}\nparent run {outcome.parent_run_id} in experiment {outcome.experiment!r}")
    if outcome.missing:
        _fail(f"{outcome.missing} trial(s) did not finish: run the same command again to retry them", 1)


def _parse_epochs(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in _split([text]))
    except ValueError:
        raise ConfigError(f"epochs {text!r} is invalid: expected comma-separated integers, e.g. 1,5,10") from None


def _emit(table, fmt: str, output: str) -> None:
    from alexnet_mlflow import render

    if fmt == "table":
        if output:
            with open(output, "w") as f:
                render.print_rich(table, f)
        else:
            render.print_rich(table)
        return
    text = render.render_text(table, fmt)
    if output:
        with open(output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


def _bool_values_as_flags(argv: list[str]) -> list[str]:
    """`--batch-norm=true|false` -> `--batch-norm` / `--no-batch-norm`, for every flag of the command.

    MLproject can only pass values, and typer's booleans are flags; this lets MLproject's
    `--batch-norm={batch_norm}` reach the same option a person types.
    """
    command = typer.main.get_command(app)
    sub = command.commands.get(argv[0]) if argv and hasattr(command, "commands") else None
    if sub is None:
        return argv
    flags = {p.opts[0]: p for p in sub.params if getattr(p, "is_flag", False) and p.opts and p.opts[0].startswith("--")}
    out = [argv[0]]
    for arg in argv[1:]:
        option, sep, value = arg.partition("=")
        if option in flags and sep:
            name = flags[option].name
            if value.lower() not in ("true", "false"):
                raise ConfigError(f"{name}={value!r} is invalid: expected true or false")
            if value.lower() == "true":
                arg = option
            elif flags[option].secondary_opts:
                arg = flags[option].secondary_opts[0]
            else:
                continue  # a flag without an off form is off when absent
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and a non-zero exit."""
    if argv is None and sys.argv[1:2] in (["train"], ["sweep"]):
        runtime.restart_with_fast_malloc()  # before torch loads; sweep's workers inherit it
    argv = sys.argv[1:] if argv is None else argv
    command = typer.main.get_command(app)
    try:
        code = command.main(args=_bool_values_as_flags(list(argv)), prog_name="alexnet-mlflow",
                            standalone_mode=False)
    except typer.TyperException as e:  # bad options: the message names the option and the value
        _fail(f"{e.format_message()} (see alexnet-mlflow --help)", e.exit_code)
    except UserError as e:
        _fail(str(e), 2)
    except (typer.Abort, KeyboardInterrupt):
        code = 130
    except Terminated:
        _fail("terminated (SIGTERM): the run was ended KILLED; `alexnet-mlflow train --resume RUN_ID` continues it", 143)
    if code == 130:  # typer turns Ctrl-C into exit code 130; the run has been ended KILLED
        _fail("interrupted", 130)
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, code: int) -> typing.NoReturn:
    typer.echo(f"alexnet-mlflow: error: {message}", err=True)
    sys.exit(code)
