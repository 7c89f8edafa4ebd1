"""Shared fixtures: a real `mlflow server` on 127.0.0.1, and helpers to run the real CLI."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def pytest_configure(config):
    # One torch thread per process: the suite runs on 2 pytest processes, each starting trainings,
    # servers and CLIs, so 2 threads each oversubscribe 2 cores. Two 2-epoch synthetic trainings
    # side by side took 46 s with 2 threads each, 37 s with 1. Subprocesses inherit it.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2, process: subprocess.Popen | None = None):
    """Poll predicate until it returns something truthy, or fail after timeout seconds; with a
    process, fail as soon as it exits first, with its stderr (not minutes later, blind)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if process is not None and process.poll() is not None:
            try:
                _, stderr = process.communicate(timeout=10)  # bounded: a child may still hold the pipe
            except subprocess.TimeoutExpired:
                stderr = None
            raise AssertionError(f"the process exited ({process.returncode}) before {what}: {(stderr or '')[-3000:]}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


# MLflow's server starts a job runner with 8 huey consumer processes by default (for its GenAI
# jobs; nothing here uses them), each importing mlflow: measured per server start on 2 cores,
# 16 s of CPU and 8.5 s to /health with it, 5 s and 5.8 s without.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class MlflowServer:
    """A real `mlflow server` process on 127.0.0.1 with its own sqlite store and proxied
    artifacts; it can be killed and started again on the same store and port."""

    def __init__(self, root: Path, app_name: str | None = None, env: dict[str, str] | None = None):
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app_name = app_name
        self.env = env
        self.process: subprocess.Popen | None = None

    def start(self) -> str:
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                   "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
                   "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"]
        if self.app_name:
            command += ["--app-name", self.app_name]
        with open(self.root / "server.log", "a") as log:
            # Its own process group: stop() ends the server's workers too, freeing the port.
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
                                            env={**os.environ, **SERVER_ENV, **(self.env or {})},
                                            start_new_session=True)
        # ~10 s to create the schema and start; a cold machine can take longer.
        wait_until(lambda: _healthy(self.url) or self.process.poll() is not None, 120, "mlflow server /health")
        assert self.process.poll() is None, (self.root / "server.log").read_text()[-3000:]
        return self.url

    def stop(self, kill: bool = False) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        wait_until(lambda: not _healthy(self.url), 20, "the server to stop answering")


@pytest.fixture(scope="session")
def mlflow_server_process(tmp_path_factory) -> MlflowServer:
    """A real tracking server with its own sqlite store and proxied artifact store, one per
    pytest process; tests that only need its URL take `mlflow_server`."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mlflow_server(mlflow_server_process) -> str:
    return mlflow_server_process.url


def _artifact_folders(root: Path) -> set[Path]:
    # Runs' artifacts sit in <experiment>/<run_id>, logged models in <experiment>/models/<model_id>.
    return set(root.glob("*/*")) | set(root.glob("*/models/*"))


@pytest.fixture(autouse=True)
def drop_new_server_artifacts(request):
    """Each training logs ~690 MB to its server (a 430 MB last.pt with Adam's state, a 143 MB
    best.pt, a 137 MB model). Without this the shared servers held 9.3 GB by the end of the
    suite, and a CI machine ran out of disk; now a test's artifacts go when it ends."""
    if "mlflow_server" not in request.fixturenames:
        yield
        return
    root = request.getfixturevalue("mlflow_server_process").root / "artifacts"
    before = _artifact_folders(root)
    yield
    for folder in _artifact_folders(root) - before:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def tmp_path(tmp_path: Path) -> Path:
    """pytest's tmp_path, one level down under a random name. With retention "failed", a passed
    test's folder is removed at once, and the next test of the same name (a parametrization)
    gets the same path again. MLflow keeps one open engine per sqlite URI for the life of the
    process, so that test wrote through a stale connection to the deleted file: "attempt to
    write a readonly database" (test_an_exception_or_interrupt_ends_the_run, run with -n 0)."""
    return Path(tempfile.mkdtemp(dir=tmp_path, prefix="t"))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A clean working folder with no tracking settings inherited from the environment."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cli_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")}
    env.update(overrides)
    return env


def run_cli(*args: str, cwd: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    exe = shutil.which("alexnet-mlflow")
    command = [exe] if exe else [sys.executable, "-m", "alexnet_mlflow"]
    return subprocess.run([*command, *args], cwd=cwd, env=cli_env(**env), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def write_cifar_batches():
    """Writes a small folder in torchvision's cifar-10-batches-py format: five training batches and
    a test batch, each a pickled dict {"data": uint8 (n, 3072), "labels": [int], ...}, plus batches.meta."""
    import pickle

    import numpy as np

    def write(folder: Path, per_batch: int = 20, seed: int = 0) -> Path:
        rng = np.random.default_rng(seed)
        folder.mkdir(parents=True, exist_ok=True)
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            batch = {
                "batch_label": f"{name} of 6",
                "labels": [int(x) for x in rng.integers(0, 10, per_batch)],
                "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                "filenames": [f"{name}_{i}.png" for i in range(per_batch)],
            }
            with open(folder / name, "wb") as f:
                pickle.dump(batch, f, protocol=2)
        with open(folder / "batches.meta", "wb") as f:
            pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                         "horse", "ship", "truck"], "num_cases_per_batch": per_batch,
                         "num_vis": 3072}, f, protocol=2)
        return folder

    return write


PER_EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds", "images_per_second")
FINAL_METRICS = ("best_val_loss", "best_val_acc", "best_epoch", "test_loss", "test_acc")


def assert_complete_run(tracking_uri: str, run_id: str, epochs: int, params: dict[str, str]) -> None:
    """A FINISHED run with every param, every per-epoch metric at steps 1..epochs, the final
    metrics, tags, dataset input, figures, config, and a logged model that reproduces test_acc."""
    import mlflow
    import numpy as np

    from alexnet_mlflow import data

    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key, value in params.items():
        assert run.data.params[key] == value, key
    for name in PER_EPOCH_METRICS:
        history = client.get_metric_history(run_id, name)
        assert sorted(m.step for m in history) == list(range(1, epochs + 1)), name
    for name in FINAL_METRICS:
        assert [m.step for m in client.get_metric_history(run_id, name)] == [epochs], name
    tags = run.data.tags
    assert tags["torch_version"] and tags["mlflow_version"] == mlflow.__version__
    assert tags["device"] == "cpu" and tags["dataset"].startswith("synthetic/synthetic@")
    assert tags["dataset_digest"].startswith(tags["dataset"].split("@")[1])
    assert [(d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs] == \
        [("synthetic-synthetic", tags["dataset_digest"])]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"curves.png", "confusion_matrix.png", "config.json", "checkpoints"} <= artifacts
    # The logged model takes raw uint8 images and carries the training's normalisation.
    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)  # runs:/ URIs resolve against the global URI
    try:  # dst_path: MLflow's default temporary copy (137 MB) is never removed
        with tempfile.TemporaryDirectory() as folder:
            model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model", dst_path=folder)
    finally:
        mlflow.set_tracking_uri(previous_uri)
    test = data.synthetic(int(run.data.params["seed"]))
    scores = model.predict(test.test_images.numpy())
    assert scores.shape == (len(test.test_labels), 10) and np.isfinite(scores).all()
    accuracy = (scores.argmax(1) == test.test_labels.numpy()).mean()
    assert accuracy == pytest.approx(run.data.metrics["test_acc"])


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """Decode caches, downloads, journals and checkpoints go to a temporary per-user cache, not
    the real ~/.cache; this one serves fixtures shared by several tests."""
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if previous is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = previous


@pytest.fixture(autouse=True)
def per_test_cache(private_cache, tmp_path, monkeypatch):
    """Each test its own cache in its tmp_path, removed when the test passes (pyproject's
    tmp_path_retention_policy): a killed run keeps its 570 MB of checkpoints there."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def write_image_folder():
    """Writes train/<class>/*.png|jpg (and test/ when asked) with 32x32 RGB images."""
    import numpy as np
    from PIL import Image

    def write(root: Path, classes, per_class: int = 3, test: bool = True, suffix: str = ".png", seed: int = 0):
        rng = np.random.default_rng(seed)
        for split in ("train", "test") if test else ("train",):
            for name in classes:
                (root / split / name).mkdir(parents=True, exist_ok=True)
                for i in range(per_class):
                    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(root / split / name / f"{i:04d}{suffix}")
        return root

    return write
