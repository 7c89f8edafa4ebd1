"""Rank runs by a metric and shape them into tables: the data behind `alexnet-mlflow compare`.

Everything here returns data (`Table`s, `Ranked` rows); the CLI renders it. MLflow is reached
only through `tracking.find_runs` and `tracking.metric_histories`.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Sequence

from alexnet_mlflow import tracking
from alexnet_mlflow.config import fields
from alexnet_mlflow.errors import ConfigError, UserError
from alexnet_mlflow.tracking import RunRecord

KEY_PARAMS = ("activation", "lr", "batch_size", "dropout", "epochs")
HEADLINE_METRICS = ("val_loss", "val_acc", "test_acc", "train_loss", "best_epoch")
AGGREGATIONS = ("last", "min", "max")
STATUSES = ("FINISHED", "FAILED", "KILLED", "RUNNING", "SCHEDULED")
CURVE_RUNS = 10  # runs in an epoch table or plot when --top is not given
# Higher is better for these; for everything else (losses, errors, seconds) lower is better.
DESCENDING_WORDS = ("acc", "precision", "recall", "f1", "auc", "per_second", "throughput")
# `mlflow run .` without --experiment-name puts its run in MLflow's own "Default" experiment, so
# with no experiment named compare reads the package's experiment and this package's trainings
# in Default: those runs that carry every training parameter.
MLFLOW_DEFAULT_EXPERIMENT = "Default"
DEFAULT_SCOPE = f"{tracking.DEFAULT_EXPERIMENT} + trainings in {MLFLOW_DEFAULT_EXPERIMENT}"


@dataclass(frozen=True)
class Table:
    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]


@dataclass(frozen=True)
class CompareQuery:
    metric: str = "val_loss"
    agg: str = "last"
    descending: bool | None = None  # None: from the metric's name
    experiments: tuple[str, ...] = ()  # (): DEFAULT_SCOPE
    filter: str = ""
    where: tuple[str, ...] = ()  # "param=value", all must hold
    status: str | None = "FINISHED"  # None: every status
    parent: str | None = None  # only the children of this run (a sweep)
    top: int | None = None
    params: tuple[str, ...] = KEY_PARAMS
    metrics: tuple[str, ...] | None = None  # None: the headline metrics other than the ranked one
    epochs: tuple[int, ...] = ()  # non-empty: the epoch table instead of the ranking
    group_by: tuple[str, ...] = ()  # non-empty: the group table instead (with epochs: groups' mean per epoch)

    def __post_init__(self) -> None:
        if self.agg not in AGGREGATIONS:
            raise ConfigError(f"agg {self.agg!r} is not one of {', '.join(AGGREGATIONS)}")
        if self.status is not None and self.status not in STATUSES:
            raise ConfigError(f"status {self.status!r} is not one of {', '.join(STATUSES)}")
        if self.top is not None and self.top < 1:
            raise ConfigError(f"top={self.top} is invalid: expected an integer >= 1")
        if any(e < 0 for e in self.epochs):
            raise ConfigError(f"epochs {self.epochs} is invalid: expected steps >= 0, e.g. 1,5,10")
        parse_where(self.where)

    @property
    def is_descending(self) -> bool:
        return self.descending if self.descending is not None else descending_by_default(self.metric)

    @property
    def metric_column(self) -> str:
        return self.metric if self.agg == "last" else f"{self.agg}({self.metric})"


@dataclass(frozen=True)
class Ranked:
    rank: int | None  # None: the run lacks the metric
    run: RunRecord
    value: float | None


def descending_by_default(metric: str) -> bool:
    return any(word in metric.lower() for word in DESCENDING_WORDS)


def parse_where(items: Sequence[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--where {item!r} is invalid: expected PARAM=VALUE, e.g. activation=relu")
        pairs[key.strip()] = value.strip()
    return pairs


def search_filter(query: CompareQuery) -> str:
    """The MLflow search filter for the query: the user's, AND the shortcuts. (MLflow's grammar
    has AND only, no OR and no parentheses, so joining clauses with AND keeps their meaning.)"""
    clauses = [query.filter.strip()] if query.filter.strip() else []
    clauses += [f"params.`{k}` = {_quote(v)}" for k, v in parse_where(query.where).items()]
    if query.status:
        clauses.append(f"attributes.status = '{query.status}'")
    if query.parent:
        clauses.append(f"tags.`mlflow.parentRunId` = {_quote(query.parent)}")
    return " AND ".join(clauses)


def _quote(value: str) -> str:
    return "'" + value.replace("'", "\\'") + "'"


def find(query: CompareQuery, tracking_uri: str | None) -> list[RunRecord]:
    if query.experiments:
        runs = tracking.find_runs(tracking_uri, list(query.experiments), search_filter(query))
    else:
        training_params = {f.name for f in fields()}
        runs = [r for r in tracking.find_runs(tracking_uri, [tracking.DEFAULT_EXPERIMENT, MLFLOW_DEFAULT_EXPERIMENT],
                                              search_filter(query), missing_ok=True)
                if r.experiment == tracking.DEFAULT_EXPERIMENT or training_params <= r.params.keys()]
    # `mlflow run -e compare` makes a run of its own; it is not a training to rank.
    runs = [r for r in runs if r.entry_point != "compare"]
    if not runs:
        hint = "; --all includes every status" if query.status else ""
        raise UserError(f"no runs match in experiment(s) {', '.join(query.experiments) or DEFAULT_SCOPE} "
                        f"(filter: {search_filter(query) or 'none'}){hint}")
    return runs


def aggregate(points: Sequence[tuple[int, float]], agg: str) -> float | None:
    """The value that stands for a run: its last point (highest step), or the min or max."""
    if not points:
        return None
    values = [v for _, v in points]
    if agg == "last":
        return max(points, key=lambda p: p[0])[1]
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan
    return min(finite) if agg == "min" else max(finite)


def rank(runs: Sequence[RunRecord], values: dict[str, float | None], descending: bool) -> list[Ranked]:
    """Best first, in MLflow's own search order: finite values, then NaN, then runs without the
    metric; ties by later start time, then run id (as `search_runs(order_by=...)` sorts)."""

    def key(run: RunRecord):
        value = values.get(run.run_id)
        missing = 2 if value is None else 1 if math.isnan(value) else 0
        ordered = 0.0 if missing else (-value if descending else value)
        return missing, ordered, -run.start_time, run.run_id

    ranked, position = [], 0
    for run in sorted(runs, key=key):
        value = values.get(run.run_id)
        has_value = value is not None and not math.isnan(value)
        position += has_value
        ranked.append(Ranked(position if has_value else None, run, value))
    return ranked


def ranked_runs(query: CompareQuery, tracking_uri: str | None) -> list[Ranked]:
    runs = find(query, tracking_uri)
    if not any(query.metric in r.metrics for r in runs):
        known = sorted({m for r in runs for m in r.metrics})
        raise UserError(f"no run has metric {query.metric!r}; metrics of these runs: {', '.join(known) or 'none'}")
    if query.agg == "last":
        values = {r.run_id: r.metrics.get(query.metric) for r in runs}
    else:  # the server orders by last values only: min and max need each run's history
        with_metric = [r.run_id for r in runs if query.metric in r.metrics]
        histories = tracking.metric_histories(tracking_uri, with_metric, query.metric)
        values = {run_id: aggregate(points, query.agg) for run_id, points in histories.items()}
    return rank(runs, values, query.is_descending)


def ranking_table(query: CompareQuery, ranked: Sequence[Ranked], now_ms: int | None = None) -> Table:
    ranked = ranked[: query.top] if query.top else ranked
    metrics = [m for m in (query.metrics or HEADLINE_METRICS) if m != query.metric or query.agg != "last"]
    several = len({r.run.experiment for r in ranked}) > 1
    columns = ("rank", "run", "run_id", *(("experiment",) if several else ()), "status", "dataset",
               *query.params, query.metric_column, *metrics, "duration_s")
    now_ms = now_ms or int(time.time() * 1000)
    rows = tuple(
        (r.rank, r.run.name, r.run.run_id, *((r.run.experiment,) if several else ()), r.run.status,
         r.run.tags.get("dataset"), *(r.run.params.get(p) for p in query.params), r.value, *(r.run.metrics.get(m) for m in metrics),
         round(((r.run.end_time or now_ms) - r.run.start_time) / 1000, 1))
        for r in ranked
    )
    direction = "highest" if query.is_descending else "lowest"
    return Table(f"runs ranked by {query.metric_column}, {direction} first", columns, rows)


def curve_runs(query: CompareQuery, ranked: Sequence[Ranked]) -> list[Ranked]:
    """The runs an epoch table or plot shows: the top ones that have the metric."""
    return [r for r in ranked if r.rank is not None][: query.top or CURVE_RUNS]


def curves(query: CompareQuery, ranked: Sequence[Ranked], tracking_uri: str | None) -> dict[str, list[tuple[int, float]]]:
    """Per-epoch points of the metric for the curve runs, keyed by a unique run label."""
    runs = curve_runs(query, ranked)
    histories = tracking.metric_histories(tracking_uri, [r.run.run_id for r in runs], query.metric)
    return {label: histories[r.run.run_id] for label, r in zip(run_labels([r.run for r in runs]), runs)}


def run_labels(runs: Sequence[RunRecord]) -> list[str]:
    """Run names, with the id's start added where names repeat (several seeds of one config)."""
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.name] = counts.get(r.name, 0) + 1
    return [f"{r.name} ({r.run_id[:6]})" if counts[r.name] > 1 else r.name for r in runs]


def epoch_table(query: CompareQuery, points: dict[str, list[tuple[int, float]]]) -> Table:
    """The report's "Loss Rate Table" shape: one row per epoch, one column per run."""
    by_step = {label: dict(run_points) for label, run_points in points.items()}  # last value at a step wins
    rows = tuple((epoch, *(steps.get(epoch) for steps in by_step.values())) for epoch in query.epochs)
    return Table(f"{query.metric} per epoch", ("epoch", *by_step), rows)


@dataclass(frozen=True)
class Group:
    key: tuple[str | None, ...]
    runs: int
    mean: float | None
    std: float | None  # sample standard deviation; None below two values
    best: Ranked | None


def groups(query: CompareQuery, ranked: Sequence[Ranked]) -> list[Group]:
    """Runs that share the group-by params (e.g. seeds of one configuration), ranked by mean."""
    members: dict[tuple, list[Ranked]] = {}
    for r in ranked:
        members.setdefault(tuple(r.run.params.get(p) for p in query.group_by), []).append(r)
    out = []
    for key, rows in members.items():
        values = [r.value for r in rows if r.rank is not None]
        out.append(Group(
            key=key, runs=len(rows),
            mean=statistics.fmean(values) if values else None,
            std=statistics.stdev(values) if len(values) > 1 else None,
            best=min((r for r in rows if r.rank is not None), key=lambda r: r.rank, default=None),
        ))
    sign = -1 if query.is_descending else 1
    return sorted(out, key=lambda g: (g.mean is None, sign * g.mean if g.mean is not None else 0.0))


def group_table(query: CompareQuery, grouped: Sequence[Group]) -> Table:
    column = query.metric_column
    columns = ("rank", *query.group_by, "runs", f"mean {column}", f"std {column}", "best run", f"best {column}")
    rows = tuple(
        (i if g.mean is not None else None, *g.key, g.runs, g.mean, g.std,
         g.best.run.name if g.best else None, g.best.value if g.best else None)
        for i, g in enumerate(grouped, start=1)
    )
    return Table(f"{column} by {', '.join(query.group_by)}", columns, rows)


def group_epoch_table(query: CompareQuery, ranked: Sequence[Ranked], tracking_uri: str | None) -> Table:
    """The epoch table per configuration: one row per epoch, one column per group of runs
    (e.g. the seeds of one configuration) holding the mean of the metric at that epoch."""
    members: dict[tuple, list[str]] = {}
    for r in ranked:
        members.setdefault(tuple(r.run.params.get(p) for p in query.group_by), []).append(r.run.run_id)
    histories = tracking.metric_histories(tracking_uri, [i for ids in members.values() for i in ids], query.metric)
    columns, by_group = [], []
    for key, run_ids in members.items():
        columns.append("/".join(str(v) for v in key))
        steps = [dict(histories.get(run_id, [])) for run_id in run_ids]
        by_group.append({e: [s[e] for s in steps if e in s] for e in query.epochs})
    rows = tuple((e, *(statistics.fmean(g[e]) if g[e] else None for g in by_group)) for e in query.epochs)
    return Table(f"mean {query.metric} per epoch by {'/'.join(query.group_by)}", ("epoch", *columns), rows)


def compare(query: CompareQuery, tracking_uri: str | None) -> tuple[Table, list[Ranked]]:
    """The table the query asks for (ranking, epochs or groups) and the ranked runs behind it."""
    ranked = ranked_runs(query, tracking_uri)
    if query.epochs and query.group_by:
        return group_epoch_table(query, ranked, tracking_uri), ranked
    if query.epochs:
        return epoch_table(query, curves(query, ranked, tracking_uri)), ranked
    if query.group_by:
        return group_table(query, groups(query, ranked)), ranked
    return ranking_table(query, ranked), ranked
