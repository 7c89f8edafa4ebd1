"""One tracked training: data -> device -> MLflow run -> loop -> results. Used by `train`."""

from __future__ import annotations

import contextlib
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass

from alexnet_mlflow import data, engine
from alexnet_mlflow.config import TrainConfig
from alexnet_mlflow.errors import Terminated
from alexnet_mlflow.journal import cache_root
from alexnet_mlflow.tracking import SYNC_TIMEOUT_S, TrackedRun, check_tracking_uri, load_resume_point


@dataclass(frozen=True)
class JobResult:
    run_id: str
    experiment: str
    model_uri: str
    result: engine.TrainResult
    undelivered: int  # journal entries the server has not got yet: `alexnet-mlflow sync` sends them


def prepare(config: TrainConfig, tracking_uri: str | None) -> tuple:
    """The checks that fail fast on bad input, in order: server, device, data. Returns the
    device, the decoded images and their train/val/test splits."""
    check_tracking_uri(tracking_uri)
    device = engine.resolve_device(config.device)
    images = data.load_dataset(config.dataset, config.data_dir, config.seed, config.skip_bad_images)
    return device, images, data.split(images, config.val_fraction, config.seed)


def checkpoint_dir(run_id: str):
    return cache_root() / "checkpoints" / run_id


@contextlib.contextmanager
def sigterm_raises():
    """SIGTERM raises Terminated where training is, so the run ends KILLED (not left RUNNING)."""
    def handler(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals to whoever owns them
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
    sync_timeout: float = SYNC_TIMEOUT_S,
    checkpoints: bool = True,
) -> JobResult:
    """Everything that can fail on bad input (server, device, data) is checked before the run starts.

    A sweep trial passes its parent run and tags, learns the run id from `on_start`, sees each
    epoch after it is logged through `on_epoch` (which may raise StopTraining to prune), and
    writes no checkpoints (a sweep reruns a dead worker's trial from its start).
    """
    device, images, splits = prepare(config, tracking_uri)
    with sigterm_raises(), TrackedRun(config, experiment, tracking_uri, run_name, parent_run_id, tags,
                                      sync_timeout=sync_timeout) as run:
        on_start(run.run_id)
        run.log_environment(engine.device_name(device), config.dataset, images)
        result = _train(run, config, splits, device, progress, on_epoch, resume=None, checkpoints=checkpoints)
        model_uri = run.log_result(result, images.classes)
    return _finished(run, model_uri, result)


def resume_and_track(run_id: str, tracking_uri: str | None = None, progress_factory=None,
                     sync_timeout: float = SYNC_TIMEOUT_S) -> JobResult:
    """Continue a run that was killed or interrupted from its last checkpoint, in the same run."""
    saved, path = load_resume_point(run_id, tracking_uri, checkpoint_dir(run_id))
    config = TrainConfig(**saved)
    state = engine.load_checkpoint(path)
    device, images, splits = prepare(config, tracking_uri)
    progress = progress_factory(config.epochs) if progress_factory else None
    with contextlib.ExitStack() as stack:
        if progress is not None:
            stack.enter_context(progress)
        stack.enter_context(sigterm_raises())
        run = stack.enter_context(TrackedRun(config, "", tracking_uri, resume_run_id=run_id, sync_timeout=sync_timeout))
        history = [engine.EpochMetrics(**m) for m in state["history"]]
        run.log_past_epochs(history)
        run.set_tags({"resumed_from_epoch": str(state["epoch"])})
        result = _train(run, config, splits, device, progress, lambda m: None, resume=state)
        model_uri = run.log_result(result, images.classes)
    return _finished(run, model_uri, result)


def _finished(run: TrackedRun, model_uri: str, result) -> JobResult:
    if run.undelivered == 0:  # the server holds the checkpoints now; a finished run is not resumed
        shutil.rmtree(checkpoint_dir(run.run_id), ignore_errors=True)
    return JobResult(run.run_id, run.experiment, model_uri, result, run.undelivered)


def _train(run: TrackedRun, config: TrainConfig, splits, device, progress, on_epoch, resume, checkpoints=True):
    """The loop with this run's callbacks: checkpoint, then metrics, then the caller's hook."""
    folder = checkpoint_dir(run.run_id)
    history = [engine.EpochMetrics(**m) for m in resume["history"]] if resume else []
    warned = False

    def checkpoint(state: dict, is_best: bool) -> None:
        if not checkpoints:
            return
        # Written before the epoch's metrics are logged: a resume never logs an epoch twice.
        engine.save_checkpoint(state, folder / "last.pt")
        run.log_checkpoint(folder / "last.pt")
        if is_best:  # for using the best model, not for resuming: weights and metrics only (a third of the size)
            engine.save_checkpoint({k: state[k] for k in ("epoch", "model", "history")}, folder / "best.pt")

    def epoch_done(metrics: engine.EpochMetrics) -> None:
        nonlocal warned
        run.log_epoch(metrics)
        history.append(metrics)
        if not warned and engine.stuck_at_chance(history, len(splits.classes), config.chance_warn_epochs):
            warned = True
            run.set_tags({"warning": f"val_acc at chance level (<= 1/{len(splits.classes)} + 0.01) for "
                                     f"{config.chance_warn_epochs} epochs up to epoch {metrics.epoch}"})
        on_epoch(metrics)

    result = engine.train(config, splits, device, on_epoch=epoch_done, progress=progress,
                          on_checkpoint=checkpoint, resume=resume)
    if checkpoints:  # once, at the end: it may change every epoch, and only the final one matters
        run.log_checkpoint(folder / "best.pt")
    return result


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
