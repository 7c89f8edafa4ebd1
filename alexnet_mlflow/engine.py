"""The training loop. It knows nothing of MLflow: each finished epoch goes to `on_epoch`."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from alexnet_mlflow.config import TrainConfig
from alexnet_mlflow.data import Splits, augment
from alexnet_mlflow.errors import ConfigError, NonFiniteLoss
from alexnet_mlflow.model import build_model

EVAL_BATCH = 500  # no gradients, so larger batches than training: fewer Python round trips


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float  # the rate this epoch trained with
    epoch_seconds: float
    images_per_second: float  # training images only, augmentation included


@dataclass
class TrainResult:
    model: torch.nn.Module
    history: list[EpochMetrics]
    test_loss: float | None  # None: the data has no test split
    test_acc: float | None
    confusion: torch.Tensor | None  # (classes, classes) counts on the test split: rows true, columns predicted
    device: torch.device
    best: EpochMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.best = min(self.history, key=lambda m: m.val_loss)


class Progress(Protocol):
    def start_epoch(self, epoch: int, batches: int) -> None: ...
    def batch_done(self, loss: float | None) -> None: ...
    def end_epoch(self, metrics: EpochMetrics) -> None: ...


class NoProgress:
    def start_epoch(self, epoch: int, batches: int) -> None: ...
    def batch_done(self, loss: float | None) -> None: ...
    def end_epoch(self, metrics: EpochMetrics) -> None: ...


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available[name]:
        raise ConfigError(f"device {name!r} is not available on this machine: use --device auto or cpu")
    return torch.device(name)


def uses_bf16(config: TrainConfig, device: torch.device) -> bool:
    return config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")


def prefers_channels_last(device: torch.device) -> bool:
    """NHWC where it was measured faster: on CUDA (tensor cores), and on CPU, where oneDNN ran a
    batch-64 step in 400 ms instead of 427 ms in fp32, and in 230 ms instead of 265 ms in bf16
    (2-core AVX-512 CPU, malloc setting of runtime.py; 459/512 and 309/339 ms without it)."""
    return device.type in ("cuda", "cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def make_optimizer(config: TrainConfig, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    # Fused kernels: on a 2-core CPU default Adam spends ~78 ms of a 64-image step updating
    # 36M parameters, fused Adam ~13 ms. torch offers fused on CPU and CUDA (and MPS for Adam).
    fused = device.type in ("cpu", "cuda") or (device.type == "mps" and config.optimizer == "adam")
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay, fused=fused)
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=fused)


def train(
    config: TrainConfig,
    splits: Splits,
    device: torch.device,
    on_epoch: Callable[[EpochMetrics], None] = lambda m: None,
    progress: Progress | None = None,
    on_checkpoint: Callable[[dict, bool], None] = lambda state, is_best: None,
    resume: dict | None = None,
) -> TrainResult:
    """Train for config.epochs, then evaluate on the test split. Same seed, same numbers (on CPU).

    After each epoch `on_checkpoint` gets everything needed to continue exactly (weights,
    optimizer, scheduler, RNG states, history), before `on_epoch` sees the metrics; `resume`
    takes such a state and continues with the next epoch, as if never stopped.
    """
    progress = progress or NoProgress()
    torch.manual_seed(config.seed)
    splits = splits.to(device)  # the whole uint8 dataset lives on the device: ~150 MB for CIFAR-10
    model = build_model(config).to(device)
    bf16 = uses_bf16(config, device)
    channels_last = prefers_channels_last(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(config, model, device)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=config.lr_factor, patience=config.lr_patience
    )
    autocast = _autocast(device, bf16)
    gen = torch.Generator(device=device).manual_seed(config.seed)

    history: list[EpochMetrics] = []
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        torch.set_rng_state(resume["torch_rng"])  # dropout masks
        gen.set_state(resume["generator"])  # shuffling and augmentation
        if device.type == "cuda" and "cuda_rng" in resume:
            torch.cuda.set_rng_state(resume["cuda_rng"], device)
        history = [EpochMetrics(**m) for m in resume["history"]]
    train_images, train_labels = splits.train
    n = len(train_labels)
    n_batches = -(-n // config.batch_size)
    for epoch in range(len(history) + 1, config.epochs + 1):
        progress.start_epoch(epoch, n_batches)
        lr = optimizer.param_groups[0]["lr"]
        start = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        order = torch.randperm(n, generator=gen, device=device)
        for i, index in enumerate(order.split(config.batch_size)):
            images = augment(train_images[index], config.crop_padding, config.hflip, gen)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = train_labels[index]
            with autocast():
                logits = model(images)
            loss = F.cross_entropy(logits.float(), labels)
            if not torch.isfinite(loss):  # stop at once: every later step would be NaN too
                raise NonFiniteLoss(loss.item(), epoch, i + 1, optimizer.param_groups[0]["lr"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(index)
            correct += (logits.argmax(1) == labels).sum()
            # .item() waits for the GPU; read the loss only every 10th batch.
            progress.batch_done(loss.item() if i % 10 == 0 else None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_seconds = time.perf_counter() - start
        val_loss, val_acc, _ = evaluate(model, *splits.val, autocast, channels_last)
        scheduler.step(val_loss)
        metrics = EpochMetrics(
            epoch=epoch,
            train_loss=loss_sum.item() / n,
            train_acc=correct.item() / n,
            val_loss=val_loss,
            val_acc=val_acc,
            lr=lr,
            epoch_seconds=time.perf_counter() - start,
            images_per_second=n / train_seconds,
        )
        is_best = all(metrics.val_loss < m.val_loss for m in history)
        history.append(metrics)
        on_checkpoint(_state(model, optimizer, scheduler, gen, history, device), is_best)
        progress.end_epoch(metrics)
        on_epoch(metrics)

    if len(splits.test[1]) == 0:  # an image folder without test/: nothing to report, nothing faked
        return TrainResult(model, history, None, None, None, device)
    test_loss, test_acc, predictions = evaluate(model, *splits.test, autocast, channels_last)
    confusion = _confusion(splits.test[1], predictions, len(splits.classes))
    return TrainResult(model, history, test_loss, test_acc, confusion, device)


def _state(model, optimizer, scheduler, gen, history: list[EpochMetrics], device: torch.device) -> dict:
    state = {
        "epoch": history[-1].epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(), "generator": gen.get_state(),
        "history": [vars(m) for m in history],
    }
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoint(state: dict, path) -> None:
    """Atomically: a kill while writing leaves the previous checkpoint whole."""
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_checkpoint(path) -> dict:
    # weights_only: tensors and plain containers only, no pickled code runs on load.
    return torch.load(path, map_location="cpu", weights_only=True)


def stuck_at_chance(history: list[EpochMetrics], classes: int, epochs: int, margin: float = 0.01) -> bool:
    """val_acc within `margin` of guessing (1/classes) for the last `epochs` epochs."""
    recent = history[-epochs:] if epochs > 0 else []
    return len(recent) == epochs > 0 and all(m.val_acc <= 1 / classes + margin for m in recent)


@torch.no_grad()
def evaluate(model, images, labels, autocast, channels_last: bool) -> tuple[float, float, torch.Tensor]:
    """Loss, accuracy and predicted classes, without augmentation and with dropout off."""
    model.eval()
    loss_sum = torch.zeros((), device=images.device)
    predictions = []
    for batch, batch_labels in zip(images.split(EVAL_BATCH), labels.split(EVAL_BATCH)):
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(batch)
        loss_sum += F.cross_entropy(logits.float(), batch_labels, reduction="sum")
        predictions.append(logits.argmax(1))
    predicted = torch.cat(predictions)
    n = len(labels)
    return loss_sum.item() / n, (predicted == labels).sum().item() / n, predicted


def _confusion(labels: torch.Tensor, predicted: torch.Tensor, classes: int) -> torch.Tensor:
    counts = torch.bincount(labels * classes + predicted, minlength=classes * classes)
    return counts.reshape(classes, classes).cpu()


def _autocast(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
