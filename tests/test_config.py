import dataclasses

import pytest

from alexnet_mlflow.config import TrainConfig, defaults, fields, format_param
from alexnet_mlflow.errors import ConfigError


def test_defaults_are_the_reports_best_configuration():
    c = TrainConfig()
    assert (c.activation, c.optimizer, c.lr, c.batch_size, c.dropout, c.epochs) == ("relu", "adam", 1e-4, 64, 0.8, 50)
    assert (c.lr_factor, c.lr_patience, c.batch_norm) == (0.1, 3, False)
    assert (c.crop_padding, c.hflip, c.norm_mean, c.norm_std) == (4, True, 0.5, 0.5)
    assert round(50_000 * c.val_fraction) == 5_000


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().lr = 1.0


@pytest.mark.parametrize("kwargs, words", [
    ({"activation": "foo"}, ["activation", "'foo'", "relu", "leaky_relu", "sigmoid"]),
    ({"dropout": 1.5}, ["dropout=1.5", "[0, 1)"]),
    ({"dropout": -0.1}, ["dropout=-0.1", "[0, 1)"]),
    ({"dropout": 1.0}, ["dropout=1.0"]),
    ({"batch_size": 0}, ["batch_size=0", "> 0"]),
    ({"lr": 0.0}, ["lr=0.0", "> 0"]),
    ({"lr": float("nan")}, ["lr=nan"]),
    ({"epochs": 0}, ["epochs=0"]),
    ({"optimizer": "rmsprop"}, ["optimizer", "adam", "sgd"]),
    ({"device": "tpu"}, ["device", "cuda"]),
    ({"val_fraction": 1.0}, ["val_fraction=1.0"]),
])
def test_bad_values_name_the_value_and_what_is_accepted(kwargs, words):
    with pytest.raises(ConfigError) as error:
        TrainConfig(**kwargs)
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_params_cover_every_field_in_mlprojects_spelling():
    params = TrainConfig(batch_norm=True).as_params()
    assert list(params) == [f.name for f in fields()]
    assert params["batch_norm"] == "true" and params["hflip"] == "true"
    assert params["lr"] == "0.0001" and params["batch_size"] == "64"
    assert format_param(False) == "false"


def test_run_name_from_key_params():
    assert TrainConfig().run_name() == "relu-lr1e-4-bs64-do0.8"
    assert TrainConfig(activation="leaky_relu", lr=1e-3, batch_size=128, dropout=0.5).run_name() == \
        "leaky_relu-lr1e-3-bs128-do0.5"


def test_defaults_match_fields():
    assert defaults() == dataclasses.asdict(TrainConfig())
