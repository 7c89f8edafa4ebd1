"""`compare` against stores holding runs whose metrics are known: a sqlite file and a real server."""

import csv
import io
import json
import math
import statistics

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from typer.testing import CliRunner

from alexnet_mlflow import compare
from alexnet_mlflow.cli import app
from alexnet_mlflow.compare import CompareQuery
from alexnet_mlflow.config import TrainConfig
from alexnet_mlflow.tracking import DEFAULT_EXPERIMENT
from conftest import free_port, run_cli

runner = CliRunner()
EXPERIMENT = "known"

# name: (params, status, {metric: history by epoch 1..n}, parent)
RUNS = {
    "a": ({"activation": "relu", "lr": "0.001", "seed": "0"}, "FINISHED",
          {"val_loss": [2.0, 1.0, 1.5], "val_acc": [0.3, 0.6, 0.5]}, None),
    "b": ({"activation": "relu", "lr": "0.0001", "seed": "0"}, "FINISHED",
          {"val_loss": [2.0, 1.2, 1.2], "val_acc": [0.2, 0.4, 0.45]}, None),
    "c": ({"activation": "leaky_relu", "lr": "0.0001", "seed": "0"}, "FINISHED",  # ties b on last val_loss
          {"val_loss": [1.9, 1.4, 1.2], "val_acc": [0.25, 0.35, 0.5]}, None),
    "d": ({"activation": "relu", "lr": "0.0001", "seed": "1"}, "FINISHED",  # no val_loss at all
          {"train_loss": [2.2, 2.1]}, None),
    "e": ({"activation": "sigmoid", "lr": "0.0001", "seed": "0"}, "FAILED",
          {"val_loss": [2.3], "val_acc": [0.1]}, None),
    "parent": ({}, "FINISHED", {}, None),
    "f": ({"activation": "relu", "lr": "0.0001", "seed": "2"}, "FINISHED",
          {"val_loss": [1.1, 0.9], "val_acc": [0.6, 0.7]}, "parent"),
    "g": ({"activation": "leaky_relu", "lr": "0.0001", "seed": "1"}, "FINISHED",
          {"val_loss": [1.8, 1.3, 1.0], "val_acc": [0.3, 0.5, 0.62]}, None),
}


def populate(uri: str) -> dict[str, str]:
    """Create the runs above; start times one second apart, so tie order is known."""
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(EXPERIMENT)
    ids: dict[str, str] = {}
    for i, (name, (params, status, metrics, parent)) in enumerate(RUNS.items()):
        tags = {"mlflow.parentRunId": ids[parent]} if parent else {}
        run = client.create_run(experiment_id, start_time=1_700_000_000_000 + i * 1000, tags=tags, run_name=name)
        ids[name] = run.info.run_id
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()], metrics=[
            Metric(key, value, 1_700_000_000_000 + step, step)
            for key, history in metrics.items() for step, value in enumerate(history, start=1)
        ])
        client.set_terminated(run.info.run_id, status, end_time=1_700_000_000_000 + i * 1000 + 60_000)
    client.create_experiment("other")
    return ids


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('compare')}/mlflow.db"
    return uri, populate(uri)


@pytest.fixture(scope="module")
def server_store(mlflow_server):
    return mlflow_server, populate(mlflow_server)


@pytest.fixture(params=["sqlite", "server"])
def store(request):
    return request.getfixturevalue(f"{request.param}_store")


def invoke_json(uri: str, *args: str) -> list[dict]:
    result = runner.invoke(app, ["compare", "--tracking-uri", uri, "--experiment", EXPERIMENT, "--format", "json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def names(rows: list[dict]) -> list[str]:
    return [row["run"] for row in rows]


def test_ranking_is_mlflows_own_order_by_the_metric(store):
    uri, _ = store
    rows = invoke_json(uri, "--metric", "val_loss")
    mlflow.set_tracking_uri(uri)
    expected = mlflow.search_runs(experiment_names=[EXPERIMENT], filter_string="attributes.status = 'FINISHED'",
                                  order_by=["metrics.val_loss ASC"], output_format="list")
    assert [row["run_id"] for row in rows] == [r.info.run_id for r in expected]
    # f 0.9, g 1.0, then the tie at 1.2 (c started later, so first), a 1.5, then runs without val_loss
    assert names(rows)[:5] == ["f", "g", "c", "b", "a"]
    assert [row["rank"] for row in rows] == [1, 2, 3, 4, 5, None, None]
    assert {row["run"] for row in rows[5:]} == {"d", "parent"} and rows[5]["val_loss"] is None


def test_agg_min_ranks_by_the_minimum_of_each_history(store):
    uri, ids = store
    rows = invoke_json(uri, "--metric", "val_loss", "--agg", "min")
    client = MlflowClient(uri)
    minima = {}
    for name, run_id in ids.items():
        history = client.get_metric_history(run_id, "val_loss")
        if history and RUNS[name][1] == "FINISHED":
            minima[name] = min(m.value for m in history)
    order = list(RUNS)  # ties: the later start first, as MLflow orders them
    assert [(row["run"], row["min(val_loss)"]) for row in rows if row["rank"]] == \
        sorted(minima.items(), key=lambda item: (item[1], -order.index(item[0])))
    assert names(rows)[:3] == ["f", "g", "a"]  # a's minimum 1.0 ranks it above b and c; its last 1.5 would not


def test_accuracy_ranks_highest_first_and_asc_overrides(sqlite_store):
    uri, _ = sqlite_store
    assert names(invoke_json(uri, "--metric", "val_acc"))[:4] == ["f", "g", "c", "a"]  # c, a tie at 0.5
    assert names(invoke_json(uri, "--metric", "val_acc", "--agg", "max"))[:3] == ["f", "g", "a"]
    assert names(invoke_json(uri, "--metric", "val_acc", "--asc"))[:2] == ["b", "c"]
    assert names(invoke_json(uri, "--metric", "val_loss", "--desc"))[:3] == ["a", "c", "b"]


def test_status_parent_where_filter_and_top(sqlite_store):
    uri, ids = sqlite_store
    assert "e" not in names(invoke_json(uri))
    assert names(invoke_json(uri, "--all"))[:6] == ["f", "g", "c", "b", "a", "e"]
    assert names(invoke_json(uri, "--status", "FAILED")) == ["e"]
    assert names(invoke_json(uri, "--parent", ids["parent"])) == ["f"]
    assert names(invoke_json(uri, "--where", "activation=relu", "--where", "lr=0.0001")) == ["f", "b", "d"]
    assert names(invoke_json(uri, "--where", "activation=leaky_relu,seed=1")) == ["g"]
    assert names(invoke_json(uri, "--filter", "params.lr = '0.001'")) == ["a"]
    assert names(invoke_json(uri, "--top", "2")) == ["f", "g"]


def test_across_experiments_adds_an_experiment_column(sqlite_store):
    uri, _ = sqlite_store
    client = MlflowClient(uri)
    other = client.get_experiment_by_name("other").experiment_id
    run = client.create_run(other, run_name="elsewhere")
    client.log_metric(run.info.run_id, "val_loss", 0.5, step=1)
    client.set_terminated(run.info.run_id)
    only_other = runner.invoke(app, ["compare", "--tracking-uri", uri, "--experiment", "other", "--format", "json"])
    assert names(json.loads(only_other.stdout)) == ["elsewhere"] and "experiment" not in only_other.stdout
    rows = invoke_json(uri, "--experiment", "other", "--top", "2")  # --experiment known, other
    assert [(r["run"], r["experiment"]) for r in rows] == [("elsewhere", "other"), ("f", EXPERIMENT)]


def test_with_no_experiment_named_the_trainings_of_mlflow_run_in_default_count_too(tmp_path, monkeypatch):
    """`mlflow run .` without --experiment-name trains into MLflow's Default experiment; compare
    finds those runs (every training param logged), not other runs there, and not when an
    experiment is named."""
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    training = [Param(k, v) for k, v in TrainConfig().as_params().items()]
    for name, experiment, params, loss in (("projected", "0", training, 0.4), ("foreign", "0", training[:3], 0.1),
                                           ("trained", client.create_experiment(DEFAULT_EXPERIMENT), training, 0.6)):
        run = client.create_run(experiment, run_name=name)
        client.log_batch(run.info.run_id, params=params, metrics=[Metric("val_loss", loss, 0, 1)])
        client.set_terminated(run.info.run_id)
    result = runner.invoke(app, ["compare", "--tracking-uri", uri, "--format", "json"])
    assert result.exit_code == 0, result.output
    assert [(r["run"], r["experiment"]) for r in json.loads(result.stdout)] == \
        [("projected", "Default"), ("trained", DEFAULT_EXPERIMENT)]
    named = runner.invoke(app, ["compare", "--tracking-uri", uri, "--experiment", DEFAULT_EXPERIMENT, "--format", "json"])
    assert names(json.loads(named.stdout)) == ["trained"]


def test_columns_are_chosen_and_missing_values_do_not_crash(sqlite_store):
    uri, _ = sqlite_store
    rows = invoke_json(uri, "--params", "seed,nonexistent", "--metrics", "val_acc,train_loss")
    assert list(rows[0]) == ["rank", "run", "run_id", "status", "dataset", "seed", "nonexistent", "val_loss", "val_acc",
                             "train_loss", "duration_s"]
    assert rows[0]["nonexistent"] is None and rows[0]["duration_s"] == 60.0
    assert next(r for r in rows if r["run"] == "d")["train_loss"] == 2.1


def test_epoch_table_matches_the_metric_histories(store):
    uri, ids = store
    rows = invoke_json(uri, "--epochs", "1,2,3,10", "--top", "3")
    assert [row["epoch"] for row in rows] == [1, 2, 3, 10]
    assert list(rows[0]) == ["epoch", "f", "g", "c"]
    client = MlflowClient(uri)
    for name in ("f", "g", "c"):
        history = {m.step: m.value for m in client.get_metric_history(ids[name], "val_loss")}
        assert [row[name] for row in rows] == [history.get(epoch) for epoch in (1, 2, 3, 10)]


def test_group_by_gives_mean_and_sample_std_ranked_by_mean(store):
    uri, _ = store
    rows = invoke_json(uri, "--group-by", "activation")
    last = {name: history["val_loss"][-1] for name, (_, status, history, _) in RUNS.items()
            if status == "FINISHED" and "val_loss" in history}
    relu, leaky = [last[n] for n in ("a", "b", "f")], [last[n] for n in ("c", "g")]
    by_activation = {row["activation"]: row for row in rows}
    assert by_activation["relu"]["runs"] == 4  # a, b, d, f: d has no val_loss
    assert by_activation["relu"]["mean val_loss"] == pytest.approx(statistics.fmean(relu))
    assert by_activation["relu"]["std val_loss"] == pytest.approx(statistics.stdev(relu))
    assert by_activation["leaky_relu"]["mean val_loss"] == pytest.approx(statistics.fmean(leaky))
    assert by_activation["leaky_relu"]["best run"] == "g"
    assert [row["activation"] for row in rows] == ["leaky_relu", "relu", None]  # None: the parent run
    assert rows[-1]["rank"] is None and rows[-1]["std val_loss"] is None


def test_every_format_parses_back_with_the_same_columns(sqlite_store, tmp_path):
    uri, _ = sqlite_store
    base = ["compare", "--tracking-uri", uri, "--experiment", EXPERIMENT]
    reference = invoke_json(uri)
    columns = list(reference[0])

    csv_rows = list(csv.DictReader(io.StringIO(runner.invoke(app, [*base, "--format", "csv"]).stdout)))
    assert list(csv_rows[0]) == columns
    assert [r["run_id"] for r in csv_rows] == [r["run_id"] for r in reference]
    assert float(csv_rows[0]["val_loss"]) == reference[0]["val_loss"] and csv_rows[-1]["rank"] == ""

    markdown = runner.invoke(app, [*base, "--format", "markdown"]).stdout.splitlines()
    assert [c.strip() for c in markdown[0].strip("|").split("|")] == columns
    assert len(markdown) == 2 + len(reference) and "\x1b" not in "".join(markdown)
    assert [c.strip() for c in markdown[2].strip("|").split("|")][1] == "f"

    out = tmp_path / "ranking.json"
    result = runner.invoke(app, [*base, "--format", "json", "--output", str(out)])
    assert result.exit_code == 0 and result.stdout == ""
    assert json.loads(out.read_text()) == reference

    table = runner.invoke(app, [*base, "--output", str(tmp_path / "ranking.txt")])
    text = (tmp_path / "ranking.txt").read_text()
    assert table.exit_code == 0 and "runs ranked by val_loss, lowest first" in text and "\x1b" not in text


def test_plot_draws_a_png(sqlite_store, tmp_path):
    uri, _ = sqlite_store
    png = tmp_path / "curves.png"
    result = runner.invoke(app, ["compare", "--tracking-uri", uri, "--experiment", EXPERIMENT, "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.mark.parametrize("args, words", [
    (["--experiment", "nope"], ["experiment 'nope' not found", "known", "other"]),
    (["--metric", "val_los"], ["no run has metric 'val_los'", "train_loss, val_acc, val_loss"]),
    (["--filter", "params.lr === 1"], ["filter", "is invalid", "search-runs"]),
    (["--where", "activation"], ["--where 'activation'", "PARAM=VALUE"]),
    (["--agg", "mean"], ["agg 'mean'", "last, min, max"]),
    (["--format", "xml"], ["format 'xml'", "table, csv, markdown, json"]),
    (["--status", "FAILED", "--where", "activation=relu"], ["no runs match", "FAILED"]),
])
def test_errors_are_one_line(sqlite_store, workdir, args, words):
    from test_cli import assert_one_line_error

    uri, _ = sqlite_store
    result = run_cli("compare", "--tracking-uri", uri, "--experiment", EXPERIMENT, *args, cwd=workdir, timeout=30)
    assert_one_line_error(result, words)


def test_unreachable_server_fails_within_ten_seconds(workdir):
    from test_cli import assert_one_line_error

    uri = f"http://127.0.0.1:{free_port()}"
    result = run_cli("compare", "--tracking-uri", uri, cwd=workdir, timeout=10)
    assert_one_line_error(result, [uri, "does not answer"])


def test_rank_orders_nan_after_numbers_and_missing_last():
    run = lambda name, start: compare.RunRecord(name, name, "x", "FINISHED", start, None, {}, {}, {})  # noqa: E731
    runs = [run("nan", 1), run("low", 2), run("none", 3), run("high", 4)]
    ranked = compare.rank(runs, {"nan": math.nan, "low": 0.1, "high": 0.9}, descending=False)
    assert [(r.run.name, r.rank) for r in ranked] == [("low", 1), ("high", 2), ("nan", None), ("none", None)]


def test_aggregate_last_is_the_highest_step():
    assert compare.aggregate([(3, 0.5), (1, 0.9), (2, 0.1)], "last") == 0.5
    assert compare.aggregate([(1, math.nan), (2, 0.4)], "min") == 0.4
    assert compare.aggregate([], "max") is None


def test_direction_from_the_metric_name():
    assert not compare.descending_by_default("val_loss") and not compare.descending_by_default("error_rate")
    assert compare.descending_by_default("val_acc") and compare.descending_by_default("images_per_second")
    assert CompareQuery(metric="test_acc").is_descending and not CompareQuery(metric="test_acc", descending=False).is_descending


def test_epoch_table_group_by_and_plot_on_a_short_real_training(workdir):
    """Two 2-epoch synthetic trainings (seeds 0 and 1) logged by the real training job."""
    from alexnet_mlflow.config import TrainConfig
    from alexnet_mlflow.job import train_and_track

    uri = f"sqlite:///{workdir}/mlflow.db"
    trained = [train_and_track(TrainConfig(dataset="synthetic", epochs=2, seed=seed, batch_size=256), "real", uri)
               for seed in (0, 1)]
    base = ["compare", "--tracking-uri", uri, "--experiment", "real", "--format", "json"]

    epochs = json.loads(runner.invoke(app, [*base, "--epochs", "1,2", "--metric", "train_loss"]).stdout)
    by_id = {t.run_id: t for t in trained}
    labels = [c for c in epochs[0] if c != "epoch"]
    assert len(labels) == 2 and all(label.startswith("relu-lr1e-4-bs256-do0.8 (") for label in labels)
    for label in labels:
        run = next(t for run_id, t in by_id.items() if run_id.startswith(label[-7:-1]))
        assert [row[label] for row in epochs] == pytest.approx([m.train_loss for m in run.result.history])

    groups = json.loads(runner.invoke(app, [*base, "--group-by", "activation,batch_size"]).stdout)
    losses = [t.result.history[-1].val_loss for t in trained]
    assert len(groups) == 1 and groups[0]["runs"] == 2 and groups[0]["batch_size"] == "256"
    assert groups[0]["mean val_loss"] == pytest.approx(statistics.fmean(losses))
    assert groups[0]["std val_loss"] == pytest.approx(statistics.stdev(losses))

    png = workdir / "val_loss.png"
    assert runner.invoke(app, [*base, "--plot", str(png)]).exit_code == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_malformed_filter_is_reported_as_such_by_both_stores(store):
    from alexnet_mlflow import tracking
    from alexnet_mlflow.errors import TrackingError

    uri, _ = store
    with pytest.raises(TrackingError, match=r"filter 'params.lr === 1' is invalid: .*search-runs"):
        tracking.find_runs(uri, [EXPERIMENT], "params.lr === 1")
