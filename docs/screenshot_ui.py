"""Screenshots of the MLflow UI for these docs, taken by a headless Chromium.

    python docs/screenshot_ui.py --backend-store-uri sqlite:///mlflow.db --experiment report-study

It serves the store with a real `mlflow server` on 127.0.0.1, opens the UI's run-comparison view
of the experiment's runs (those matching --filter), and writes docs/img/mlflow-ui-compare-runs.png. Needs a
Chromium on PATH (Debian/Ubuntu: `apt-get install chromium`). Not part of the package or tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

DOCS_IMG = Path(__file__).resolve().parent / "img"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(store: str, artifacts: str | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
               "--backend-store-uri", store, "--workers", "1"]
    if artifacts:
        command += ["--artifacts-destination", artifacts]
    # The job runner (8 worker processes) serves MLflow's GenAI jobs; a UI for screenshots needs none.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return server, url
        except OSError:
            time.sleep(0.3)
    os.killpg(server.pid, signal.SIGTERM)
    raise SystemExit(f"mlflow server on {store} did not answer /health within 120 s")


def screenshot(chromium: str, url: str, out: Path, width: int, height: int) -> None:
    # --virtual-time-budget lets the single-page app fetch and draw before the picture is taken.
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--window-size={width},{height}",
                        "--virtual-time-budget=20000", f"--screenshot={out}", url],
                       check=True, capture_output=True, timeout=180)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend-store-uri", required=True)
    parser.add_argument("--artifacts-destination")
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--filter", default="", help="MLflow search filter for the runs to compare")
    parser.add_argument("--out", type=Path, default=DOCS_IMG)
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        raise SystemExit("no Chromium on PATH: install one (apt-get install chromium)")

    from mlflow import MlflowClient

    client = MlflowClient(args.backend_store_uri)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        raise SystemExit(f"experiment {args.experiment!r} not found in {args.backend_store_uri}")
    runs = client.search_runs([experiment.experiment_id], args.filter, order_by=["attributes.start_time ASC"])
    run_ids = [r.info.run_id for r in runs]
    server, url = serve(args.backend_store_uri, args.artifacts_destination)
    try:
        query = urllib.parse.urlencode({"runs": json.dumps(run_ids), "experiments": json.dumps([experiment.experiment_id])})
        args.out.mkdir(parents=True, exist_ok=True)
        # Tall enough for the parallel-coordinates plot, the params and the metrics tables.
        screenshot(chromium, f"{url}/#/compare-runs?{query}", args.out / "mlflow-ui-compare-runs.png", 1600, 2050)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
