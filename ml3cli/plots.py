"""Plots (matplotlib, headless). Returns PNG bytes; :mod:`ml3cli.artifacts` writes them atomically."""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ml3cli.evaluate import LossCurves  # noqa: E402


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def meta_test_plot(curves: Sequence[LossCurves], title: str, metric: str) -> bytes:
    """Mean over seeds (line) ± one standard deviation (band) of the metric against SGD steps, per loss."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for c in curves:
        per_seed = c.per_seed
        mean, std = per_seed.mean(axis=0), per_seed.std(axis=0)
        steps = np.arange(mean.size)
        (line,) = ax.plot(steps, mean, label=f"{c.label} (lr {c.lr:g})")
        ax.fill_between(steps, np.maximum(mean - std, 1e-12), mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("SGD steps on the test task")
    ax.set_ylabel(f"task {metric} (held-out points)")
    if all(np.all(c.per_seed > 0) for c in curves):
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _png(fig)


def meta_train_plot(curves: Sequence[dict[str, float]], title: str) -> bytes:
    """The task loss before and after the inner steps against outer steps."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    steps = [row["step"] for row in curves]
    ax.plot(steps, [row["meta/task_loss_before"] for row in curves], label="task loss at θ₀", alpha=0.7)
    ax.plot(steps, [row["meta/task_loss"] for row in curves], label="task loss after the inner steps")
    ax.set_xlabel("outer step")
    ax.set_ylabel("task loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _png(fig)
