"""What a sweep trains: its search space, from options, a YAML file or a preset.

A `SweepSpec` is the identity of a sweep: the same spec is the same Optuna study (sweep.py), so
rerunning a command finds its trials. This module imports no torch, optuna or mlflow: the CLI
reads its defaults and checks every value before anything starts.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from alexnet_mlflow import config as config_module
from alexnet_mlflow.compare import descending_by_default
from alexnet_mlflow.config import TrainConfig
from alexnet_mlflow.errors import ConfigError

SAMPLERS = ("grid", "random", "tpe")
PRESETS = ("report",)
PRESET_DIR = Path(__file__).parent / "presets"
# The epochs of the report's "Loss Rate Table"s.
REPORT_EPOCHS = (1, 5, 10, 15, 20, 30, 40, 50)
# What a trial can be ranked by: EpochMetrics' fields (the last epoch's) and the final metrics
# (tests/test_sweep.py checks them against engine.EpochMetrics).
EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds", "images_per_second")
FINAL_METRICS = ("best_val_loss", "best_val_acc", "best_epoch", "test_loss", "test_acc")


@dataclass(frozen=True)
class Range:
    """A numeric interval that random and tpe sample from (a YAML `{low, high, log}` mapping)."""

    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class SweepSpec:
    """What a sweep trains. The same spec is the same study: its fingerprint names the study
    and a rerun with other options cannot silently mix into it."""

    fixed: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields set for every trial
    configurations: tuple[dict[str, Any], ...] = ()  # explicit points, e.g. the report's five
    choices: dict[str, tuple] = field(default_factory=dict)  # swept fields: the values to try
    ranges: dict[str, Range] = field(default_factory=dict)  # swept numeric intervals (random, tpe)
    seeds: int = 1  # grid: each point with seeds seed, seed+1, ...
    sampler: str = "grid"
    n_trials: int = 20  # random and tpe; a grid runs every point
    metric: str = "val_loss"
    prune: bool = False
    prune_startup_trials: int = 5  # MedianPruner: trials that finish before any is pruned
    prune_warmup_epochs: int = 0  # MedianPruner: epochs before a trial may be pruned

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler {self.sampler!r} is not one of {', '.join(SAMPLERS)}")
        if self.metric not in EPOCH_METRICS + FINAL_METRICS:
            raise ConfigError(f"metric {self.metric!r} is not one a trial reports: use one of "
                              f"{', '.join(EPOCH_METRICS + FINAL_METRICS)}")
        if self.prune and self.metric not in EPOCH_METRICS:
            raise ConfigError(f"--prune compares per-epoch values, and {self.metric!r} is logged once: "
                              "use --metric val_loss (or another per-epoch metric)")
        if self.seeds < 1 or self.n_trials < 1:
            raise ConfigError(f"seeds={self.seeds}, n_trials={self.n_trials} are invalid: expected integers >= 1")
        if self.sampler == "grid" and self.ranges:
            raise ConfigError(f"{', '.join(self.ranges)}: a low/high range cannot be a grid: "
                              "list values, or use --sampler random or tpe")
        if self.sampler != "grid" and (self.configurations or self.seeds > 1):
            raise ConfigError(f"--sampler {self.sampler} samples a space: explicit configurations "
                              "(a preset) and --seeds > 1 need --sampler grid")
        swept = set(self.choices) | set(self.ranges) | {k for c in self.configurations for k in c}
        unknown = sorted((swept | set(self.fixed)) - {f.name for f in config_module.fields()})
        if unknown:
            raise ConfigError(f"{', '.join(unknown)}: not a training parameter; see alexnet-mlflow train --help")
        self.example_configs()  # building each trial's TrainConfig checks every value up front

    @property
    def descending(self) -> bool:
        return descending_by_default(self.metric)

    @property
    def swept(self) -> tuple[str, ...]:
        """The fields that differ between trials, seed last."""
        names = list(dict.fromkeys([k for c in self.configurations for k in c] + list(self.choices) + list(self.ranges)))
        if self.seeds > 1:
            names.append("seed")
        return tuple(n for n in names if n != "seed") + (("seed",) if "seed" in names else ())

    def points(self) -> list[dict[str, Any]]:
        """The grid: configurations x every combination of the choices x seeds."""
        base_seed = self.fixed.get("seed", config_module.defaults()["seed"])
        combos = [dict(zip(self.choices, values)) for values in itertools.product(*self.choices.values())]
        out = []
        for configuration in self.configurations or ({},):
            for combo in combos:
                for i in range(self.seeds):
                    point = {**configuration, **combo}
                    if self.seeds > 1:
                        point["seed"] = base_seed + i
                    out.append(point)
        return out

    def config_for(self, params: dict[str, Any]) -> TrainConfig:
        return TrainConfig(**{**self.fixed, **params})

    def example_configs(self) -> list[TrainConfig]:
        if self.sampler == "grid":
            return [self.config_for(p) for p in self.points()]
        corners = [{name: r.low for name, r in self.ranges.items()}, {name: r.high for name, r in self.ranges.items()}]
        for name, values in self.choices.items():
            for i, value in enumerate(values):
                corners.append({name: value})
        return [self.config_for({k: config_module.parse_value(k, v) for k, v in c.items()}) for c in corners]

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True, default=str).encode()).hexdigest()


def parse_values(name: str, text: str) -> tuple:
    """`relu,leaky_relu` -> ('relu', 'leaky_relu'), each typed as the TrainConfig field."""
    return tuple(config_module.parse_value(name, part.strip()) for part in text.split(",") if part.strip())


def load_space(path: str | Path) -> dict[str, Any]:
    """A YAML search space: `field: value` (fixed), `field: [a, b]` (swept),
    `field: {low: 1e-5, high: 1e-2, log: true}` (random/tpe), and optionally
    `configurations: [{...}, ...]` (explicit points) and `seeds: N`."""
    import yaml

    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"space file {str(path)!r} cannot be read ({e.strerror}): pass an existing YAML file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"space file {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"space file {str(path)!r} must be a mapping of parameter names, e.g. `lr: [0.001, 0.0001]`")
    return loaded


def preset_space(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"preset {name!r} is not one of {', '.join(PRESETS)}")
    return load_space(PRESET_DIR / f"{name}.yaml")


def build_spec(space: dict[str, Any], options: dict[str, str | None], **settings: Any) -> SweepSpec:
    """A spec from a space (file or preset, may be empty) and the command's options, which win:
    `--activation relu,leaky_relu` sweeps, `--epochs 1` fixes. `settings` are SweepSpec fields
    (None = the file's value, else the default)."""
    space = dict(space)
    configurations = tuple(
        {k: config_module.parse_value(k, v) for k, v in c.items()} for c in space.pop("configurations", None) or ()
    )
    file_seeds = space.pop("seeds", None)
    fixed, choices, ranges = {}, {}, {}
    for name, value in space.items():
        if isinstance(value, list):
            choices[name] = tuple(config_module.parse_value(name, v) for v in value)
        elif isinstance(value, dict):
            unknown = set(value) - {"low", "high", "log"}
            if unknown or not {"low", "high"} <= set(value):
                raise ConfigError(f"{name}: a range is {{low: L, high: H, log: true|false}}, got {value}")
            ranges[name] = Range(config_module.parse_value(name, value["low"]), config_module.parse_value(name, value["high"]), bool(value.get("log", False)))
        else:
            fixed[name] = config_module.parse_value(name, value)
    for name, text in options.items():
        if text is None or text == "":
            continue
        values = parse_values(name, text)
        for group in (fixed, choices, ranges):
            group.pop(name, None)
        configurations = tuple({k: v for k, v in c.items() if k != name} for c in configurations)
        if len(values) == 1:
            fixed[name] = values[0]
        else:
            choices[name] = values
    if file_seeds is not None and settings.get("seeds") is None:
        settings["seeds"] = int(file_seeds)
    settings = {k: v for k, v in settings.items() if v not in (None, "")}  # "": MLproject's unset
    return SweepSpec(fixed=fixed, configurations=configurations, choices=choices, ranges=ranges, **settings)


def point_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


