"""Faults, each against a real `mlflow server` process: an outage mid-training, SIGKILL then
--resume, SIGTERM, a NaN loss, four runs at once, and a server with basic auth."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from mlflow import MlflowClient

from alexnet_mlflow.journal import journal_root
from conftest import PER_EPOCH_METRICS, MlflowServer, assert_complete_run, cli_env, run_cli, wait_until

QUICK = ("--dataset", "synthetic", "--batch-size", "256", "--quiet")


def start_training(*args: str, cwd, **env: str) -> subprocess.Popen:
    """The CLI in its own process group, so a test can signal or kill it like a user would."""
    return subprocess.Popen([sys.executable, "-m", "alexnet_mlflow", "train", *args], cwd=cwd,
                            env=cli_env(**env), start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run_with_epoch(client: MlflowClient, experiment: str, epoch: int):
    """The experiment's run once it has logged val_loss at `epoch`, else None."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    for run in client.search_runs([found.experiment_id]):
        if any(m.step >= epoch for m in client.get_metric_history(run.info.run_id, "val_loss")):
            return run
    return None


def steps(client: MlflowClient, run_id: str, metric: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, metric))


def test_server_outage_mid_training_loses_nothing(workdir):
    """Kill the server during epoch 2 of 5, start it again on the same store once the run has
    journaled an epoch it could not send: every epoch of every metric arrives, once."""
    server = MlflowServer(workdir / "server")
    (workdir / "server").mkdir()
    url = server.start()
    process = start_training("--epochs", "5", "--experiment", "outage", "--tracking-uri", url, *QUICK, cwd=workdir)
    try:
        run = wait_until(lambda: run_with_epoch(MlflowClient(url), "outage", 1), 180, "epoch 1 on the server",
                         process=process)
        server.stop(kill=True)
        entries = journal_root() / run.info.run_id / "entries.jsonl"

        def journaled_epoch_2() -> bool:
            lines = entries.read_text().splitlines() if entries.exists() else []
            return any(json.loads(line).get("step") == 2 for line in lines)

        wait_until(journaled_epoch_2, 120, "epoch 2 in the journal while the server is down", process=process)
        server.start()
        out, err = process.communicate(timeout=600)
    finally:
        process.kill()
        server_log = (workdir / "server" / "server.log").read_text()[-2000:]
    try:
        assert process.returncode == 0, err[-3000:] + server_log
        assert_complete_run(url, run.info.run_id, epochs=5, params={"epochs": "5"})  # steps 1..5, each once
        assert not (journal_root() / run.info.run_id).exists()  # all delivered
    finally:
        server.stop()


def test_what_the_server_missed_is_sent_later_by_sync(workdir):
    """The server dies in epoch 2 and stays down past the end (--sync-timeout 0): the command
    says what waits; `alexnet-mlflow sync` delivers it once the server is back."""
    (workdir / "server").mkdir()
    server = MlflowServer(workdir / "server")
    url = server.start()
    process = start_training("--epochs", "2", "--sync-timeout", "0", "--experiment", "later", "--tracking-uri", url,
                             *QUICK, cwd=workdir)
    try:
        run = wait_until(lambda: run_with_epoch(MlflowClient(url), "later", 1), 180, "epoch 1 on the server",
                         process=process)
        server.stop(kill=True)
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
        assert "items) wait on this machine" in err.replace("item(s)", "items)") and "alexnet-mlflow sync" in err
        server.start()
        assert MlflowClient(url).get_run(run.info.run_id).info.status == "RUNNING"  # the end is in the journal
        synced = run_cli("sync", cwd=workdir, timeout=300)
        assert synced.returncode == 0, synced.stderr[-3000:]
        assert run.info.run_id in synced.stdout
        assert_complete_run(url, run.info.run_id, epochs=2, params={"epochs": "2"})
        assert run_cli("sync", cwd=workdir).stdout.startswith("nothing to sync")
    finally:
        process.kill()
        server.stop()


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(workdir, mlflow_server):
    client = MlflowClient(mlflow_server)
    reference = run_cli("train", "--epochs", "2", "--experiment", "reference", "--tracking-uri", mlflow_server,
                        *QUICK, cwd=workdir)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = run_with_epoch(client, "reference", 2)

    process = start_training("--epochs", "2", "--experiment", "resumed", "--tracking-uri", mlflow_server, *QUICK,
                             cwd=workdir)
    try:
        run = wait_until(lambda: run_with_epoch(client, "resumed", 1), 180, "epoch 1 on the server", process=process)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # during epoch 2: no handler runs
        process.communicate(timeout=30)
    assert client.get_run(run.info.run_id).info.status == "RUNNING"

    resumed = run_cli("train", "--resume", run.info.run_id, "--tracking-uri", mlflow_server, "--quiet", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = client.get_run(run.info.run_id)
    assert after.info.status == "FINISHED" and after.data.tags["resumed_from_epoch"] == "1"
    for metric in PER_EPOCH_METRICS:
        assert steps(client, run.info.run_id, metric) == [1, 2], metric  # each epoch exactly once
    for metric in ("val_loss", "train_loss", "val_acc"):
        got = [m.value for m in sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: m.step)]
        want = [m.value for m in sorted(client.get_metric_history(expected.info.run_id, metric), key=lambda m: m.step)]
        assert got == pytest.approx(want, rel=1e-6), metric
    for metric in ("test_loss", "test_acc", "best_val_loss"):
        assert after.data.metrics[metric] == pytest.approx(expected.data.metrics[metric], rel=1e-6), metric
    # The checkpoints are artifacts, and load without unpickling code.
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert artifacts == {"checkpoints/last.pt", "checkpoints/best.pt"}
    path = client.download_artifacts(run.info.run_id, "checkpoints/last.pt", str(workdir))
    state = torch.load(path, weights_only=True)
    assert state["epoch"] == 2 and {"model", "optimizer", "scheduler", "torch_rng", "generator"} <= set(state)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_ends_the_run_killed_with_its_checkpoint(workdir, mlflow_server, sig, code):
    client = MlflowClient(mlflow_server)
    experiment = f"signal-{sig.name}"
    process = start_training("--epochs", "3", "--experiment", experiment, "--tracking-uri", mlflow_server,
                             *QUICK, cwd=workdir)
    try:
        run = wait_until(lambda: run_with_epoch(client, experiment, 1), 180, "epoch 1 on the server", process=process)
        os.killpg(process.pid, sig)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == code
    ours = [line for line in err.splitlines() if line.startswith("alexnet-mlflow:")]
    assert "Traceback" not in err and len(ours) == 1 and ("interrupted" in ours[0] or "SIGTERM" in ours[0]), err
    ended = client.get_run(run.info.run_id)
    assert ended.info.status == "KILLED"
    assert "checkpoints/last.pt" in {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}


def test_nan_loss_stops_at_once_and_fails_the_run_with_epoch_and_step(workdir, mlflow_server):
    """SGD at lr 10 overflows to NaN within the first epoch (step 7 on the synthetic set).
    (The report's sigmoid at lr 10 with Adam stays finite here: Adam's steps are normalised.)"""
    result = run_cli("train", "--optimizer", "sgd", "--lr", "10", "--epochs", "3", "--dataset", "synthetic",
                     "--experiment", "nan", "--tracking-uri", mlflow_server, "--quiet", cwd=workdir, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("alexnet-mlflow")] == [
        "alexnet-mlflow: error: loss became nan at epoch 1, step 7: lower --lr (it was 10) or try another --activation"]
    client = MlflowClient(mlflow_server)
    [run] = client.search_runs([client.get_experiment_by_name("nan").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["nonfinite_epoch"] == "1" and run.data.tags["nonfinite_step"] == "7"
    assert client.get_metric_history(run.info.run_id, "val_loss") == []  # it stopped inside epoch 1


def test_chance_level_is_a_warning_tag_not_a_stop(workdir, mlflow_server):
    """lr 1e-7 learns nothing: val_acc stays at chance, the run still FINISHES."""
    result = run_cli("train", "--lr", "1e-7", "--epochs", "1", "--chance-warn-epochs", "1", "--experiment", "chance",
                     "--tracking-uri", mlflow_server, *QUICK, cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    [run] = client.search_runs([client.get_experiment_by_name("chance").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["warning"].startswith("val_acc at chance level (<= 1/10 + 0.01) for 1 epochs")


def test_four_trainings_log_to_one_server_at_once(workdir, mlflow_server):
    processes = [start_training("--epochs", "1", "--seed", str(seed), "--experiment", "together",
                                "--tracking-uri", mlflow_server, *QUICK, cwd=workdir, OMP_NUM_THREADS="1")
                 for seed in range(4)]
    outputs = [p.communicate(timeout=600) for p in processes]
    assert [p.returncode for p in processes] == [0] * 4, [err[-1000:] for _, err in outputs]
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("together").experiment_id])
    assert sorted(r.data.params["seed"] for r in runs) == ["0", "1", "2", "3"]
    for run in runs:
        assert run.info.status == "FINISHED"
        for metric in PER_EPOCH_METRICS:
            assert steps(client, run.info.run_id, metric) == [1], metric
        assert {"test_acc", "best_val_loss"} <= set(run.data.metrics)


def test_basic_auth_server_right_and_wrong_password(workdir):
    password = "s3cret-password-1234"
    config = workdir / "auth.ini"
    config.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{workdir}/auth.db\n"
                      f"admin_username = admin\nadmin_password = {password}\n"
                      "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    (workdir / "server").mkdir()
    server = MlflowServer(workdir / "server", app_name="basic-auth", env={
        "MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-secret"})
    url = server.start()
    right = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password}
    wrong = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "not-the-password"}
    try:
        train = run_cli("train", "--epochs", "1", "--experiment", "secured", "--tracking-uri", url, *QUICK,
                        cwd=workdir, **right)
        assert train.returncode == 0, train.stderr[-3000:]
        compare = run_cli("compare", "--experiment", "secured", "--format", "json", "--tracking-uri", url,
                          cwd=workdir, **right)
        assert compare.returncode == 0 and len(json.loads(compare.stdout)) == 1, compare.stderr
        sweep = run_cli("sweep", "--epochs", "1", "--experiment", "secured-sweep", "--tracking-uri", url,
                        "--storage", f"sqlite:///{workdir}/optuna.db", *QUICK, cwd=workdir, **right)
        assert sweep.returncode == 0 and "trials: 1 COMPLETE" in sweep.stdout, sweep.stderr[-3000:]

        for command in (("train", "--epochs", "1", *QUICK), ("compare",), ("sweep", "--epochs", "1", *QUICK)):
            refused = run_cli(*command, "--tracking-uri", url, cwd=workdir, timeout=60, **wrong)
            assert refused.returncode == 2
            assert refused.stderr.strip().splitlines() == [
                f"alexnet-mlflow: error: tracking server {url} answered 401: the credentials in "
                "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD were refused; set MLFLOW_TRACKING_USERNAME "
                "and MLFLOW_TRACKING_PASSWORD to a user of that server"]

        with pytest.MonkeyPatch.context() as env:
            for key, value in right.items():
                env.setenv(key, value)
            client = MlflowClient(url)
            [run] = client.search_runs([client.get_experiment_by_name("secured").experiment_id])
            config_json = client.download_artifacts(run.info.run_id, "config.json", str(workdir))
        stored = json.dumps([run.data.params, run.data.tags]) + open(config_json).read()
        for text in (stored, train.stdout, train.stderr, sweep.stdout, compare.stdout):
            assert password not in text
    finally:
        server.stop()
