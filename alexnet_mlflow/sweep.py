"""Sweeps: many trainings as children of one MLflow run, scheduled through an Optuna study.

The study (in an Optuna storage: a sqlite file by default, any database URL for many machines) is
the shared to-do list. Every process that runs the same sweep opens the same study and takes
trials from it, so N local workers, or workers on several machines, never train one trial twice:

- grid (and presets): every configuration x seed is enqueued as a WAITING trial; `study.ask()`
  hands each WAITING trial to exactly one process (Optuna's storage makes that atomic). Optuna's
  own GridSampler is not used: its docs warn that it may run a grid point twice in distributed
  optimisation.
- random / tpe: each worker asks the sampler for a new trial while fewer than --n-trials exist.
- A rerun enqueues what is missing: FINISHED trials are kept, FAILED ones are retried.
- A RUNNING trial whose worker died (its pid is gone on this host, or its heartbeat is older
  than --stale-after on any host) is ended, its MLflow run marked KILLED, and it is enqueued again.

What a sweep trains (its search space) is space.py. This module imports neither torch, optuna
nor mlflow at import time (the CLI imports it for defaults); workers import them when they start.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from alexnet_mlflow import config as config_module
from alexnet_mlflow.compare import KEY_PARAMS, CompareQuery, Table
from alexnet_mlflow.errors import ConfigError, StopTraining, Terminated, UserError
from alexnet_mlflow.space import EPOCH_METRICS, REPORT_EPOCHS, SweepSpec, point_key

POLL_SECONDS = 1.0  # how often an idle worker or the progress display looks at the study


@dataclass(frozen=True)
class SweepOptions:
    """Where and how a sweep runs; not part of its identity."""

    experiment: str
    tracking_uri: str | None = None
    study: str | None = None  # default: sweep-<fingerprint>
    storage: str | None = None  # default: optuna.db beside the sqlite mlflow.db, or in this folder
    workers: int = 1
    stale_after: float = 120.0  # seconds without a heartbeat before another worker takes a trial over

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"workers={self.workers} is invalid: expected an integer >= 1")
        if self.stale_after <= 0:
            raise ConfigError(f"stale_after={self.stale_after} is invalid: expected seconds > 0")


@dataclass(frozen=True)
class SweepOutcome:
    study: str
    storage: str
    parent_run_id: str
    experiment: str
    trained: int  # trials this invocation's workers ran
    states: dict[str, int]  # COMPLETE, PRUNED, FAIL, ... over the sweep's trials
    best_run_id: str | None
    best_value: float | None
    missing: int  # trials that did not end COMPLETE or PRUNED: run the sweep again to retry them


def default_storage(tracking_uri: str | None) -> str:
    """A sqlite file beside a sqlite mlflow.db, else in this folder (one machine). Several
    machines share a database server instead: see docs/sweeps.md."""
    folder = Path.cwd()
    if tracking_uri and tracking_uri.startswith("sqlite:///"):
        folder = Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent
    return f"sqlite:///{folder / 'optuna.db'}"


# ---- the study --------------------------------------------------------------------------------

def open_study(spec: SweepSpec, options: SweepOptions):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = options.storage or default_storage(options.tracking_uri)
    name = options.study or f"sweep-{spec.fingerprint()[:10]}"
    # sqlite: wait for a lock instead of failing when workers write at the same moment.
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    except Exception as e:  # noqa: BLE001 (SQLAlchemy and optuna raise many kinds here)
        raise ConfigError(f"storage {url!r} cannot be opened ({str(e).splitlines()[0]}): pass a database "
                          "URL such as sqlite:///optuna.db or postgresql://user@host/db") from None
    pruner = (optuna.pruners.MedianPruner(spec.prune_startup_trials, spec.prune_warmup_epochs)
              if spec.prune else optuna.pruners.NopPruner())
    study = optuna.create_study(
        study_name=name, storage=storage, load_if_exists=True, sampler=_sampler(spec), pruner=pruner,
        direction="maximize" if spec.descending else "minimize",
    )
    spec_json = json.dumps(asdict(spec), sort_keys=True, default=str)
    stored = study.user_attrs.get("spec")
    if stored is None:
        study.set_user_attr("spec", spec_json)
    elif stored != spec_json:
        raise ConfigError(f"study {name!r} in {url} belongs to another sweep: pass the same options "
                          "as before, or a new --study name")
    return study


def _sampler(spec: SweepSpec):
    import optuna

    seed = spec.fixed.get("seed", config_module.defaults()["seed"])
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)  # grid trials are enqueued: no sampler runs


def distributions(spec: SweepSpec) -> dict[str, Any]:
    import optuna.distributions as d

    out: dict[str, Any] = {}
    if spec.sampler == "grid":
        for point in spec.points():
            for name, value in point.items():
                out.setdefault(name, []).append(value)
        return {name: d.CategoricalDistribution(list(dict.fromkeys(values))) for name, values in out.items()}
    for name, values in spec.choices.items():
        out[name] = d.CategoricalDistribution(list(values))
    kinds = {f.name: f.type for f in config_module.fields()}
    for name, r in spec.ranges.items():
        out[name] = (d.IntDistribution(int(r.low), int(r.high), log=r.log) if kinds[name] == "int"
                     else d.FloatDistribution(r.low, r.high, log=r.log))
    return out


def _skipped(trial) -> bool:
    return "skipped" in trial.user_attrs


def plan(study, spec: SweepSpec) -> int:
    """Enqueue what this invocation must train; returns how many trials the sweep lacks.
    Grid: every point without a COMPLETE, PRUNED, RUNNING or WAITING trial (so FAILED ones are
    retried). Random/tpe: a retry of every failed trial not yet retried."""
    from optuna.trial import TrialState

    trials = [t for t in study.get_trials(deepcopy=False) if not _skipped(t)]
    if spec.sampler == "grid":
        alive = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
        settled = {t.user_attrs.get("point") for t in trials if t.state in alive}
        missing = [p for p in spec.points() if point_key(p) not in settled]
        for point in missing:
            study.enqueue_trial(point, user_attrs={"point": point_key(point)})
        done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
        return len(spec.points()) - done
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for t in trials:
        if t.state == TrialState.FAIL and t.number not in retried:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
    return spec.n_trials - sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)


def counted_trials(trials) -> list:
    """The trials that make up the sweep: not skipped, and not a failure that was retried."""
    from optuna.trial import TrialState

    trials = [t for t in trials if not _skipped(t)]
    retried = {t.user_attrs.get("retry_of") for t in trials}
    retried_points = {t.user_attrs.get("point") for t in trials if t.state != TrialState.FAIL}
    return [t for t in trials if not (t.state == TrialState.FAIL and (
        t.number in retried or ("point" in t.user_attrs and t.user_attrs["point"] in retried_points)))]


def total_trials(spec: SweepSpec) -> int:
    return len(spec.points()) if spec.sampler == "grid" else spec.n_trials


# ---- workers ----------------------------------------------------------------------------------

def _alive_here(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def is_stale(trial, stale_after: float, now: float | None = None) -> bool:
    """A RUNNING trial nobody works on: its worker's pid is gone on this host, or its heartbeat
    is older than stale_after seconds (a worker on another machine that died)."""
    attrs = trial.user_attrs
    if attrs.get("host") == socket.gethostname() and "pid" in attrs and not _alive_here(attrs["pid"]):
        return True
    beat = attrs.get("heartbeat", trial.datetime_start.timestamp() if trial.datetime_start else None)
    return beat is not None and (now or time.time()) - beat > stale_after


def take_over_stale(study, spec: SweepSpec, options: SweepOptions) -> int:
    """End the trials of dead workers (their MLflow runs KILLED) and enqueue them again."""
    from optuna.trial import TrialState

    from alexnet_mlflow import tracking

    taken = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_stale(trial, options.stale_after):
            continue
        why = f"worker {trial.user_attrs.get('pid')} on {trial.user_attrs.get('host')} stopped"
        try:
            study.tell(trial.number, state=TrialState.FAIL)
        except (RuntimeError, ValueError):
            continue  # another worker took it over first
        if "mlflow_run_id" in trial.user_attrs:
            tracking.end_orphaned_run(options.tracking_uri, trial.user_attrs["mlflow_run_id"], {"sweep.orphaned": why})
        attrs = {"point": trial.user_attrs["point"]} if "point" in trial.user_attrs else {"retry_of": trial.number}
        params = json.loads(trial.user_attrs["point"]) if "point" in trial.user_attrs else trial.params
        study.enqueue_trial(params, user_attrs={**attrs, "takes_over": f"trial {trial.number}: {why}"})
        taken += 1
    return taken


def claim(study, spec: SweepSpec):
    """The next trial for this worker, or None when the sweep has nothing left to start."""
    from optuna.trial import TrialState

    while True:
        trials = study.get_trials(deepcopy=False)
        has_waiting = any(t.state == TrialState.WAITING for t in trials)
        if not has_waiting and (spec.sampler == "grid" or len(counted_trials(trials)) >= spec.n_trials):
            return None
        trial = study.ask()
        reason = _why_skip(study, spec, trial)
        if reason is None:
            trial.set_user_attr("host", socket.gethostname())
            trial.set_user_attr("pid", os.getpid())
            trial.set_user_attr("heartbeat", time.time())
            return trial
        # Another process got there first: this trial is void, and excluded from all counts.
        trial.set_user_attr("skipped", reason)
        study.tell(trial, state=TrialState.FAIL)


def _why_skip(study, spec: SweepSpec, trial) -> str | None:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    point = trial.user_attrs.get("point")
    if spec.sampler == "grid":
        if point is None:
            return "no grid point was waiting"
        earlier = [t for t in trials if t.number < trial.number and t.user_attrs.get("point") == point
                   and not _skipped(t) and t.state in (TrialState.COMPLETE, TrialState.PRUNED,
                                                       TrialState.RUNNING, TrialState.WAITING)]
        return f"duplicate of trial {earlier[0].number}" if earlier else None
    if "retry_of" in trial.user_attrs:
        return None
    before = [t for t in counted_trials(trials) if t.number <= trial.number]
    return "the sweep already has --n-trials trials" if len(before) > spec.n_trials else None


class TrialPruned(StopTraining):
    """Optuna's pruner stopped the trial: its run ends KILLED, tagged with the epoch."""


class Heartbeat:
    """Writes the time into the trial every interval, so other machines can tell it is alive."""

    def __init__(self, trial, interval: float) -> None:
        self.trial = trial
        self.interval = interval
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def __enter__(self) -> "Heartbeat":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join()

    def _beat(self) -> None:
        while not self.stopped.wait(self.interval):
            self.trial.set_user_attr("heartbeat", time.time())


def run_trial(study, trial, spec: SweepSpec, options: SweepOptions, parent_run_id: str) -> str:
    """Train one trial as a child MLflow run and tell Optuna how it went; returns its state."""
    from optuna.trial import TrialState

    from alexnet_mlflow import job

    params = {name: _suggest(trial, name, dist) for name, dist in distributions(spec).items()}
    config = spec.config_for(params)
    tags = {"sweep.study": study.study_name, "sweep.trial": str(trial.number)}

    def on_epoch(metrics) -> None:
        if not spec.prune:
            return
        trial.report(getattr(metrics, spec.metric), metrics.epoch)
        if trial.should_prune():
            raise TrialPruned(f"trial {trial.number} pruned at epoch {metrics.epoch}", "KILLED",
                               {"pruned": "true", "pruned_at_epoch": str(metrics.epoch)})

    name = config.run_name() + (f"-seed{config.seed}" if "seed" in params else "") + f"-t{trial.number}"
    with Heartbeat(trial, options.stale_after / 4):
        try:
            outcome = job.train_and_track(
                config, options.experiment, options.tracking_uri, name, parent_run_id=parent_run_id, tags=tags,
                on_start=lambda run_id: trial.set_user_attr("mlflow_run_id", run_id), on_epoch=on_epoch,
                checkpoints=False,  # a dead worker's trial is rerun from its start, not resumed
            )
        except TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
            return "PRUNED"
        except (KeyboardInterrupt, Terminated):
            study.tell(trial, state=TrialState.FAIL)
            raise
        except Exception as e:  # noqa: BLE001 (a failed trial is recorded, and retried by a rerun)
            trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:500])
            study.tell(trial, state=TrialState.FAIL)
            return "FAIL"
    study.tell(trial, trial_value(outcome.result, spec.metric))
    return "COMPLETE"


def _suggest(trial, name: str, distribution) -> Any:
    import optuna.distributions as d

    if isinstance(distribution, d.CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    if isinstance(distribution, d.IntDistribution):
        return trial.suggest_int(name, distribution.low, distribution.high, log=distribution.log)
    return trial.suggest_float(name, distribution.low, distribution.high, log=distribution.log)


def trial_value(result, metric: str) -> float:
    if metric in EPOCH_METRICS:
        return float(getattr(result.history[-1], metric))
    values = {"best_val_loss": result.best.val_loss, "best_val_acc": result.best.val_acc,
              "best_epoch": result.best.epoch, "test_loss": result.test_loss, "test_acc": result.test_acc}
    if values[metric] is None:
        raise UserError(f"metric {metric!r} was not logged: the data has no test split; use --metric val_loss")
    return float(values[metric])


def work(spec: SweepSpec, options: SweepOptions, parent_run_id: str, on_idle: Callable[[], None] = lambda: None) -> int:
    """One worker: take trials until none is left to start and none runs anywhere; returns how
    many it trained. Waiting for other workers' trials lets it take over those whose worker dies."""
    from optuna.trial import TrialState

    study = open_study(spec, options)
    trained = 0
    while True:
        trial = claim(study, spec)
        if trial is not None:
            run_trial(study, trial, spec, options, parent_run_id)
            trained += 1
            continue
        if take_over_stale(study, spec, options):
            continue
        if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            return trained
        on_idle()
        time.sleep(POLL_SECONDS)


def _worker_process(spec: SweepSpec, options: SweepOptions, parent_run_id: str, threads: int, queue) -> None:
    """Entry point of a spawned worker process."""
    os.environ.pop("MLFLOW_RUN_ID", None)  # the parent's `mlflow run` id: children are new runs
    try:
        import torch

        torch.set_num_threads(threads)  # N workers share the cores instead of oversubscribing them
        queue.put(work(spec, options, parent_run_id))
    except KeyboardInterrupt:
        raise SystemExit(130) from None


# ---- one sweep, end to end --------------------------------------------------------------------

def run_sweep(spec: SweepSpec, options: SweepOptions,
              on_progress: Callable[[dict[str, int], int], None] = lambda states, total: None,
              ) -> tuple[list[Table], SweepOutcome]:
    """Plan, start the workers, follow them, and close the parent run with the best trial.
    Returns the summary tables (ranking; for grids with seeds or presets, epochs and groups)."""
    import multiprocessing

    from alexnet_mlflow import tracking

    tracking.check_tracking_uri(options.tracking_uri)
    check_data(spec)
    study = open_study(spec, options)
    plan(study, spec)
    parent_run_id, experiment = tracking.open_sweep_parent(
        options.tracking_uri, options.experiment, study.user_attrs.get("mlflow_parent_run_id"),
        study.study_name,
        {"sweep.study": study.study_name, "sweep.storage": tracking.redact_uri(_storage_url(options)),
         "sweep.sampler": spec.sampler, "sweep.trials": str(total_trials(spec))},
    )
    study.set_user_attr("mlflow_parent_run_id", parent_run_id)
    options = replace(options, experiment=experiment)
    context = multiprocessing.get_context("spawn")  # fork after importing torch is unsafe
    queue = context.Queue()
    threads = max(1, (os.cpu_count() or 1) // options.workers)
    workers = [context.Process(target=_worker_process, args=(spec, options, parent_run_id, threads, queue))
               for _ in range(options.workers)]
    try:
        for w in workers:
            w.start()
        while any(w.is_alive() for w in workers):
            on_progress(state_counts(study), total_trials(spec))
            for w in workers:
                w.join(timeout=POLL_SECONDS / len(workers))
    except KeyboardInterrupt:
        for w in workers:  # they got the same Ctrl-C: each ends its run KILLED and exits
            w.join(timeout=60)
        tracking.close_sweep_parent(options.tracking_uri, parent_run_id, "KILLED", {}, 0,
                                    {"sweep.interrupted": "true"}, {})
        raise
    trained = 0
    while not queue.empty():
        trained += queue.get()
    return finish(study, spec, options, parent_run_id, trained, [w.exitcode for w in workers])


def check_data(spec: SweepSpec) -> None:
    """Load every dataset the sweep trains on once, here, before the study or any run exists: a
    missing or corrupt dataset is one error line, not one failed trial per point, and the workers
    then read the decode cache (<1 s) instead of all decoding the same images at once."""
    from alexnet_mlflow import data

    sources = {(c.dataset, c.data_dir, c.skip_bad_images) for c in spec.example_configs()}
    for dataset, data_dir, skip_bad_images in sorted(sources):
        if dataset != "synthetic":  # generated from the seed in each trial: nothing to check
            data.load_dataset(dataset, data_dir, seed=0, skip_bad_images=skip_bad_images)


def _storage_url(options: SweepOptions) -> str:
    return options.storage or default_storage(options.tracking_uri)


def state_counts(study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in counted_trials(study.get_trials(deepcopy=False)):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def finish(study, spec: SweepSpec, options: SweepOptions, parent_run_id: str, trained: int,
           exit_codes: list[int | None]) -> tuple[list[Table], SweepOutcome]:
    """Close the parent run with the best trial and the summary tables (also returned)."""
    from optuna.trial import TrialState

    from alexnet_mlflow import render, tracking

    trials = counted_trials(study.get_trials(deepcopy=False))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    done = complete + [t for t in trials if t.state == TrialState.PRUNED]
    missing = max(0, total_trials(spec) - len(done))
    best = (max if spec.descending else min)(complete, key=lambda t: t.value, default=None)
    metrics = {f"best_{spec.metric}": best.value} if best else {}
    tags = {"sweep.best_trial": str(best.number), "sweep.best_run_id": best.user_attrs.get("mlflow_run_id", "")} if best else {}
    if any(code not in (0, None) for code in exit_codes):
        tags["sweep.worker_exit_codes"] = ",".join(str(c) for c in exit_codes)
    status = "FINISHED" if missing == 0 else "FAILED"
    tables = summary_tables(spec, parent_run_id, options)
    texts = {f"summary/{i}-{t.title.split(',')[0].replace(' ', '_')}.md": render.to_markdown(t)
             for i, t in enumerate(tables, start=1)}
    tracking.close_sweep_parent(options.tracking_uri, parent_run_id, status, metrics, len(done), tags, texts)
    return tables, SweepOutcome(
        study=study.study_name, storage=tracking.redact_uri(_storage_url(options)), parent_run_id=parent_run_id,
        experiment=options.experiment, trained=trained, states=state_counts(study),
        best_run_id=best.user_attrs.get("mlflow_run_id") if best else None,
        best_value=best.value if best else None, missing=missing,
    )


def summary_tables(spec: SweepSpec, parent_run_id: str, options: SweepOptions) -> list[Table]:
    """The sweep's FINISHED children ranked by the metric; for a grid with configurations or
    seeds also the report-style epoch table and mean ± std over seeds, per configuration."""
    from alexnet_mlflow import compare

    swept = [p for p in spec.swept if p not in KEY_PARAMS]
    query = CompareQuery(metric=spec.metric, experiments=(options.experiment,), parent=parent_run_id,
                         params=KEY_PARAMS + tuple(swept))
    try:
        ranked = compare.ranked_runs(query, options.tracking_uri)
    except UserError:
        return []  # no child finished: the outcome line says what happened
    tables = [compare.ranking_table(query, ranked)]
    configuration = tuple(p for p in spec.swept if p != "seed")
    if spec.sampler == "grid" and configuration and (spec.seeds > 1 or spec.configurations):
        epochs = spec.fixed.get("epochs", config_module.defaults()["epochs"])
        grouped = replace(query, group_by=configuration, epochs=tuple(e for e in REPORT_EPOCHS if e <= epochs) or (epochs,))
        tables.append(compare.group_epoch_table(grouped, ranked, options.tracking_uri))
        tables.append(compare.group_table(replace(grouped, epochs=()), compare.groups(grouped, ranked)))
    return tables
