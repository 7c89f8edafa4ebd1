"""How fast `alexnet-mlflow compare` answers against a tracking server with many runs.

Fills a sqlite store with N runs of E epochs (every per-epoch and final metric the trainer logs),
serves it with a real `mlflow server` on 127.0.0.1, then times whole commands as a user types
them (process start included), the median of --repeat tries after one warm-up. Baselines in the same run: MLflow's
own `mlflow runs list` and `mlflow.search_runs()` into pandas.

    python bench/bench_compare.py                 # 1,000 runs x 50 epochs (the targets' size)
    python bench/bench_compare.py --runs 100      # quicker

Targets: compare < 3 s, --agg min < 10 s, --help < 1 s.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.progress import track
from rich.table import Table

PER_EPOCH = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds", "images_per_second")
FINAL = ("best_val_loss", "best_val_acc", "best_epoch", "test_loss", "test_acc")


def populate(uri: str, runs: int, epochs: int, seed: int = 0) -> str:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    from alexnet_mlflow.config import TrainConfig

    rng = random.Random(seed)
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("bench")
    now = int(time.time() * 1000)
    for i in track(range(runs), description=f"logging {runs} runs x {epochs} epochs"):
        config = TrainConfig(activation=rng.choice(["relu", "leaky_relu", "sigmoid"]),
                             lr=rng.choice([1e-3, 1e-4]), batch_size=rng.choice([64, 128, 256]), seed=i)
        run = client.create_run(experiment_id, start_time=now + i, run_name=config.run_name())
        floor = rng.uniform(0.1, 1.0)
        metrics = []
        for epoch in range(1, epochs + 1):
            loss = floor + 2.0 / epoch + rng.gauss(0, 0.02)
            values = dict(zip(PER_EPOCH, (loss, 1 - loss / 3, loss * 1.1, 1 - loss / 2.5, 1e-4, 300.0, 160.0)))
            metrics += [Metric(k, v, now + epoch, epoch) for k, v in values.items()]
        metrics += [Metric(k, rng.random(), now + epochs, epochs) for k in FINAL]
        params = [Param(k, v) for k, v in config.as_params().items()]
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1,000 metrics a batch
            client.log_batch(run.info.run_id, metrics=metrics[start:start + 1000],
                             params=params if start == 0 else [])
        client.set_terminated(run.info.run_id)
    return experiment_id


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db: Path, artifacts: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination", str(artifacts)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return process, url
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("mlflow server did not answer /health within 120 s")


def wait_until_idle(process: subprocess.Popen, timeout: float = 120) -> None:
    """After /health first answers, the server's workers go on starting for several seconds,
    using both cores; timings taken then measure the server's start, not compare."""
    import psutil

    tree = psutil.Process(process.pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        processes = [tree, *tree.children(recursive=True)]
        busy = sum(p.cpu_percent(interval=None) for p in processes)  # since the previous call
        time.sleep(1.0)
        busy = sum(p.cpu_percent(interval=None) for p in processes)
        if busy < 10:
            return
    raise SystemExit(f"mlflow server still busy after {timeout} s")


def timed(command: list[str], env: dict[str, str], repeat: int) -> tuple[float, str]:
    # One untimed try first: it warms the file cache and the server's workers, which are
    # still starting on a 2-core machine when /health first answers.
    subprocess.run(command, env=env, capture_output=True)
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        seconds.append(time.perf_counter() - start)
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr}")
    return statistics.median(seconds), result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--store", type=Path, help="keep the filled store in this folder and reuse it next time")
    args = parser.parse_args()

    folder = args.store or Path(tempfile.mkdtemp(prefix="bench-compare-"))
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / f"mlflow-{args.runs}x{args.epochs}.db"
    if db.exists():
        from mlflow import MlflowClient

        experiment_id = MlflowClient(f"sqlite:///{db}").get_experiment_by_name("bench").experiment_id
    else:
        experiment_id = populate(f"sqlite:///{db}", args.runs, args.epochs)
    server, url = start_server(db, folder / "artifacts")
    try:
        wait_until_idle(server)
        env = {**os.environ, "MLFLOW_TRACKING_URI": url, "MLFLOW_EXPERIMENT_NAME": "bench"}
        cli = [shutil.which("alexnet-mlflow") or "alexnet-mlflow"]
        search_pandas = ("import mlflow; df = mlflow.search_runs(experiment_names=['bench'], max_results=50000); "
                         "print(len(df))")
        cases = [
            ("alexnet-mlflow --help", cli + ["--help"], 1.0),
            ("alexnet-mlflow compare --help", cli + ["compare", "--help"], 1.0),
            ("compare --metric val_loss", cli + ["compare", "--metric", "val_loss", "--format", "csv"], 3.0),
            ("compare --metric val_loss --agg min", cli + ["compare", "--metric", "val_loss", "--agg", "min",
                                                          "--format", "csv"], 10.0),
            ("compare --group-by activation", cli + ["compare", "--group-by", "activation", "--format", "csv"], None),
            ("baseline: mlflow runs list", [sys.executable, "-m", "mlflow", "runs", "list",
                                            "--experiment-id", experiment_id], None),
            ("baseline: mlflow.search_runs -> pandas", [sys.executable, "-c", search_pandas], None),
        ]
        table = Table(title=f"compare against a local mlflow server: {args.runs:,} runs x {args.epochs} epochs "
                            f"(median of {args.repeat}, process start included)")
        for column in ("command", "seconds", "target", "ok"):
            table.add_column(column, justify="left" if column == "command" else "right")
        for name, command, target in cases:
            seconds, stdout = timed(command, env, args.repeat)
            if "compare --metric val_loss" in name:
                rows = len(stdout.splitlines()) - 1
                assert rows == args.runs, f"{name} listed {rows} runs, expected {args.runs}"
            ok = "" if target is None else "yes" if seconds < target else "NO"
            table.add_row(name, f"{seconds:.2f}", "" if target is None else f"< {target:g} s", ok)
        Console().print(table)
    finally:
        server.terminate()
        server.wait(timeout=30)
        if not args.store:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
