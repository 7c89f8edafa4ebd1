"""Every MLflow call of training lives here.

A run is a context manager: it ends FINISHED, FAILED on an exception, or KILLED on Ctrl-C, so no
run is left RUNNING. Under `mlflow run` the project's run (MLFLOW_RUN_ID) is reused, and the
params that `mlflow run` already logged are not logged again in another spelling.
"""

from __future__ import annotations

import os
import platform
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import asdict

from alexnet_mlflow.errors import TrackingError

DEFAULT_EXPERIMENT = "alexnet-cifar10"
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
        if e.code in (401, 403):
            return  # a secured server answers; the credentials are checked on first use
        raise TrackingError(f"tracking server {redact_uri(uri)} answered {e.code} to /health: is it an MLflow server?") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingError(
            f"tracking server {redact_uri(uri)} does not answer ({reason}): start it with "
            f"`mlflow server --host 127.0.0.1 --port 5000`, or pass another --tracking-uri"
        ) from None


class TrackedRun:
    """One training's MLflow run. Use as `with TrackedRun(...) as run:`."""

    def __init__(self, config, experiment: str, tracking_uri: str | None, run_name: str | None = None):
        self.config = config
        self.experiment = experiment
        self.tracking_uri = tracking_uri
        self.run_name = run_name or config.run_name()
        self.run_id: str | None = None

    def __enter__(self) -> "TrackedRun":
        import mlflow

        if self.tracking_uri:
            mlflow.set_tracking_uri(self.tracking_uri)
        project_run_id = os.environ.get("MLFLOW_RUN_ID")  # set by `mlflow run`
        if project_run_id:
            run = mlflow.start_run(run_id=project_run_id)
            mlflow.MlflowClient().update_run(run.info.run_id, name=self.run_name)
        else:
            mlflow.set_experiment(self.experiment)
            run = mlflow.start_run(run_name=self.run_name)
        self.run_id = run.info.run_id
        already_logged = run.data.params
        mlflow.log_params({k: v for k, v in self.config.as_params().items() if k not in already_logged})
        mlflow.log_dict(asdict(self.config), "config.json")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        import mlflow

        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, KeyboardInterrupt):
            status = "KILLED"
        else:
            status = "FAILED"
        mlflow.end_run(status)

    def log_environment(self, device_name: str, dataset) -> None:
        """Versions, device and the dataset (as an MLflow dataset input, with a digest)."""
        import mlflow
        import torch

        mlflow.set_tags({
            "torch_version": torch.__version__,
            "mlflow_version": mlflow.__version__,
            "python_version": platform.python_version(),
            "device": device_name,
            "dataset": dataset.name,
            "dataset_source": dataset.source,
        })
        with warnings.catch_warnings():
            # A plain path or description matches two of MLflow's source types equally well;
            # it says so in a UserWarning and picks a local source, which is what we want.
            warnings.simplefilter("ignore", UserWarning)
            data = mlflow.data.from_numpy(
                dataset.train_images.numpy(), targets=dataset.train_labels.numpy(),
                name=dataset.name, source=dataset.source,
            )
        mlflow.log_input(data, context="training")

    def log_epoch(self, metrics) -> None:
        """The training loop's on_epoch callback: one point per metric, step = epoch."""
        import mlflow

        values = asdict(metrics)
        step = values.pop("epoch")
        mlflow.log_metrics(values, step=step)

    def log_result(self, result, classes) -> str:
        """Final metrics, figures and the model; returns the model's URI."""
        import mlflow

        from alexnet_mlflow import plots

        step = result.history[-1].epoch
        mlflow.log_metrics({
            "best_val_loss": result.best.val_loss,
            "best_val_acc": result.best.val_acc,
            "best_epoch": result.best.epoch,
            "test_loss": result.test_loss,
            "test_acc": result.test_acc,
        }, step=step)
        mlflow.log_figure(plots.curves_figure(result.history, self.run_name), "curves.png")
        mlflow.log_figure(plots.confusion_figure(result.confusion, classes, f"test split, {self.run_name}"),
                          "confusion_matrix.png")
        self._log_model(result.model)
        return f"runs:/{self.run_id}/model"

    def _log_model(self, model) -> None:
        import copy

        import mlflow
        import numpy as np
        import torch
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        from alexnet_mlflow.model import IMAGE_SHAPE, NUM_CLASSES

        # A CPU, fp32, NCHW copy in eval mode: it serves anywhere, with dropout off.
        model = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).float().eval()
        signature = ModelSignature(
            # Unnamed specs: a named one makes serving pass a dict, which the pytorch flavor refuses.
            inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *IMAGE_SHAPE))]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_CLASSES))]),
        )
        # pt2 (torch.export) is MLflow's default and needs an example with batch >= 2 to keep
        # the batch dimension dynamic; it loads without our code and without unpickling.
        example = np.zeros((2, *IMAGE_SHAPE), dtype=np.uint8)
        mlflow.pytorch.log_model(
            model, name="model", signature=signature, input_example=example,
            pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
        )
