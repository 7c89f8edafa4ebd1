import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import mlflow
import pytest
from mlflow import MlflowClient

from alexnet_mlflow.config import TrainConfig
from alexnet_mlflow.errors import TrackingError
from alexnet_mlflow.tracking import (TrackedRun, check_tracking_uri, create_sqlite_store_once, experiment_id_for,
                                     redact_uri)
from conftest import assert_complete_run, cli_env, free_port, run_cli, wait_until

SYNTHETIC_2 = {"dataset": "synthetic", "epochs": "2", "activation": "relu", "lr": "0.0001", "batch_size": "256",
               "dropout": "0.8", "batch_norm": "false", "hflip": "true", "data_dir": "auto", "seed": "0"}


def only_run(client, experiment: str):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    return runs[0]


def test_train_logs_a_complete_run_to_the_default_sqlite_store(workdir):
    result = run_cli("train", "--dataset", "synthetic", "--epochs", "2", "--batch-size", "256", "--quiet", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert (workdir / "mlflow.db").exists()  # MLflow's embedded default, no server
    uri = f"sqlite:///{workdir}/mlflow.db"
    run = only_run(MlflowClient(uri), "alexnet-cifar10")
    assert run.info.run_name == "relu-lr1e-4-bs256-do0.8"
    assert run.info.run_id in result.stdout
    assert_complete_run(uri, run.info.run_id, epochs=2, params=SYNTHETIC_2)
    assert set(run.data.params) == set(TrainConfig().as_params())


def test_train_logs_to_a_tracking_server_with_the_experiment_from_the_environment(workdir, mlflow_server):
    result = run_cli("train", "--dataset", "synthetic", "--epochs", "1", "--batch-norm", "--activation",
                     "leaky_relu", "--quiet", cwd=workdir,
                     MLFLOW_TRACKING_URI=mlflow_server, MLFLOW_EXPERIMENT_NAME="from-env")
    assert result.returncode == 0, result.stderr
    assert not (workdir / "mlflow.db").exists()
    run = only_run(MlflowClient(mlflow_server), "from-env")
    assert run.info.run_name == "leaky_relu-lr1e-4-bs64-do0.8"
    assert_complete_run(mlflow_server, run.info.run_id, epochs=1,
                        params={"batch_norm": "true", "activation": "leaky_relu", "epochs": "1"})


@pytest.mark.parametrize("error, status", [(RuntimeError, "FAILED"), (KeyboardInterrupt, "KILLED")])
def test_an_exception_or_interrupt_ends_the_run(workdir, error, status):
    uri = f"sqlite:///{workdir}/mlflow.db"
    with pytest.raises(error):
        with TrackedRun(TrainConfig(dataset="synthetic"), "statuses", uri) as run:
            mlflow.log_metric("train_loss", 1.0, step=1)
            raise error()
    finished = MlflowClient(uri).get_run(run.run_id)
    assert finished.info.status == status
    assert finished.data.metrics["train_loss"] == 1.0  # what was logged stays


def test_ctrl_c_during_training_marks_the_run_killed(workdir):
    """A real SIGINT to a real training process, once its first epoch is logged."""
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    client.search_experiments()  # make the store's tables now: opening a new store from two processes at once fails
    process = subprocess.Popen(
        ["alexnet-mlflow", "train", "--dataset", "synthetic", "--epochs", "50", "--batch-size", "256", "--quiet"],
        cwd=workdir, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        def first_epoch_logged():
            experiment = client.get_experiment_by_name("alexnet-cifar10")
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
            return runs and "val_loss" in runs[0].data.metrics and runs[0]

        # ~15 s alone, more beside other tests
        run = wait_until(first_epoch_logged, 300, "the first epoch's metrics", process=process)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130
    assert "Traceback" not in stderr and "interrupted" in stderr
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")][0] == 1


STORE_OPENER = """
import sys, time
from pathlib import Path
from mlflow import MlflowClient
from alexnet_mlflow.config import TrainConfig
from alexnet_mlflow.tracking import TrackedRun
uri, go = sys.argv[1], Path(sys.argv[2])
Path(sys.argv[3]).touch()  # imported: ready
while not go.exists():  # all start their run at the same moment
    time.sleep(0.01)
with TrackedRun(TrainConfig(dataset="synthetic"), "fresh", uri) as run:
    pass
print(MlflowClient(uri).get_run(run.run_id).info.experiment_id)
"""


def test_trainings_starting_together_in_a_fresh_folder_make_one_sqlite_store(workdir):
    """Three runs start in one new sqlite store at the same moment, as trainings started together
    in a fresh folder do. MLflow's table creation is not safe to run twice at once (without the
    lock, 10 of 10 tries failed with two processes); all three must get the same experiment."""
    uri, go = f"sqlite:///{workdir}/mlflow.db", workdir / "go"
    ready = [workdir / f"ready-{i}" for i in range(3)]
    openers = [subprocess.Popen([sys.executable, "-c", STORE_OPENER, uri, str(go), str(flag)], env=cli_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for flag in ready]
    for opener, flag in zip(openers, ready):
        wait_until(flag.exists, 120, "the openers to import mlflow", process=opener)
    go.touch()
    outputs = [p.communicate(timeout=120) for p in openers]
    assert [p.returncode for p in openers] == [0, 0, 0], [err[-2000:] for _, err in outputs]
    assert len({out.strip() for out, _ in outputs}) == 1


def test_processes_starting_together_share_one_experiment(mlflow_server):
    """Eight clients ask for a new experiment at the same moment: one creates it, all get its id.
    (mlflow.set_experiment lost runs to the Default experiment in this race.)"""
    start = threading.Barrier(8)

    def ask(_):
        client = MlflowClient(mlflow_server)
        start.wait(timeout=60)
        return experiment_id_for(client, "raced")

    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(ask, range(8)))
    assert ids == {MlflowClient(mlflow_server).get_experiment_by_name("raced").experiment_id}


def test_a_deleted_experiment_is_one_line_with_the_fix(workdir):
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    experiment_id = client.create_experiment("gone")
    client.delete_experiment(experiment_id)
    with pytest.raises(TrackingError, match=f"'gone' is deleted: restore it with `mlflow experiments restore "
                                            f"--experiment-id {experiment_id}`"):
        experiment_id_for(client, "gone")


def test_unreachable_server_fails_fast_with_the_fix():
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingError, match=f"tracking server {uri} does not answer.*mlflow server"):
        check_tracking_uri(uri)


def test_local_stores_need_no_server(workdir):
    check_tracking_uri(None)
    check_tracking_uri("sqlite:///mlflow.db")
    assert not (workdir / "mlflow.db").exists()  # checking writes nothing (dry runs, bad data)


def test_a_new_sqlite_store_gets_its_tables(workdir):
    create_sqlite_store_once(None)  # MLflow's default: sqlite:///mlflow.db in the working folder
    assert MlflowClient("sqlite:///mlflow.db").get_experiment_by_name("Default") is not None
    create_sqlite_store_once(f"sqlite:///{workdir}/other.db")
    assert MlflowClient(f"sqlite:///{workdir}/other.db").get_experiment_by_name("Default") is not None


def test_passwords_are_redacted():
    assert redact_uri("http://alice:s3cret@host:5000/x") == "http://alice:***@host:5000/x"
    assert redact_uri("http://host:5000") == "http://host:5000"


def test_image_folder_without_test_split_logs_no_test_metrics_and_says_so(workdir, write_image_folder):
    from alexnet_mlflow.job import train_and_track

    write_image_folder(workdir / "images", ["cat", "dog", "ship"], per_class=8, test=False, suffix=".jpg")
    config = TrainConfig(data_dir=str(workdir / "images"), epochs=1, batch_size=8, val_fraction=0.25)
    uri = f"sqlite:///{workdir}/mlflow.db"
    outcome = train_and_track(config, "folders", uri)
    run = MlflowClient(uri).get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert "test_acc" not in run.data.metrics and "test_loss" not in run.data.metrics
    assert {"val_acc", "best_val_loss"} <= set(run.data.metrics)
    assert run.data.tags["test_split"].startswith("none")
    assert run.data.tags["dataset_layout"] == "image-folder"
    assert run.data.tags["dataset"] == f"cifar10/image-folder@{run.data.tags['dataset_digest'][:8]}"
    dataset = run.inputs.dataset_inputs[0].dataset
    assert (dataset.name, dataset.digest) == ("cifar10-image-folder", run.data.tags["dataset_digest"])
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(outcome.run_id)}
    assert "curves.png" in artifacts and "confusion_matrix.png" not in artifacts


def test_different_data_has_a_different_dataset_tag(workdir, write_image_folder):
    from alexnet_mlflow import data

    first = write_image_folder(workdir / "a", ["cat", "dog"], per_class=2, test=False, seed=1)
    second = write_image_folder(workdir / "b", ["cat", "dog"], per_class=2, test=False, seed=2)
    digests = {data.load_dataset("cifar10", str(folder), 0).digest for folder in (first, second)}
    assert len(digests) == 2
