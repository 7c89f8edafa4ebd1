"""Figures of a finished training: curves per epoch and the test confusion matrix (matplotlib)."""

from __future__ import annotations

from typing import Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _integer_epochs(*axes) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def curves_figure(history: Sequence, title: str):
    """Loss and accuracy, train and validation, against the epoch."""
    plt = _pyplot()
    epochs = [m.epoch for m in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, [m.train_loss for m in history], "o-", label="train")
    loss_ax.plot(epochs, [m.val_loss for m in history], "o-", label="validation")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    acc_ax.plot(epochs, [m.train_acc for m in history], "o-", label="train")
    acc_ax.plot(epochs, [m.val_acc for m in history], "o-", label="validation")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    _integer_epochs(loss_ax, acc_ax)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def confusion_figure(confusion, classes: Sequence[str], title: str):
    """Counts per (true, predicted) class pair, with each cell's count written in it."""
    plt = _pyplot()
    counts = confusion.tolist()
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    peak = max(max(row) for row in counts) or 1
    for i, row in enumerate(counts):
        for j, count in enumerate(row):
            ax.text(j, i, count, ha="center", va="center", fontsize=7,
                    color="white" if count > peak / 2 else "black")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def metric_curves_figure(curves: dict, metric: str):
    """One line per run: the metric against the epoch, labelled with the run's name."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    for label, points in curves.items():
        ax.plot([step for step, _ in points], [value for _, value in points], marker=".", label=label)
    ax.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch")
    _integer_epochs(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
