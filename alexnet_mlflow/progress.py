"""A rich progress display for the training loop (the loop sees only the `Progress` protocol)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class RichProgress:
    """Two bars, epochs and this epoch's batches, and one printed line per finished epoch."""

    def __init__(self, epochs: int, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.bars = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
            console=self.console,
        )
        self.epochs = self.bars.add_task("epoch", total=epochs, status="")
        self.batches = self.bars.add_task("batch", total=None, status="")

    def __enter__(self) -> "RichProgress":
        return self  # the bars appear with the first epoch, after data and server checks pass

    def __exit__(self, *exc) -> None:
        self.bars.stop()

    def start_epoch(self, epoch: int, batches: int) -> None:
        self.bars.start()  # no-op once started
        self.bars.reset(self.batches, total=batches, status="")

    def batch_done(self, loss: float | None) -> None:
        if loss is None:
            self.bars.advance(self.batches)
        else:
            self.bars.update(self.batches, advance=1, status=f"loss {loss:.4f}")

    def end_epoch(self, m) -> None:
        self.bars.advance(self.epochs)
        line = (f"epoch {m.epoch:>3} loss {m.train_loss:.4f}/{m.val_loss:.4f} "
                f"acc {m.train_acc:.3f}/{m.val_acc:.3f} (train/val) lr {m.lr:.0e} "
                f"{m.epoch_seconds:.0f}s {m.images_per_second:.0f} img/s")
        self.bars.update(self.epochs, status=f"val_loss {m.val_loss:.4f}  val_acc {m.val_acc:.3f}")
        self.bars.console.print(line, highlight=False)


class TrialProgress:
    """One bar for a sweep: trials ended out of the total, with counts by state."""

    def __init__(self, console: Console | None = None) -> None:
        self.bars = Progress(TextColumn("trials"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                             TextColumn("{task.fields[status]}"), console=console or Console(stderr=True))
        self.task = self.bars.add_task("trials", total=None, status="")

    def __enter__(self) -> "TrialProgress":
        self.bars.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bars.stop()

    def update(self, states: dict[str, int], total: int) -> None:
        ended = sum(n for state, n in states.items() if state in ("COMPLETE", "PRUNED", "FAIL"))
        status = " ".join(f"{state.lower()} {n}" for state, n in sorted(states.items()))
        self.bars.update(self.task, completed=ended, total=total, status=status)
