"""Sweeps: real `alexnet-mlflow sweep` processes against a real mlflow server and a shared
Optuna storage, on tiny synthetic trials (batch 256: 4 steps an epoch)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from conftest import cli_env, run_cli, wait_until
from mlflow import MlflowClient

from alexnet_mlflow import space, sweep
from alexnet_mlflow.errors import ConfigError

QUICK = ("--dataset", "synthetic", "--batch-size", "256", "--quiet")


def children(client: MlflowClient, parent_run_id: str):
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def parent_of(client: MlflowClient, experiment: str):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                              "tags.`sweep.study` LIKE 'sweep-%' AND attributes.run_name LIKE 'sweep-%'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


# ---- the study and the CLI ------------------------------------------------------------------

def test_a_study_name_cannot_be_reused_for_another_sweep(tmp_path):
    options = sweep.SweepOptions(experiment="e", study="mine", storage=f"sqlite:///{tmp_path}/optuna.db")
    sweep.open_study(space.build_spec({}, {"lr": "1e-3,1e-4"}), options)
    sweep.open_study(space.build_spec({}, {"lr": "1e-3,1e-4"}), options)  # the same sweep: fine
    with pytest.raises(ConfigError, match="study 'mine' in .* belongs to another sweep"):
        sweep.open_study(space.build_spec({}, {"lr": "1e-3,1e-2"}), options)


def test_cli_rejects_a_bad_value_before_anything_starts(workdir):
    result = run_cli("sweep", "--activation", "relu,foo", *QUICK, cwd=workdir, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "alexnet-mlflow: error: activation 'foo' is not one of relu, leaky_relu, sigmoid, tanh, elu, gelu"]
    assert not (workdir / "optuna.db").exists() and not (workdir / "mlflow.db").exists()


def test_data_that_is_not_there_is_one_line_before_any_trial(workdir):
    (workdir / "empty-ish").mkdir()
    (workdir / "empty-ish" / "notes.txt").write_text("not CIFAR-10")
    result = run_cli("sweep", "--lr", "1e-3,1e-4", "--epochs", "1", "--data-dir", "empty-ish", "--quiet",
                     cwd=workdir, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"alexnet-mlflow: error: data_dir {workdir / 'empty-ish'} holds no CIFAR-10: expected "
                           "cifar-10-batches-py/")
    assert not (workdir / "optuna.db").exists() and not (workdir / "mlflow.db").exists()


# ---- real sweeps against a real server --------------------------------------------------------

def test_grid_with_two_workers_then_a_rerun_that_trains_nothing(workdir, mlflow_server):
    storage = f"sqlite:///{workdir}/shared-optuna.db"
    args = ("sweep", "--activation", "relu,leaky_relu", "--lr", "1e-3,1e-4", "--epochs", "1", "--workers", "2",
            "--storage", storage, "--experiment", "grid", "--tracking-uri", mlflow_server, *QUICK)
    first = run_cli(*args, cwd=workdir)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "trained 4 trial(s) now; trials: 4 COMPLETE" in first.stdout
    assert "runs ranked by val_loss" in first.stdout

    client = MlflowClient(mlflow_server)
    parent = parent_of(client, "grid")
    assert parent.info.status == "FINISHED"
    runs = children(client, parent.info.run_id)
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 4
    configs = {(r.data.params["activation"], r.data.params["lr"]) for r in runs}
    assert configs == {("relu", "0.001"), ("relu", "0.0001"), ("leaky_relu", "0.001"), ("leaky_relu", "0.0001")}
    assert sorted(r.data.tags["sweep.trial"] for r in runs) == ["0", "1", "2", "3"]
    assert {r.data.tags["sweep.study"] for r in runs} == {parent.data.tags["sweep.study"]}
    best = min(runs, key=lambda r: r.data.metrics["val_loss"])
    assert parent.data.tags["sweep.best_run_id"] == best.info.run_id
    assert parent.data.metrics["best_val_loss"] == pytest.approx(best.data.metrics["val_loss"])
    summary = [a.path for a in client.list_artifacts(parent.info.run_id, "summary")]
    assert summary == ["summary/1-runs_ranked_by_val_loss.md"]

    second = run_cli(*args, cwd=workdir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "trained 0 trial(s) now; trials: 4 COMPLETE" in second.stdout
    assert len(children(client, parent.info.run_id)) == 4
    assert parent_of(client, "grid").info.run_id == parent.info.run_id  # the same parent, FINISHED again
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


def test_a_killed_worker_s_trial_is_rerun_by_the_next_sweep(workdir, mlflow_server):
    args = ["sweep", "--seeds", "2", "--epochs", "1", "--workers", "1", "--experiment", "killed",
            "--tracking-uri", mlflow_server, *QUICK]
    exe = [sys.executable, "-m", "alexnet_mlflow"]
    process = subprocess.Popen([*exe, *args], cwd=workdir, env=cli_env(), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = MlflowClient(mlflow_server)

    def training_child():
        experiment = client.get_experiment_by_name("killed")
        if experiment is None:
            return None
        runs = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING' AND tags.`sweep.trial` = '0'")
        return next((r for r in runs if "dataset" in r.data.tags), None)  # started, in its first epoch

    try:
        victim = wait_until(training_child, 180, "the first trial to start training", process=process)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the sweep and its worker, mid-trial, no cleanup
        process.wait(timeout=30)
    assert client.get_run(victim.info.run_id).info.status == "RUNNING"

    rerun = run_cli(*args[:-len(QUICK)], "--workers", "2", *QUICK, cwd=workdir)  # workers: not the sweep's identity
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "trials: 2 COMPLETE" in rerun.stdout
    parent = parent_of(client, "killed")
    runs = children(client, parent.info.run_id)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert sorted(r.data.params["seed"] for r in finished) == ["0", "1"]
    assert all(len(client.get_metric_history(r.info.run_id, "val_loss")) == 1 for r in finished)
    orphan = client.get_run(victim.info.run_id)
    assert orphan.info.status == "KILLED" and "stopped" in orphan.data.tags["sweep.orphaned"]


def test_tpe_sweep_over_a_space_file(workdir, mlflow_server):
    space = workdir / "space.yaml"
    space.write_text("lr: {low: 1.0e-4, high: 1.0e-2, log: true}\ndropout: [0.5, 0.8]\nepochs: 1\n")
    result = run_cli("sweep", "--space", str(space), "--sampler", "tpe", "--n-trials", "3", "--workers", "2",
                     "--experiment", "tpe", "--tracking-uri", mlflow_server, *QUICK, cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trials: 3 COMPLETE" in result.stdout
    client = MlflowClient(mlflow_server)
    parent = parent_of(client, "tpe")
    assert parent.data.tags["sweep.sampler"] == "tpe"
    runs = children(client, parent.info.run_id)
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    assert all(1e-4 <= float(r.data.params["lr"]) <= 1e-2 for r in runs)
    assert {r.data.params["dropout"] for r in runs} <= {"0.5", "0.8"}


def test_pruned_trial_ends_killed_with_its_epoch(workdir, mlflow_server):
    """relu trains first and finishes; sigmoid's epoch-1 val_loss (~2.36 on this data) is worse
    than relu's (~2.30), so the median pruner, active after one finished trial, stops it there."""
    result = run_cli("sweep", "--activation", "relu,sigmoid", "--lr", "1e-3", "--epochs", "2", "--workers", "1",
                     "--prune", "--prune-startup-trials", "1", "--experiment", "pruned",
                     "--tracking-uri", mlflow_server, *QUICK, cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trials: 1 COMPLETE, 1 PRUNED" in result.stdout
    client = MlflowClient(mlflow_server)
    runs = {r.data.params["activation"]: r for r in children(client, parent_of(client, "pruned").info.run_id)}
    assert runs["relu"].info.status == "FINISHED"
    pruned = runs["sigmoid"]
    assert pruned.info.status == "KILLED"
    assert pruned.data.tags["pruned"] == "true" and pruned.data.tags["pruned_at_epoch"] == "1"
    assert [m.step for m in client.get_metric_history(pruned.info.run_id, "val_loss")] == [1]
