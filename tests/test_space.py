"""Search spaces: options, YAML files and the report preset, checked before anything starts."""

from __future__ import annotations

import dataclasses

import pytest

from alexnet_mlflow import engine, space
from alexnet_mlflow.errors import ConfigError


def test_options_fix_one_value_and_sweep_lists():
    spec = space.build_spec({}, {"activation": "relu,leaky_relu", "lr": "1e-3,1e-4", "epochs": "2"}, seeds=2)
    assert spec.fixed == {"epochs": 2}
    assert spec.swept == ("activation", "lr", "seed")
    points = spec.points()
    assert len(points) == 8 and len({space.point_key(p) for p in points}) == 8
    assert points[0] == {"activation": "relu", "lr": 0.001, "seed": 0}
    assert spec.config_for(points[-1]).lr == 0.0001 and spec.config_for(points[-1]).epochs == 2


def test_report_preset_is_the_reports_six_configurations_with_three_seeds():
    spec = space.build_spec(space.preset_space("report"), {"epochs": "1"})
    configs = [spec.config_for(p) for p in spec.points()]
    assert len(configs) == 18 and all(c.epochs == 1 for c in configs)
    distinct = list(dict.fromkeys((c.activation, c.lr, c.batch_size, c.dropout) for c in configs))
    assert distinct == [("relu", 0.001, 128, 0.5), ("leaky_relu", 0.0001, 128, 0.6), ("relu", 0.0001, 128, 0.6),
                        ("relu", 0.0001, 256, 0.6), ("relu", 0.0001, 64, 0.8), ("sigmoid", 0.0001, 64, 0.8)]
    assert sorted({c.seed for c in configs}) == [0, 1, 2]
    assert space.build_spec(space.preset_space("report"), {}).fixed["epochs"] == 50


def test_rankable_metrics_are_what_training_reports():
    assert space.EPOCH_METRICS == tuple(f.name for f in dataclasses.fields(engine.EpochMetrics) if f.name != "epoch")


@pytest.mark.parametrize("given, options, settings, message", [
    ({}, {"activation": "relu,foo"}, {}, "activation 'foo' is not one of"),
    ({}, {"dropout": "0.5,1.5"}, {}, "dropout=1.5 is invalid"),
    ({}, {"batch_size": "64,abc"}, {}, "batch_size='abc' is invalid: expected an integer"),
    ({"lr": {"low": 1e-4, "high": 1e-2}}, {}, {}, "a low/high range cannot be a grid"),
    ({}, {}, {"sampler": "bayes"}, "sampler 'bayes' is not one of grid, random, tpe"),
    ({}, {}, {"metric": "val_acc", "prune": True}, None),
    ({}, {}, {"metric": "test_acc", "prune": True}, "--prune compares per-epoch values"),
    ({"colour": ["red"]}, {}, {}, "colour"),
    ({}, {}, {"sampler": "tpe", "seeds": 3}, "need --sampler grid"),
])
def test_bad_spaces_are_one_line_errors(given, options, settings, message):
    if message is None:
        space.build_spec(given, options, **settings)
        return
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as error:
        space.build_spec(given, options, **settings)
    assert "\n" not in str(error.value)


