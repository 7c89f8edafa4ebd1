"""A run's tracking calls on local disk, delivered to the server in order, each exactly once.

MLflow's asynchronous logging drops metrics while the server is down, and its client retries for
minutes. Training instead appends every call (metrics with their steps and timestamps, tags,
artifact files, the final status) to `entries.jsonl`, fsynced, and delivers the pending ones
whenever it can; a cursor file records how many were delivered. A crash between a delivery and
its cursor update resends one entry: the server keeps one copy of a metric with the same key,
step, timestamp and value (MLflow's SqlAlchemyStore drops such duplicates); tags, artifacts and
the status overwrite themselves.

This module knows nothing of MLflow: `deliver` takes the function that sends one entry.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

RETRY_SECONDS = 2.0  # between delivery attempts while waiting for a server to come back


class Unreachable(Exception):
    """The server did not take an entry now; try again later."""


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "alexnet-mlflow"


def journal_root() -> Path:
    return cache_root() / "journal"


@dataclass
class Journal:
    folder: Path

    @classmethod
    def create(cls, run_id: str, tracking_uri: str | None) -> Journal:
        folder = journal_root() / run_id
        folder.mkdir(parents=True, exist_ok=True)
        meta = folder / "meta.json"
        if not meta.exists():
            # The URI only: credentials come from the environment when delivering, never from disk.
            meta.write_text(json.dumps({"run_id": run_id, "tracking_uri": tracking_uri}))
        return cls(folder)

    @classmethod
    def of_run(cls, run_id: str) -> Journal | None:
        """The run's journal, if training left one on this machine."""
        folder = journal_root() / run_id
        return cls(folder) if (folder / "meta.json").exists() else None

    @classmethod
    def all(cls) -> list[Journal]:
        root = journal_root()
        return [cls(p) for p in sorted(root.iterdir()) if (p / "meta.json").exists()] if root.exists() else []

    @property
    def run_id(self) -> str:
        return self.meta["run_id"]

    @property
    def meta(self) -> dict:
        return json.loads((self.folder / "meta.json").read_text())

    @property
    def files(self) -> Path:
        """Where artifacts written for this run wait until they are delivered."""
        path = self.folder / "files"
        path.mkdir(exist_ok=True)
        return path

    def append(self, kind: str, **payload) -> None:
        entry = {"kind": kind, "timestamp": int(time.time() * 1000), **payload}
        with open(self.folder / "entries.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())  # a SIGKILL right after must not lose it

    def entries(self) -> list[dict]:
        path = self.folder / "entries.jsonl"
        if not path.exists():
            return []
        lines = path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    @property
    def delivered(self) -> int:
        path = self.folder / "delivered"
        return int(path.read_text()) if path.exists() else 0

    def _set_delivered(self, n: int) -> None:
        tmp = self.folder / "delivered.tmp"
        tmp.write_text(str(n))
        tmp.replace(self.folder / "delivered")  # atomic: the cursor is never half-written

    def pending(self) -> int:
        return len(self.entries()) - self.delivered

    def deliver(self, send: Callable[[dict], None], timeout: float = 0.0) -> int:
        """Send the pending entries in order; on Unreachable retry until `timeout` seconds have
        passed (0: one attempt). Returns how many are still pending."""
        deadline = time.monotonic() + timeout
        while True:
            entries, done = self.entries(), self.delivered
            try:
                for i in range(done, len(entries)):
                    send(entries[i])
                    self._set_delivered(i + 1)
                return 0
            except Unreachable:
                if time.monotonic() + RETRY_SECONDS > deadline:
                    return self.pending()
                time.sleep(RETRY_SECONDS)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
