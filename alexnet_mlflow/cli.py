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

from alexnet_mlflow import config as config_module
from alexnet_mlflow.config import TrainConfig
from alexnet_mlflow.errors import ConfigError, UserError
from alexnet_mlflow.tracking import DEFAULT_EXPERIMENT, redact_uri  # mlflow is imported lazily there

app = typer.Typer(
    help="Train AlexNet on CIFAR-10, track every run in MLflow, and rank runs in tables.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



@app.callback()
def _app() -> None:
    """Train AlexNet on CIFAR-10, track every run in MLflow, and rank runs in tables."""


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


@app.command()
@with_config_options
def train(
    config: TrainConfig,
    experiment: Experiment = DEFAULT_EXPERIMENT,
    tracking_uri: TrackingUri = None,
    run_name: RunName = None,
    quiet: Quiet = False,
    dry_run: DryRun = False,
) -> None:
    """Train AlexNet and log the run (params, per-epoch metrics, model, plots) to MLflow."""
    from alexnet_mlflow import job
    from alexnet_mlflow.progress import RichProgress

    if dry_run:
        summary = job.dry_run(config, tracking_uri)
        typer.echo(f"dry run ok: {summary}")
        return
    if quiet:
        outcome = job.train_and_track(config, experiment, tracking_uri, run_name)
    else:
        with RichProgress(config.epochs) as progress:
            outcome = job.train_and_track(config, experiment, tracking_uri, run_name, progress)
    result = outcome.result
    typer.echo(
        f"run {outcome.run_id} FINISHED in experiment {experiment!r} at {redact_uri(tracking_uri)}\n"
        f"best epoch {result.best.epoch}: val_loss {result.best.val_loss:.4f} val_acc {result.best.val_acc:.4f}; "
        f"test_loss {result.test_loss:.4f} test_acc {result.test_acc:.4f}\n"
        f"model: {outcome.model_uri}"
    )


def _bool_values_as_flags(argv: list[str]) -> list[str]:
    """`--batch-norm=true|false` -> `--batch-norm` / `--no-batch-norm`.

    MLproject can only pass values, and typer's booleans are flags; this lets MLproject's
    `--batch-norm={batch_norm}` reach the same option a person types.
    """
    flags = {f"--{f.name.replace('_', '-')}": f.name for f in config_module.fields() if f.type in (bool, "bool")}
    out = []
    for arg in argv:
        option, _, value = arg.partition("=")
        if option in flags and value:
            if value.lower() not in ("true", "false"):
                raise ConfigError(f"{flags[option]}={value!r} is invalid: expected true or false")
            arg = option if value.lower() == "true" else f"--no-{option[2:]}"
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and a non-zero exit."""
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
    if code == 130:  # typer turns Ctrl-C into exit code 130; the run has been ended KILLED
        _fail("interrupted", 130)
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, code: int) -> typing.NoReturn:
    typer.echo(f"alexnet-mlflow: error: {message}", err=True)
    sys.exit(code)
