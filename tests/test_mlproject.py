"""MLproject and conda.yaml against TrainConfig and setup.cfg, and a real `mlflow run`."""

import configparser
import json
import re
import shlex
import subprocess
import sys

import yaml
from mlflow import MlflowClient

from alexnet_mlflow.config import fields, format_param
from conftest import REPO, assert_complete_run, cli_env, run_cli

MLPROJECT = yaml.safe_load((REPO / "MLproject").read_text())


def entry_point(name="main"):
    return MLPROJECT["entry_points"][name]


def test_main_parameters_are_the_train_config_fields():
    parameters = entry_point()["parameters"]
    assert list(parameters) == [f.name for f in fields()]
    for f in fields():
        spec = parameters[f.name]
        # MLproject types are string, float, path, uri: numbers are float, the rest strings.
        assert spec["type"] == ("float" if f.type in ("int", "float") else "string"), f.name
        # `mlflow run` logs str(default): the same string that TrainConfig.as_params logs.
        assert str(spec["default"]) == format_param(f.default), f.name


def test_command_passes_every_parameter_to_its_option():
    command = entry_point()["command"]
    for f in fields():
        option = "--" + f.name.replace("_", "-")
        form = f"{option}={{{f.name}}}" if f.type == "bool" else f"{option} {{{f.name}}}"
        assert command.count(f"{{{f.name}}}") == 1 and form in command, f.name


def test_command_with_the_defaults_is_accepted_by_the_cli(workdir):
    """Fill the command as `mlflow run` does (shell-quoted values) and dry-run it."""
    values = {name: shlex.quote(str(spec["default"])) for name, spec in entry_point()["parameters"].items()}
    values["dataset"] = "synthetic"
    command = entry_point()["command"].format(**values) + " --dry-run"
    result = subprocess.run(["bash", "-c", command], cwd=workdir, env=cli_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "dry run ok: relu-lr1e-4-bs64-do0.8" in result.stdout


def test_conda_env_lists_the_setup_cfg_dependencies():
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    required = [line.strip() for line in setup["options"]["install_requires"].splitlines() if line.strip()]
    conda = yaml.safe_load((REPO / MLPROJECT["conda_env"]).read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert [p for p in pip if p != "-e ."] == required
    assert "python=3.11" in conda["dependencies"]


def test_mlflow_run_end_to_end_against_a_server(workdir, mlflow_server):
    """As users type it: no --experiment-name, so MLflow puts the run in its Default experiment,
    and `compare` with no experiment named ranks it."""
    result = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(REPO), "--env-manager", "local",
         "-P", "dataset=synthetic", "-P", "epochs=1", "-P", "activation=relu", "-P", "dropout=0.8",
         "-P", "batch_norm=true"],
        cwd=workdir, env=cli_env(MLFLOW_TRACKING_URI=mlflow_server), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FINISHED in experiment 'Default'" in result.stdout
    run_id = re.search(r"Run \(ID '([0-9a-f]{32})'\) succeeded", result.stderr).group(1)
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("Default").experiment_id],
                              "tags.`mlflow.source.type` = 'PROJECT'")
    assert [r.info.run_id for r in runs] == [run_id]  # the project's own run, not a second one
    run = runs[0]
    assert run.info.run_name == "relu-lr1e-4-bs64-do0.8"
    assert run.data.tags["mlflow.source.type"] == "PROJECT"
    assert_complete_run(mlflow_server, run.info.run_id, epochs=1, params={
        "epochs": "1", "dataset": "synthetic", "batch_norm": "true", "lr": "0.0001", "dropout": "0.8"})
    assert set(run.data.params) == {f.name for f in fields()}
    ranked = run_cli("compare", "--tracking-uri", mlflow_server, "--format", "json", cwd=workdir, timeout=120)
    assert ranked.returncode == 0, ranked.stderr
    assert run_id in [row["run_id"] for row in json.loads(ranked.stdout)]


def cli_options(command_name: str) -> dict[str, object]:
    """The command's options as MLproject would name them: --group-by -> group_by, with defaults."""
    import typer

    from alexnet_mlflow.cli import app

    command = typer.main.get_command(app).commands[command_name]
    return {p.opts[0][2:].replace("-", "_"): p.default for p in command.params
            if p.opts[0].startswith("--") and p.name not in ("help", "tracking_uri")}


def test_compare_parameters_are_the_compare_options():
    parameters = entry_point("compare")["parameters"]
    options = cli_options("compare")
    assert list(parameters) == list(options)
    for name, default in options.items():
        expected = "" if default is None else ",".join(default) if isinstance(default, (list, tuple)) \
            else format_param(default)
        assert str(parameters[name]["default"]) == expected, name
        form = f"--{name.replace('_', '-')}" + ("=" if isinstance(default, bool) else " ") + f"{{{name}}}"
        assert form in entry_point("compare")["command"], name


def test_mlflow_run_compare_entry_point(workdir, mlflow_server):
    """Two finished runs in an experiment; `mlflow run -e compare` ranks them into a JSON file."""
    client = MlflowClient(mlflow_server)
    experiment_id = client.create_experiment("project-compare")
    for name, loss in (("worse", 0.9), ("better", 0.3)):
        run = client.create_run(experiment_id, run_name=name)
        client.log_metric(run.info.run_id, "val_loss", loss, step=1)
        client.set_terminated(run.info.run_id)
    out = workdir / "ranking.json"
    result = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "compare", "--env-manager", "local",
         "--experiment-name", "project-compare", "-P", "experiment=project-compare", "-P", "format=json",
         "-P", f"output={out}", "-P", "where=", "-P", "top=2"],
        cwd=workdir, env=cli_env(MLFLOW_TRACKING_URI=mlflow_server), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    assert [row["run"] for row in json.loads(out.read_text())] == ["better", "worse"]


def test_sweep_parameters_are_the_sweep_options():
    parameters = entry_point("sweep")["parameters"]
    options = {k: v for k, v in cli_options("sweep").items() if k != "quiet"}
    assert list(parameters) == list(options)
    for name, default in options.items():
        # Unset (None) is the empty string, which the command reads as "not given".
        assert str(parameters[name]["default"]) == ("" if default is None else format_param(default)), name
        form = f"--{name.replace('_', '-')}" + ("=" if isinstance(default, bool) else " ") + f"{{{name}}}"
        assert form in entry_point("sweep")["command"], name


def test_mlflow_run_sweep_entry_point_nests_trials_under_the_project_run(workdir, mlflow_server):
    # The storage is named: `mlflow run` runs the command in the project folder, not in workdir.
    result = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "sweep", "--env-manager", "local",
         "--experiment-name", "project-sweep", "-P", "activation=relu,leaky_relu", "-P", "dataset=synthetic",
         "-P", "epochs=1", "-P", "batch_size=256", "-P", f"storage=sqlite:///{workdir}/optuna.db"],
        cwd=workdir, env=cli_env(MLFLOW_TRACKING_URI=mlflow_server), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("project-sweep").experiment_id])
    project = [r for r in runs if r.data.tags.get("mlflow.source.type") == "PROJECT"]
    assert len(project) == 1 and project[0].info.status == "FINISHED"
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == project[0].info.run_id]
    assert sorted(r.data.params["activation"] for r in trials) == ["leaky_relu", "relu"]
    assert all(r.info.status == "FINISHED" for r in trials) and len(runs) == 3
