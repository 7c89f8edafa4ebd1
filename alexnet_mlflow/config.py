"""The single source of training parameters.

`TrainConfig` is read by the CLI (one option per field), checked against MLproject by a test,
and logged to MLflow as params. Defaults are the report's best configuration: relu, Adam at
lr 1e-4, batch 64, dropout 0.8, 50 epochs, ReduceLROnPlateau(factor 0.1, patience 3).

This module imports no torch, so the CLI can build its options without paying for torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from alexnet_mlflow.errors import ConfigError

ACTIVATIONS = ("relu", "leaky_relu", "sigmoid", "tanh", "elu", "gelu")
OPTIMIZERS = ("adam", "sgd")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16")
DATASETS = ("cifar10", "synthetic")


def _param(default: Any, help: str, choices: tuple[str, ...] = ()) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class TrainConfig:
    # model
    activation: str = _param("relu", "Activation after every conv and hidden FC layer.", ACTIVATIONS)
    dropout: float = _param(0.8, "Probability of dropping a unit before each hidden FC layer.")
    batch_norm: bool = _param(False, "Add batch norm after every convolution (the report's network has none).")
    # optimisation
    optimizer: str = _param("adam", "Optimizer (sgd uses --momentum).", OPTIMIZERS)
    lr: float = _param(0.0001, "Initial learning rate.")
    momentum: float = _param(0.9, "SGD momentum (ignored by adam).")
    weight_decay: float = _param(0.0, "L2 weight decay.")
    batch_size: int = _param(64, "Training batch size.")
    epochs: int = _param(50, "Number of epochs.")
    lr_factor: float = _param(0.1, "ReduceLROnPlateau: multiply the lr by this when val_loss plateaus.")
    lr_patience: int = _param(3, "ReduceLROnPlateau: epochs without val_loss improvement before reducing.")
    # data
    dataset: str = _param("cifar10", "cifar10, or synthetic: a small learnable stand-in for smoke runs.", DATASETS)
    data_dir: str = _param("auto", "Folder holding cifar-10-batches-py; auto = a per-user cache folder.")
    skip_bad_images: bool = _param(False, "Skip unreadable image files (and log how many) instead of stopping.")
    val_fraction: float = _param(0.1, "Share of training images held out for validation (0.1 = 5,000 of 50,000).")
    crop_padding: int = _param(4, "Random-crop padding in pixels (0 turns random crops off).")
    hflip: bool = _param(True, "Random horizontal flips.")
    norm_mean: float = _param(0.5, "Normalisation mean, every channel.")
    norm_std: float = _param(0.5, "Normalisation std, every channel.")
    # runtime
    seed: int = _param(0, "Seed for weights, the validation split, shuffling and augmentation.")
    device: str = _param("auto", "auto picks cuda, then mps, then cpu.", DEVICES)
    precision: str = _param("auto", "auto = bf16 autocast on CUDA, fp32 elsewhere.", PRECISIONS)
    chance_warn_epochs: int = _param(
        5, "Tag the run with a warning when val_acc stays at chance level (1/classes + 0.01) this many epochs (0 = never).")

    def __post_init__(self) -> None:
        for f in fields():
            choices = f.metadata["choices"]
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ConfigError(f"{f.name} {value!r} is not one of {', '.join(choices)}")
        _require(0 <= self.dropout < 1, "dropout", self.dropout, "a probability in [0, 1)")
        _require(self.lr > 0, "lr", self.lr, "a number > 0, e.g. 0.0001")
        _require(self.batch_size > 0, "batch_size", self.batch_size, "an integer > 0, e.g. 64")
        _require(self.epochs > 0, "epochs", self.epochs, "an integer > 0")
        _require(0 < self.val_fraction < 1, "val_fraction", self.val_fraction, "a fraction in (0, 1), e.g. 0.1")
        _require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        _require(0 <= self.momentum < 1, "momentum", self.momentum, "a number in [0, 1)")
        _require(0 < self.lr_factor < 1, "lr_factor", self.lr_factor, "a factor in (0, 1), e.g. 0.1")
        _require(self.lr_patience >= 0, "lr_patience", self.lr_patience, "an integer >= 0")
        _require(self.crop_padding >= 0, "crop_padding", self.crop_padding, "an integer >= 0")
        _require(self.norm_std > 0, "norm_std", self.norm_std, "a number > 0")
        _require(self.chance_warn_epochs >= 0, "chance_warn_epochs", self.chance_warn_epochs, "an integer >= 0")

    def as_params(self) -> dict[str, str]:
        """Every field as the string MLflow stores; the same spelling as MLproject's defaults."""
        return {name: format_param(value) for name, value in dataclasses.asdict(self).items()}

    def run_name(self) -> str:
        """A readable name from the key parameters, e.g. relu-lr1e-4-bs64-do0.8."""
        lr = f"{self.lr:.0e}".replace("e-0", "e-").replace("e+0", "e")
        return f"{self.activation}-lr{lr}-bs{self.batch_size}-do{self.dropout:g}"


def fields() -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(TrainConfig)


def defaults() -> dict[str, Any]:
    return {f.name: f.default for f in fields()}


def parse_value(name: str, value: Any) -> Any:
    """A field's value from text or YAML ("1e-3", "true", 64.0), typed as the field, or a
    one-line ConfigError naming the value."""
    kinds = {f.name: f.type for f in fields()}
    if name not in kinds:
        raise ConfigError(f"{name!r} is not a training parameter; see alexnet-mlflow train --help")
    kind = kinds[name]
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "false"):
                return str(value).lower() == "true"
            raise ValueError
        if kind == "int":
            number = float(value)
            if not number.is_integer():
                raise ValueError
            return int(number)
        if kind == "float":
            return float(value)
        return str(value)
    except ValueError:
        accepted = {"bool": "true or false", "int": "an integer", "float": "a number"}[kind]
        raise ConfigError(f"{name}={value!r} is invalid: expected {accepted}") from None


def format_param(value: Any) -> str:
    # Lower-case booleans: MLproject passes them as the strings "true"/"false", and MLflow
    # refuses to re-log a param with another spelling.
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _require(ok: bool, name: str, value: Any, accepted: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: expected {accepted}")
