"""Every MLflow call of training lives here.

A run is a context manager: it ends FINISHED, FAILED on an exception, or KILLED on Ctrl-C, so no
run is left RUNNING. Under `mlflow run` the project's run (MLFLOW_RUN_ID) is reused, and the
params that `mlflow run` already logged are not logged again in another spelling.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import asdict, dataclass, replace

from alexnet_mlflow.errors import StopTraining, Terminated, TrackingError
from alexnet_mlflow.journal import Journal, Unreachable

DEFAULT_EXPERIMENT = "alexnet-cifar10"
SYNC_TIMEOUT_S = 120.0  # at the end, how long to wait for an absent server before leaving it to `sync`
HEALTH_TIMEOUT_S = 5  # a live server answers /health in milliseconds; MLflow's own client retries ~4 min


def redact_uri(uri: str | None) -> str:
    """The URI with any password replaced, for messages and tags."""
    if not uri:
        return "the default (sqlite:///mlflow.db)"
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def check_tracking_uri(uri: str | None) -> None:
    """Fail in seconds, not minutes, when an HTTP tracking server does not answer."""
    if not uri or not uri.startswith(("http://", "https://")):
        return  # a local store (sqlite, folder) needs no server
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT_S):
            pass
    except urllib.error.HTTPError as e:
        if e.code not in (401, 403):  # 401/403: a secured server answers; credentials are checked below
            raise TrackingError(f"tracking server {redact_uri(uri)} answered {e.code} to /health: is it an MLflow server?") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingError(
            f"tracking server {redact_uri(uri)} does not answer ({reason}): start it with "
            f"`mlflow server --host 127.0.0.1 --port 5000`, or pass another --tracking-uri"
        ) from None
    _check_credentials(uri)


def create_sqlite_store_once(uri: str | None) -> None:
    """Open a sqlite store that a run is about to be written to, one process at a time.

    MLflow makes a new store's tables by running its migrations; two processes doing it at once
    fail (`table _alembic_tmp_tags already exists`, `duplicate column name: step`): 10 of 10
    tries with two processes opening one new store together, as when two trainings start in a
    fresh folder. Under an exclusive lock on the store's folder, the first makes the tables and
    the next finds them made. `mlflow run` opens the store itself before our code runs: there,
    start the first run alone."""
    try:
        import fcntl
    except ImportError:  # Windows has no flock: there, start the first training alone
        return
    import mlflow

    uri = uri or mlflow.get_tracking_uri()  # MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    if not uri.startswith("sqlite:"):
        return
    database = urllib.parse.urlsplit(uri).path[1:]  # sqlite:///rel.db -> rel.db, sqlite:////abs.db -> /abs.db
    if not database or database == ":memory:":
        return
    folder_path = os.path.dirname(os.path.abspath(database))
    if not os.path.isdir(folder_path):
        return  # nothing to race for: MLflow's own error names the path
    folder = os.open(folder_path, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        mlflow.MlflowClient(uri).search_experiments(max_results=1)  # makes the tables if absent
    finally:
        os.close(folder)  # and with it the lock


def _check_credentials(uri: str) -> None:
    """One authenticated request, so wrong credentials are one line now, not an error (or
    MLflow's retries) in the middle of a run. /health answers without credentials."""
    import base64

    request = urllib.request.Request(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1")
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        request.add_header("Authorization", f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}")
    elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
        pair = f"{os.environ['MLFLOW_TRACKING_USERNAME']}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(pair.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=HEALTH_TIMEOUT_S):
            pass
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            given = "the credentials in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD were refused" \
                if os.environ.get("MLFLOW_TRACKING_USERNAME") or os.environ.get("MLFLOW_TRACKING_TOKEN") \
                else "it needs credentials"
            raise TrackingError(f"tracking server {redact_uri(uri)} answered {e.code}: {given}; set "
                                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a user of that server") from None
    except (urllib.error.URLError, OSError):
        pass  # it answered /health a moment ago; a real outage shows up (and is journaled) later


def experiment_id_for(client, name: str) -> str:
    """The id of the experiment called `name`, created if absent, safe when several processes
    start at once. `mlflow.set_experiment` is not: when another process creates the experiment
    between its lookup and its create, it returns without making it active, and the run lands in
    the Default experiment (seen with 4 trainings starting together on one server)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            found = client.get_experiment_by_name(name)  # another process won the race
    if found.lifecycle_stage != "active":
        raise TrackingError(f"experiment {name!r} is deleted: restore it with `mlflow experiments restore "
                            f"--experiment-id {found.experiment_id}`, or pass another --experiment")
    return found.experiment_id


class TrackedRun:
    """One training's MLflow run. Use as `with TrackedRun(...) as run:`.

    The run starts against a live server (checked before). From then on every call goes through
    a local journal (see journal.py): if the server goes away, training goes on, and what it
    logs is delivered, in order, when the server is back, or at the end within `sync_timeout`
    seconds, or later by `alexnet-mlflow sync`.
    """

    def __init__(self, config, experiment: str, tracking_uri: str | None, run_name: str | None = None,
                 parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                 resume_run_id: str | None = None, sync_timeout: float = SYNC_TIMEOUT_S):
        self.config = config
        self.experiment = experiment
        self.tracking_uri = tracking_uri
        self.run_name = run_name or config.run_name()
        self.parent_run_id = parent_run_id  # a sweep's parent: this run is one of its trials
        self.resume_run_id = resume_run_id  # continue this run (train --resume)
        self.tags = tags or {}
        self.sync_timeout = sync_timeout
        self.run_id: str | None = None
        self.undelivered = 0  # journal entries still pending when the run ended

    def __enter__(self) -> "TrackedRun":
        import mlflow

        # A dead server must cost a second, not MLflow's ~4 minutes of retries: the journal
        # retries instead, without holding up training.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
        if self.tracking_uri:
            mlflow.set_tracking_uri(self.tracking_uri)
        create_sqlite_store_once(self.tracking_uri)
        project_run_id = os.environ.get("MLFLOW_RUN_ID")  # set by `mlflow run`
        if self.resume_run_id:
            run = mlflow.start_run(run_id=self.resume_run_id)
            self.run_name = run.info.run_name
        elif self.parent_run_id:  # a child lives in its parent's experiment, whatever it is named
            experiment_id = mlflow.MlflowClient().get_run(self.parent_run_id).info.experiment_id
            run = mlflow.start_run(experiment_id=experiment_id, run_name=self.run_name,
                                   parent_run_id=self.parent_run_id, tags=self.tags)
        elif project_run_id:
            run = mlflow.start_run(run_id=project_run_id)
            mlflow.MlflowClient().update_run(run.info.run_id, name=self.run_name)
            mlflow.set_tags(self.tags)
        else:
            experiment_id = experiment_id_for(mlflow.MlflowClient(), self.experiment)
            run = mlflow.start_run(experiment_id=experiment_id, run_name=self.run_name, tags=self.tags)
        self.run_id = run.info.run_id
        self.experiment = mlflow.get_experiment(run.info.experiment_id).name  # mlflow run's, if it chose
        self.client = mlflow.MlflowClient(self.tracking_uri)
        self.journal = Journal.create(self.run_id, self.tracking_uri)
        if not self.resume_run_id:
            already_logged = run.data.params
            mlflow.log_params({k: v for k, v in self.config.as_params().items() if k not in already_logged})
            mlflow.log_dict(asdict(self.config), "config.json")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        import mlflow

        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, StopTraining):
            self.set_tags(exc.tags)
            status = exc.status
        elif issubclass(exc_type, (KeyboardInterrupt, Terminated)):
            status = "KILLED"
        else:
            status = "FAILED"
        self.journal.append("end", status=status)
        self.undelivered = self.flush(self.sync_timeout)
        if self.undelivered == 0:
            self.journal.remove()
        try:
            mlflow.end_run(status)  # pops the active run; the journal already set the status
        except Exception:  # noqa: BLE001 (the server is away: the journal keeps the status for sync)
            pass

    # -- everything below goes through the journal

    def flush(self, timeout: float = 0.0) -> int:
        """Deliver what is pending; returns how many entries are still pending."""
        return deliver(self.journal, self.client, timeout)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.journal.append("tags", values=tags)
        self.flush()

    def log_environment(self, device_name: str, dataset_name: str, images) -> None:
        """Versions, device and the dataset: which data, in which layout, with a digest of its
        contents, as a tag (shown by compare) and as an MLflow dataset input (shown by the UI)."""
        import mlflow
        import torch

        tags = {
            "torch_version": torch.__version__,
            "mlflow_version": mlflow.__version__,
            "python_version": platform.python_version(),
            "device": device_name,
            "dataset": f"{dataset_name}/{images.layout}@{images.digest[:8]}",
            "dataset_layout": images.layout,
            "dataset_source": images.source,
            "dataset_digest": images.digest,
        }
        if images.skipped:
            tags["skipped_images"] = str(images.skipped)
        if not images.has_test:
            tags["test_split"] = "none: the data has no test split, so test metrics are not logged"
        mlflow.set_tags(tags)
        with warnings.catch_warnings():
            # A plain path or description matches two of MLflow's source types equally well;
            # it says so in a UserWarning and picks a local source, which is what we want.
            warnings.simplefilter("ignore", UserWarning)
            data = mlflow.data.from_numpy(
                images.train_images.numpy(), targets=images.train_labels.numpy(),
                name=f"{dataset_name}-{images.layout}", source=images.source, digest=images.digest,
            )
        try:
            mlflow.log_input(data, context="training")
        except mlflow.exceptions.MlflowException:
            # Two runs logging the same new dataset at once (sweep workers) race on the store's
            # unique (experiment, name, digest) row; the loser's retry finds the row and links it.
            mlflow.log_input(data, context="training")

    def log_epoch(self, metrics) -> None:
        """The training loop's on_epoch callback: one point per metric, step = epoch."""
        values = asdict(metrics)
        step = values.pop("epoch")
        self.journal.append("metrics", step=step, values=values)
        self.flush()

    def log_past_epochs(self, history) -> None:
        """On resume: the checkpoint's epochs that the server lacks (killed after the checkpoint
        was written, before its metrics were sent). Epochs it has are not sent again."""
        logged = {m.step for m in self.client.get_metric_history(self.run_id, "val_loss")}
        for metrics in history:
            if metrics.epoch not in logged:
                self.log_epoch(metrics)

    def log_checkpoint(self, path) -> None:
        self.journal.append("artifact", path=str(path), artifact_path="checkpoints")

    def log_result(self, result, classes) -> str:
        """Final metrics, figures and the model; returns the model's URI."""
        from alexnet_mlflow import plots

        step = result.history[-1].epoch
        final = {"best_val_loss": result.best.val_loss, "best_val_acc": result.best.val_acc,
                 "best_epoch": result.best.epoch}
        if result.test_acc is not None:
            final |= {"test_loss": result.test_loss, "test_acc": result.test_acc}
        self.journal.append("metrics", step=step, values=final)
        figures = {"curves.png": plots.curves_figure(result.history, self.run_name)}
        if result.confusion is not None:
            figures["confusion_matrix.png"] = plots.confusion_figure(
                result.confusion, classes, f"test split, {self.run_name}")
        for name, figure in figures.items():
            figure.savefig(self.journal.files / name, dpi=100)
            self.journal.append("artifact", path=str(self.journal.files / name), artifact_path=None)
        self._log_model(result.model, classes)
        return f"runs:/{self.run_id}/model"

    def _log_model(self, model, classes) -> None:
        import copy

        import mlflow
        import numpy as np
        import torch
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        from alexnet_mlflow.model import IMAGE_SHAPE, NUM_CLASSES

        # A CPU, fp32, NCHW copy in eval mode: it serves anywhere, with dropout off.
        model = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).float().eval()
        kwargs = dict(
            signature=ModelSignature(
                # Unnamed specs: a named one makes serving pass a dict, which the pytorch flavor refuses.
                inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *IMAGE_SHAPE))]),
                outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_CLASSES))]),
            ),
            # pt2 (torch.export) is MLflow's default and needs an example with batch >= 2 to keep
            # the batch dimension dynamic; it loads without our code and without unpickling.
            input_example=np.zeros((2, *IMAGE_SHAPE), dtype=np.uint8),
            pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
            metadata={"classes": list(classes)},  # `predict` names the scores with these
        )
        if self.flush() == 0:
            try:
                mlflow.pytorch.log_model(model, name="model", **kwargs)
                return
            except Exception as e:  # noqa: BLE001
                if not unreachable(e):
                    raise
        # The server is away: save the same model here and send its files when it is back.
        folder = self.journal.files / "model"
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        mlflow.pytorch.save_model(model, folder, **kwargs)
        self.journal.append("artifact", path=str(folder), artifact_path="model")


def unreachable(error: BaseException) -> bool:
    """The server did not answer, or answered that it is overloaded or restarting: try later.
    Any other answer (bad request, wrong password) is an error of its own."""
    from mlflow.exceptions import MlflowException, RestException

    if isinstance(error, RestException):
        return error.get_http_status_code() in (429, 500, 502, 503, 504)
    if isinstance(error, MlflowException):
        return "API request to" in str(error) or "Max retries exceeded" in str(error)
    return isinstance(error, OSError)


def deliver(journal: Journal, client, timeout: float = 0.0) -> int:
    """Send the journal's pending entries to its run; returns how many are still pending."""
    return journal.deliver(lambda entry: send_entry(client, journal.run_id, entry), timeout)


def send_entry(client, run_id: str, entry: dict) -> None:
    """Deliver one journal entry; Unreachable when the server is away."""
    from mlflow.entities import Metric, RunTag

    try:
        kind = entry["kind"]
        if kind == "metrics":
            client.log_batch(run_id, metrics=[Metric(k, float(v), entry["timestamp"], entry["step"])
                                              for k, v in entry["values"].items()])
        elif kind == "tags":
            client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in entry["values"].items()])
        elif kind == "artifact":
            path = entry["path"]
            if os.path.isdir(path):
                client.log_artifacts(run_id, path, entry["artifact_path"])
            elif os.path.exists(path):  # a checkpoint replaced since: its newer version went up
                client.log_artifact(run_id, path, entry["artifact_path"])
        elif kind == "end":
            client.set_terminated(run_id, entry["status"], end_time=entry["timestamp"])
    except Exception as e:  # noqa: BLE001
        if unreachable(e):
            raise Unreachable(str(e)) from None
        raise


@dataclass(frozen=True)
class SyncResult:
    run_id: str
    tracking_uri: str
    delivered: int
    pending: int


def sync(tracking_uri: str | None = None, timeout: float = 0.0) -> list[SyncResult]:
    """Deliver every journal that training left undelivered (the server was away)."""
    import mlflow

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    results = []
    for journal in Journal.all():
        uri = tracking_uri or journal.meta["tracking_uri"]
        client = mlflow.MlflowClient(uri)
        before = journal.pending()
        pending = deliver(journal, client, timeout)
        results.append(SyncResult(journal.run_id, redact_uri(uri), before - pending, pending))
        if pending == 0:
            journal.remove()
    return results


def load_resume_point(run_id: str, tracking_uri: str | None, checkpoint_dir) -> tuple[dict, str]:
    """The run's config (its config.json artifact) and the path of its last checkpoint: the
    local one if this machine wrote it, else the logged artifact. Pending journal entries of
    the run are delivered first, so the server holds everything the killed process logged."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from alexnet_mlflow.errors import ConfigError

    check_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    journal = Journal.of_run(run_id)
    if journal is not None and deliver(journal, client, 30) == 0:
        journal.remove()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"run {run_id!r} not found at {redact_uri(tracking_uri)}: pass the id of a run "
                          "there (alexnet-mlflow compare --all lists them)") from None
    if run.info.status == "FINISHED":
        raise ConfigError(f"run {run_id} already FINISHED: there is nothing to resume")
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads(Path(client.download_artifacts(run_id, "config.json", str(checkpoint_dir))).read_text())
    local = checkpoint_dir / "last.pt"
    if local.exists():
        return config, str(local)
    try:  # this machine did not write it: the logged one
        return config, client.download_artifacts(run_id, "checkpoints/last.pt", str(checkpoint_dir))
    except (MlflowException, OSError):
        raise ConfigError(f"run {run_id} has no checkpoint: it did not finish an epoch; start a new run") from None



# ---- using models: load, register ----------------------------------------------------------------

MODEL_URI_FORMS = "runs:/RUN_ID/model, models:/NAME/VERSION or models:/NAME@ALIAS"


def load_model(model_uri: str, tracking_uri: str | None):
    """A logged model as an MLflow pyfunc, and its class names (from its metadata)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from alexnet_mlflow.data import CIFAR10_CLASSES

    check_tracking_uri(tracking_uri)
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)  # runs:/ and models:/ resolve against it
    # Without dst_path MLflow downloads the model (137 MB) into a new temporary folder on every load
    # and never removes it; the pytorch flavour holds the weights in memory once loaded.
    with tempfile.TemporaryDirectory(prefix="alexnet-mlflow-model-") as folder:
        try:
            model = mlflow.pyfunc.load_model(model_uri, dst_path=folder)
        except (MlflowException, OSError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrackingError(f"model {model_uri!r} cannot be loaded ({reason[:200]}): pass {MODEL_URI_FORMS}") from None
    classes = (model.metadata.metadata or {}).get("classes") or list(CIFAR10_CLASSES)
    return model, classes


def register_model(model_uri: str, name: str, tracking_uri: str | None, alias: str | None = None) -> str:
    """Register the model as a new version of `name` (and point `alias` at it); returns the version."""
    import mlflow

    check_tracking_uri(tracking_uri)
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    version = mlflow.register_model(model_uri, name).version
    if alias:
        mlflow.MlflowClient().set_registered_model_alias(name, alias, version)
    return str(version)


# ---- sweeps: the parent run, and runs a dead worker left behind ---------------------------------

def open_sweep_parent(tracking_uri: str | None, experiment: str, previous_run_id: str | None,
                      name: str, tags: dict[str, str]) -> tuple[str, str]:
    """The sweep's parent run, RUNNING: the one an earlier invocation of the same sweep made (so
    a rerun adds to it), else the run of `mlflow run -e sweep`, else a new run. Returns its id
    and its experiment's name."""
    import mlflow
    from mlflow.exceptions import MlflowException

    create_sqlite_store_once(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    run = None
    if previous_run_id:
        try:
            run = client.get_run(previous_run_id)
        except MlflowException:
            run = None  # another tracking server, or deleted: start a new parent
        if run is not None and run.info.lifecycle_stage != "active":
            run = None
    project_run_id = os.environ.get("MLFLOW_RUN_ID")  # set by `mlflow run -e sweep`
    if run is None and project_run_id:
        run = client.get_run(project_run_id)
    if run is None:
        run = client.create_run(experiment_id_for(client, experiment), run_name=name)
    elif project_run_id and project_run_id != run.info.run_id:
        client.set_tag(project_run_id, "sweep.parent_run_id", run.info.run_id)  # the project run points there
    if run.info.status != "RUNNING":
        client.update_run(run.info.run_id, status="RUNNING")
    for key, value in tags.items():
        client.set_tag(run.info.run_id, key, value)
    return run.info.run_id, client.get_experiment(run.info.experiment_id).name


def close_sweep_parent(tracking_uri: str | None, run_id: str, status: str, metrics: dict[str, float],
                       step: int, tags: dict[str, str], texts: dict[str, str]) -> None:
    """Log the sweep's outcome on its parent (best trial, summary tables as artifacts) and end it."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    for key, value in metrics.items():
        client.log_metric(run_id, key, value, step=step)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    for path, text in texts.items():
        client.log_text(run_id, text, path)
    client.set_terminated(run_id, status)


def end_orphaned_run(tracking_uri: str | None, run_id: str, tags: dict[str, str]) -> None:
    """A run whose process died (SIGKILL, lost machine) stays RUNNING: end it KILLED, saying why."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    if client.get_run(run_id).info.status == "RUNNING":
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        client.set_terminated(run_id, "KILLED")


# ---- reading runs back (compare) -------------------------------------------------------------

SEARCH_PAGE = 5000  # runs per search request; MLflow servers accept up to 50,000
HISTORY_THREADS = 16  # metric histories are one request per run: overlap their round trips


@dataclass(frozen=True)
class RunRecord:
    """What compare needs of one MLflow run."""

    run_id: str
    name: str
    experiment: str
    status: str
    start_time: int  # ms since the epoch, as MLflow stores it
    end_time: int | None
    params: dict[str, str]
    metrics: dict[str, float]  # the last value of each metric
    tags: dict[str, str]

    @property
    def entry_point(self) -> str | None:
        """The MLproject entry point that made the run, if any."""
        return self.tags.get("mlflow.project.entryPoint")


def find_runs(tracking_uri: str | None, experiments: list[str], filter_string: str = "",
              missing_ok: bool = False) -> list[RunRecord]:
    """Every run of the named experiments that matches the MLflow search filter, all pages.
    A missing experiment is an error, or with missing_ok skipped unless all are missing."""
    check_tracking_uri(tracking_uri)
    reader = _reader(tracking_uri)
    names = {}
    for name in experiments:
        experiment_id = reader.experiment_id(name)
        if experiment_id is None and not missing_ok:
            raise _experiment_not_found(reader, name, tracking_uri)
        if experiment_id is not None:
            names[experiment_id] = name
    if not names:
        raise _experiment_not_found(reader, experiments[0], tracking_uri)
    records, token = [], None
    while True:
        page, token = reader.search(list(names), filter_string, token)
        records += [replace(record, experiment=names[record.experiment]) for record in page]
        if not token:
            return records


def _experiment_not_found(reader, name: str, tracking_uri: str | None) -> TrackingError:
    known = ", ".join(sorted(reader.experiment_names())) or "none"
    return TrackingError(f"experiment {name!r} not found at {redact_uri(tracking_uri)}; experiments there: {known}")


def metric_histories(tracking_uri: str | None, run_ids: list[str], metric: str) -> dict[str, list[tuple[int, float]]]:
    """Each run's (step, value) points of one metric, sorted by step."""
    return _reader(tracking_uri).histories(run_ids, metric)


def _search_failed(uri: str | None, filter_string: str, code: str, reason: str) -> TrackingError:
    """A rejected filter says so and links the syntax; any other failure says what the server said."""
    reason = (reason.splitlines() or [code])[0]
    if code == "INVALID_PARAMETER_VALUE":
        return TrackingError(f"filter {filter_string!r} is invalid: {reason} "
                             f"(syntax: https://mlflow.org/docs/latest/search-runs.html)")
    return TrackingError(f"searching runs at {redact_uri(uri)} failed ({code}): {reason}")


def _reader(tracking_uri: str | None):
    if tracking_uri and tracking_uri.startswith(("http://", "https://")):
        return _RestReader(tracking_uri)
    return _ClientReader(tracking_uri)


class _ClientReader:
    """Local stores (sqlite, folders) through MLflow's Python client."""

    def __init__(self, tracking_uri: str | None) -> None:
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri)
        self.uri = tracking_uri

    def experiment_id(self, name: str) -> str | None:
        experiment = self.client.get_experiment_by_name(name)
        return experiment.experiment_id if experiment else None

    def experiment_names(self) -> list[str]:
        return [e.name for e in self.client.search_experiments()]

    def search(self, experiment_ids: list[str], filter_string: str, token: str | None):
        from mlflow.entities import ViewType
        from mlflow.exceptions import MlflowException

        try:
            page = self.client.search_runs(experiment_ids, filter_string, ViewType.ACTIVE_ONLY,
                                           max_results=SEARCH_PAGE, page_token=token)
        except MlflowException as e:
            raise _search_failed(self.uri, filter_string, e.error_code, str(e.message)) from None
        records = [RunRecord(
            run_id=run.info.run_id, name=run.info.run_name or run.info.run_id[:8], experiment=run.info.experiment_id,
            status=run.info.status, start_time=run.info.start_time, end_time=run.info.end_time,
            params=dict(run.data.params), metrics=dict(run.data.metrics), tags=dict(run.data.tags),
        ) for run in page]
        return records, page.token

    def histories(self, run_ids: list[str], metric: str) -> dict[str, list[tuple[int, float]]]:
        from concurrent.futures import ThreadPoolExecutor

        def history(run_id: str) -> list[tuple[int, float]]:
            return sorted((m.step, m.value) for m in self.client.get_metric_history(run_id, metric))

        with ThreadPoolExecutor(HISTORY_THREADS) as pool:
            return dict(zip(run_ids, pool.map(history, run_ids)))


class _RestReader:
    """Tracking servers through MLflow's REST API (https://mlflow.org/docs/latest/rest-api.html).

    Why not MlflowClient: against a server with 1,000 runs of 50 epochs on a 2-core machine,
    `import mlflow` alone takes 1.1 s and its protobuf parsing 0.3 s on top of the server's 1.7 s
    search, which misses a 3 s budget; min/max over histories take 6.7 s as 1,000 get-history
    calls, and 10 calls of the bulk endpoint (100 runs each) instead.
    """

    BULK_RUNS = 100  # the server's limit of run ids per bulk-history request
    BULK_STEPS = 2500  # the server's limit of points per run; more points get sampled

    def __init__(self, tracking_uri: str) -> None:
        import requests

        self.base = tracking_uri.rstrip("/") + "/api/2.0/mlflow"
        self.session = requests.Session()
        if os.environ.get("MLFLOW_TRACKING_TOKEN"):
            self.session.headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
        elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
            self.session.auth = (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
        self.uri = tracking_uri

    def _call(self, method: str, path: str, **kwargs) -> dict:
        import requests

        try:
            response = self.session.request(method, self.base + path, timeout=(HEALTH_TIMEOUT_S, 300), **kwargs)
        except requests.RequestException as e:
            raise TrackingError(f"tracking server {redact_uri(self.uri)} failed: {type(e).__name__}") from None
        if response.status_code in (401, 403):
            raise TrackingError(f"tracking server {redact_uri(self.uri)} refused access ({response.status_code}): "
                                f"set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
        body = response.json() if response.content else {}
        if response.status_code != 200:
            raise _RestError(body.get("error_code", str(response.status_code)), body.get("message", response.text))
        return body

    def experiment_id(self, name: str) -> str | None:
        try:
            return self._call("GET", "/experiments/get-by-name", params={"experiment_name": name})["experiment"]["experiment_id"]
        except _RestError as e:
            if e.code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise TrackingError(f"tracking server {redact_uri(self.uri)}: {e.message}") from None

    def experiment_names(self) -> list[str]:
        body = self._call("POST", "/experiments/search", json={"max_results": 1000})
        return [e["name"] for e in body.get("experiments", [])]

    def search(self, experiment_ids: list[str], filter_string: str, token: str | None):
        request = {"experiment_ids": experiment_ids, "filter": filter_string, "run_view_type": "ACTIVE_ONLY",
                   "max_results": SEARCH_PAGE, **({"page_token": token} if token else {})}
        try:
            body = self._call("POST", "/runs/search", json=request)
        except _RestError as e:
            raise _search_failed(self.uri, filter_string, e.code, e.message) from None
        return [self._record(run) for run in body.get("runs", [])], body.get("next_page_token")

    @staticmethod
    def _record(run: dict) -> RunRecord:
        info, data = run["info"], run.get("data", {})
        return RunRecord(
            run_id=info["run_id"], name=info.get("run_name") or info["run_id"][:8], experiment=info["experiment_id"],
            status=info["status"], start_time=int(info.get("start_time", 0)),
            end_time=int(info["end_time"]) if info.get("end_time") else None,
            params={p["key"]: p.get("value", "") for p in data.get("params", [])},
            metrics={m["key"]: float(m["value"]) for m in data.get("metrics", [])},
            tags={t["key"]: t.get("value", "") for t in data.get("tags", [])},
        )

    def histories(self, run_ids: list[str], metric: str) -> dict[str, list[tuple[int, float]]]:
        from concurrent.futures import ThreadPoolExecutor

        def bulk(chunk: list[str]) -> list[dict]:
            params = {"run_ids": chunk, "metric_key": metric, "max_results": self.BULK_STEPS}
            return self._call("GET", "/metrics/get-history-bulk-interval", params=params).get("metrics", [])

        chunks = [run_ids[i:i + self.BULK_RUNS] for i in range(0, len(run_ids), self.BULK_RUNS)]
        points: dict[str, list[tuple[int, float]]] = {run_id: [] for run_id in run_ids}
        with ThreadPoolExecutor(4) as pool:
            for metrics in pool.map(bulk, chunks):
                for m in metrics:
                    points[m["run_id"]].append((int(m.get("step", 0)), float(m["value"])))
        sampled = [run_id for run_id, p in points.items() if len(p) >= self.BULK_STEPS]
        if sampled:  # more steps than the bulk endpoint returns whole: read those runs in full
            points.update(_ClientReader(self.uri).histories(sampled, metric))
        return {run_id: sorted(p) for run_id, p in points.items()}


class _RestError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message
