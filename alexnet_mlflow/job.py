"""One tracked training: data -> device -> MLflow run -> loop -> results. Used by `train`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from alexnet_mlflow import data, engine
from alexnet_mlflow.config import TrainConfig
from alexnet_mlflow.tracking import TrackedRun, check_tracking_uri


@dataclass(frozen=True)
class JobResult:
    run_id: str
    experiment: str
    model_uri: str
    result: engine.TrainResult


def prepare(config: TrainConfig, tracking_uri: str | None) -> tuple:
    """The checks that fail fast on bad input, in order: server, device, data. Returns the
    device, the decoded images and their train/val/test splits."""
    check_tracking_uri(tracking_uri)
    device = engine.resolve_device(config.device)
    images = data.load_dataset(config.dataset, config.data_dir, config.seed, config.skip_bad_images)
    return device, images, data.split(images, config.val_fraction, config.seed)


def train_and_track(
    config: TrainConfig,
    experiment: str,
    tracking_uri: str | None = None,
    run_name: str | None = None,
    progress: engine.Progress | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    on_start: Callable[[str], None] = lambda run_id: None,
    on_epoch: Callable[[engine.EpochMetrics], None] = lambda metrics: None,
) -> JobResult:
    """Everything that can fail on bad input (server, device, data) is checked before the run starts.

    A sweep trial passes its parent run and tags, learns the run id from `on_start`, and sees
    each epoch after it is logged through `on_epoch` (which may raise StopTraining to prune).
    """
    device, images, splits = prepare(config, tracking_uri)
    with TrackedRun(config, experiment, tracking_uri, run_name, parent_run_id, tags) as run:
        on_start(run.run_id)
        run.log_environment(engine.device_name(device), config.dataset, images)

        def epoch_done(metrics: engine.EpochMetrics) -> None:
            run.log_epoch(metrics)
            on_epoch(metrics)

        result = engine.train(config, splits, device, on_epoch=epoch_done, progress=progress)
        model_uri = run.log_result(result, images.classes)
    return JobResult(run.run_id, run.experiment, model_uri, result)


def dry_run(config: TrainConfig, tracking_uri: str | None = None) -> str:
    """Check what train_and_track would check, then one training step on one batch; log nothing."""
    import torch

    from alexnet_mlflow.model import build_model, count_parameters

    device, images, splits = prepare(config, tracking_uri)
    model = build_model(config).to(device)
    optimizer = engine.make_optimizer(config, model, device)
    batch = splits.train[0][: config.batch_size].to(device)
    labels = splits.train[1][: config.batch_size].to(device)
    loss = torch.nn.functional.cross_entropy(model(batch), labels)
    loss.backward()
    optimizer.step()
    return (f"{config.run_name()} on {engine.device_name(device)}: {len(splits.train[1])} train / "
            f"{len(splits.val[1])} val / {len(splits.test[1])} test images, {images.layout} at {images.source}, "
            f"{count_parameters(model):,} parameters, first-batch loss {loss.item():.4f}")
