"""Plots (matplotlib, headless). Returns PNG bytes; :mod:`ml3cli.artifacts` writes them atomically.

The shared plumbing of every figure (:func:`png_bytes`), the figures of the commands (meta-train, meta-test,
landscapes) and the curves that several paper experiments draw alike (:func:`distance_curves`). A figure of one
paper experiment lives in its module of :mod:`ml3cli.experiments`. Importing this module selects matplotlib's
headless Agg backend.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ml3cli.evaluate import LossCurves  # noqa: E402


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes (120 dpi, tight bounding box); closes the figure."""
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
    return png_bytes(fig)


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
    return png_bytes(fig)


def distance_curves(curves: Mapping[str, np.ndarray], title: str) -> bytes:
    """Final distance against policy updates (paper, figures 3b–c and 6d); ``curves[label] = [seeds, updates + 1]``
    (mean over goals per seed), drawn as the mean over seeds with a band of ± one standard deviation."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, values in curves.items():
        steps = np.arange(values.shape[1])
        mean, std = values.mean(0), values.std(0)
        (line,) = ax.plot(steps, mean, label=label)
        ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("policy updates")
    ax.set_ylabel("final distance to the goal (real system)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return png_bytes(fig)


def stepped_with(comparison: Mapping) -> str:
    """How the optimizees of a comparison stepped, for labels: SGD, momentum or Adam (the optimizer its ``extra``
    records; plain SGD when none)."""
    recorded = (comparison.get("extra") or {}).get("optimizer")
    return {"momentum": "momentum", "adam": "Adam"}.get(recorded, "SGD")


def comparison_figure(comparisons: Sequence[Mapping], title: str) -> bytes:
    """One panel per comparison of ``ml3 reproduce`` (three to a row): the metric against the optimizees' steps for
    the baseline and the learned losses, each at the fixed and at its tuned rate; learned curves are the mean over
    meta-train seeds with a band of ± one standard deviation."""
    cols = min(len(comparisons), 3)
    rows = -(-len(comparisons) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.2 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat[len(comparisons) :]:
        ax.set_visible(False)
    for ax, comparison in zip(axes.flat, comparisons, strict=False):
        curves = comparison["curves"]
        steps = [int(s) for s in curves["baseline@fixed"]]
        for kind, style in (("fixed", "-"), ("tuned", "--")):
            base = curves[f"baseline@{kind}"]
            ax.plot(
                steps, [base[str(s)] for s in steps], style, color="C0", label=f"{comparison['baseline']} @ {kind} lr"
            )
            learned = np.array(
                [[curves[f"learned{m}@{kind}"][str(s)] for s in steps] for m in comparison["meta_seeds"]]
            )
            mean, std = learned.mean(0), learned.std(0)
            ax.plot(steps, mean, style, color="C1", label=f"learned @ {kind} lr ({len(learned)} meta-train seeds)")
            ax.fill_between(steps, mean - std, mean + std, color="C1", alpha=0.15)
        ax.set_xlabel(f"{stepped_with(comparison)} steps on held-out {comparison['task']} tasks")
        ax.set_ylabel(comparison["metric"])
        if all(v > 0 for c in curves.values() for v in c.values()):
            ax.set_yscale("log")
        # long labels ("…, reward input + online adaptation (recipe) against PPO") would run into the next panel
        ax.set_title(textwrap.fill(f"{comparison['label']}: {comparison['verdict']['verdict']}", 70), fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return png_bytes(fig)


# -- loss landscapes (ml3 landscape) --------------------------------------------------------------------------
def _normalised(values: np.ndarray) -> np.ndarray:
    low, high = float(np.min(values)), float(np.max(values))
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def landscape_1d_plot(
    values: np.ndarray,
    losses: dict[str, np.ndarray],
    targets: Sequence[float],
    param: str,
    fractions: dict[str, Sequence[float]],
    title: str,
) -> bytes:
    """One panel per task: each loss against one parameter, min–max normalised, the target as a red line."""
    n = len(targets)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False, layout="constrained")
    for k, target in enumerate(targets):
        ax = axes[k // cols][k % cols]
        for label, grid in losses.items():
            ax.plot(values, _normalised(grid[k]), label=f"{label} (slope→target {fractions[label][k]:.2f})")
        ax.axvline(target, color="red", linewidth=1.0)
        ax.set_title(f"target {target:.3g}", fontsize=9)
        ax.set_xlabel(param)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    for k in range(n, rows * cols):
        axes[k // cols][k % cols].axis("off")
    axes[0][0].set_ylabel("loss (min–max normalised)")
    fig.suptitle(title)
    return png_bytes(fig)


def landscape_2d_plot(
    alphas: np.ndarray,
    betas: np.ndarray,
    grids: dict[str, np.ndarray],
    target: tuple[float, float],
    fractions: dict[str, float],
    title: str,
) -> bytes:
    """One filled contour per loss over the plane (α along x, β along y), the target marked with a red x."""
    n = len(grids)
    fig, axes = plt.subplots(1, n, figsize=(4.4 * n, 3.8), squeeze=False, layout="constrained")
    for ax, (label, grid) in zip(axes[0], grids.items(), strict=True):
        contour = ax.contourf(alphas, betas, np.asarray(grid).T, levels=30, cmap="viridis")
        fig.colorbar(contour, ax=ax, shrink=0.85)
        ax.plot([target[0]], [target[1]], "rx", markersize=8)
        ax.set_title(f"{label} (slope→target {fractions[label]:.2f})", fontsize=9)
        ax.set_xlabel("α (direction 1)")
        ax.set_ylabel("β (direction 2)")
    fig.suptitle(title, fontsize=10)
    return png_bytes(fig)


def function_view_plot(
    a_values: np.ndarray,
    b_values: np.ndarray,
    grids: dict[str, np.ndarray],
    axes_names: tuple[str, str],
    fixed: dict[str, float],
    title: str,
) -> bytes:
    """Each loss's per-sample value over two of its inputs as a heatmap, side by side."""
    n = len(grids)
    fig, axes = plt.subplots(1, n, figsize=(4.4 * n, 3.8), squeeze=False, layout="constrained")
    extent = (float(a_values[0]), float(a_values[-1]), float(b_values[0]), float(b_values[-1]))
    for ax, (label, grid) in zip(axes[0], grids.items(), strict=True):
        image = ax.imshow(np.asarray(grid).T, origin="lower", extent=extent, aspect="auto", cmap="viridis")
        fig.colorbar(image, ax=ax, shrink=0.85)
        ax.plot(extent[:2], extent[2:], color="white", linewidth=0.6, alpha=0.6)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel(axes_names[0])
        ax.set_ylabel(axes_names[1])
    fixed_text = ", ".join(f"{k} = {v:g}" for k, v in fixed.items())
    fig.suptitle(title + (f" ({fixed_text})" if fixed_text else ""), fontsize=10)
    return png_bytes(fig)
