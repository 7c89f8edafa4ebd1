"""Using what was trained: predict on image files, serve over HTTP, register and load by alias."""

from __future__ import annotations

import json
import shutil
import re
import subprocess
import sys
import tempfile
import urllib.request

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from alexnet_mlflow import data
from alexnet_mlflow.data import CIFAR10_CLASSES
from conftest import cli_env, free_port, run_cli, wait_until

QUICK = ("--dataset", "synthetic", "--batch-size", "256", "--epochs", "1", "--quiet")
pytestmark = pytest.mark.xdist_group("predict")  # one process: local_run trains once


def trained(cwd, *args: str, **env: str) -> str:
    result = run_cli("train", *QUICK, *args, cwd=cwd, **env)
    assert result.returncode == 0, result.stderr[-3000:]
    return re.search(r"run ([0-9a-f]{32}) FINISHED", result.stdout).group(1)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """One training in a sqlite store, registered as `local-alexnet`."""
    folder = tmp_path_factory.mktemp("predict")
    run_id = trained(folder, "--register-as", "local-alexnet")
    yield folder, f"sqlite:///{folder}/mlflow.db", run_id
    shutil.rmtree(folder)  # 690 MB of checkpoints and model; see conftest.drop_new_server_artifacts


def load(uri: str, tracking_uri: str):
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:  # dst_path: MLflow's default temporary copy (137 MB) is never removed
        with tempfile.TemporaryDirectory() as folder:
            return mlflow.pyfunc.load_model(uri, dst_path=folder)
    finally:
        mlflow.set_tracking_uri(previous)


def test_predict_files_and_folders_of_any_size_with_the_training_s_preprocessing(local_run, tmp_path):
    folder, tracking_uri, run_id = local_run
    test = data.synthetic(0)
    images = tmp_path / "images"
    (images / "nested").mkdir(parents=True)
    Image.fromarray(test.test_images[0].permute(1, 2, 0).numpy()).save(images / "a-cifar.png")
    Image.fromarray(test.test_images[1].permute(1, 2, 0).numpy()).convert("L").save(images / "b-gray.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(
        images / "nested" / "c-large.jpg")
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    result = run_cli("predict", str(images), "--model", f"runs:/{run_id}/model", "--format", "json",
                     "--tracking-uri", tracking_uri, cwd=folder, timeout=120, TMPDIR=str(temporary))
    assert result.returncode == 0, result.stderr[-3000:]
    # MLflow's download of the model (137 MB) is gone; torch's compile cache may stay, as it should.
    assert [p.name for p in temporary.iterdir() if not p.name.startswith("torchinductor_")] == []
    rows = json.loads(result.stdout)
    assert [row["file"].rsplit("/", 1)[1] for row in rows] == ["a-cifar.png", "b-gray.png", "c-large.jpg"]
    for row in rows:
        assert row["predicted"] == row["top1"] and {row["top1"], row["top2"], row["top3"]} <= set(CIFAR10_CLASSES)
        assert 1 >= row["p1"] >= row["p2"] >= row["p3"] >= 0
    assert rows[0]["note"] is None and rows[1]["note"] == "L -> RGB"
    assert rows[2]["note"] == "resized from 640x480 to 32x32"
    # The same numbers as the logged model on the training's own tensor of that image.
    scores = load(f"runs:/{run_id}/model", tracking_uri).predict(test.test_images[:1].numpy())[0]
    probabilities = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
    assert rows[0]["predicted"] == CIFAR10_CLASSES[int(probabilities.argmax())]
    assert rows[0]["p1"] == pytest.approx(float(probabilities.max()), abs=1e-4)

    table = run_cli("predict", str(images / "a-cifar.png"), "--model", "models:/local-alexnet/1",
                    "--tracking-uri", tracking_uri, cwd=folder, timeout=120)
    assert table.returncode == 0 and "a-cifar.png" in table.stdout and rows[0]["predicted"] in table.stdout


@pytest.mark.parametrize("args, words", [
    (("missing.png", "--model", "runs:/0123456789abcdef0123456789abcdef/model"), "'missing.png' does not exist"),
    ((".", "--model", "runs:/0123456789abcdef0123456789abcdef/model"), "cannot be loaded"),
    ((".",), "no model: pass --model URI or --best"),
])
def test_predict_errors_are_one_line(local_run, args, words):
    folder, tracking_uri, _ = local_run
    Image.new("RGB", (32, 32)).save(folder / "x.png")
    result = run_cli("predict", *args, "--tracking-uri", tracking_uri, cwd=folder, timeout=120)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("alexnet-mlflow")]
    assert len(errors) == 1 and words in errors[0] and "Traceback" not in result.stderr, result.stderr


def test_served_model_answers_a_batch_of_images(local_run, tmp_path):
    folder, tracking_uri, run_id = local_run
    port = free_port()
    # TMPDIR: the server downloads the model (137 MB) to a temporary folder it never removes.
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{run_id}/model", "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=folder, env=cli_env(MLFLOW_TRACKING_URI=tracking_uri, TMPDIR=str(tmp_path)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        def ping() -> bool:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1).status == 200
            except OSError:
                return False

        wait_until(lambda: ping() or server.poll() is not None, 180, "the scoring server")
        images = data.synthetic(0).test_images[:2].numpy()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=json.dumps({"inputs": images.tolist()}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            scores = np.array(json.loads(response.read())["predictions"])
        assert scores.shape == (2, 10)
        expected = load(f"runs:/{run_id}/model", tracking_uri).predict(images)
        assert scores == pytest.approx(expected, abs=1e-4)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_register_best_sets_the_champion_alias_on_a_server(workdir, mlflow_server):
    best_id = trained(workdir, "--experiment", "registry", "--lr", "1e-3", "--tracking-uri", mlflow_server)
    client = MlflowClient(mlflow_server)
    worse = client.create_run(client.get_experiment_by_name("registry").experiment_id, run_name="worse")
    client.log_metric(worse.info.run_id, "val_loss", 99.0, step=1)  # ranked second: never registered
    client.set_terminated(worse.info.run_id)
    result = run_cli("compare", "--experiment", "registry", "--register-best", "server-alexnet", "--format", "json",
                     "--tracking-uri", mlflow_server, cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    best = json.loads(result.stdout)[0]
    assert best["run_id"] == best_id
    assert "registered runs:/" in result.stderr and "server-alexnet" in result.stderr
    version = client.get_model_version_by_alias("server-alexnet", "champion")
    assert version.run_id == best["run_id"]
    Image.new("RGB", (32, 32)).save(workdir / "black.png")
    predicted = run_cli("predict", str(workdir / "black.png"), "--model", "models:/server-alexnet@champion",
                        "--format", "csv", "--tracking-uri", mlflow_server, cwd=workdir, timeout=120)
    assert predicted.returncode == 0 and "black.png" in predicted.stdout, predicted.stderr[-3000:]

    by_best = run_cli("predict", str(workdir / "black.png"), "--best", "--metric", "val_loss", "--experiment",
                      "registry", "--tracking-uri", mlflow_server, cwd=workdir, timeout=120)
    assert by_best.returncode == 0 and f"runs:/{best['run_id']}/model" in by_best.stdout, by_best.stderr[-3000:]


def test_train_register_as_on_sqlite_is_loadable_by_version(local_run):
    folder, tracking_uri, run_id = local_run
    client = MlflowClient(tracking_uri)
    [version] = client.search_model_versions("name = 'local-alexnet'")
    assert str(version.version) == "1" and version.run_id == run_id
    assert load("models:/local-alexnet/1", tracking_uri).predict(np.zeros((2, 3, 32, 32), np.uint8)).shape == (2, 10)
