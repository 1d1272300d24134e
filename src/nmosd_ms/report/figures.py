"""Figures (matplotlib, Agg backend): learning curves (the paper's Fig. 4), ROC curves,
confusion matrices and per-subject predicted probabilities."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import confusion_matrix, roc_curve  # noqa: E402

from ..constants import POSITIVE, THRESHOLD
from ..io import atomic_path  # noqa: E402
from .tables import Run, subject_summary  # noqa: E402

COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def save_figure(fig, folder: Path, name: str) -> Path:
    """Write ``fig`` as ``name``.png and .svg in ``folder`` (atomically), then close it."""
    folder.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "svg"):
        with atomic_path(folder / f"{name}.{ext}", suffix=f".{ext}") as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight", format=ext)
    plt.close(fig)
    return folder / f"{name}.png"


def learning_curves(run: Run, folder: Path) -> Path | None:
    torch_models = [m for m in run.models if m in set(run.curves["model"])]
    if not torch_models:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for i, model in enumerate(torch_models):
        c = run.curves[run.curves["model"] == model]
        for ax, col in zip(axes, ("train_accuracy", "test_accuracy"), strict=True):
            g = c.dropna(subset=[col]).groupby("epoch")[col]
            mean, sd = g.mean(), g.std().fillna(0)
            ax.plot(mean.index, mean.values, color=COLORS[i % 10], label=model)
            ax.fill_between(mean.index, mean - sd, mean + sd, color=COLORS[i % 10], alpha=0.2)
    axes[0].set_title("training accuracy")
    axes[1].set_title("held-out accuracy (descriptive; never used to select epochs)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (mean ± SD over folds)")
    axes[1].legend(loc="lower right")
    return save_figure(fig, folder, "fig4_learning_curves")


def roc_curves(run: Run, folder: Path) -> Path:
    grid = np.linspace(0, 1, 101)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for i, model in enumerate(run.models):
        p = run.predictions[run.predictions["model"] == model]
        tprs = []
        for _, g in p.groupby("repeat"):
            y = (g["diagnosis"] == POSITIVE).astype(int)
            if y.nunique() < 2:
                continue
            fpr, tpr, _ = roc_curve(y, g["prob_nmosd"])
            tprs.append(np.interp(grid, fpr, tpr, left=0))
        if not tprs:
            continue
        t = np.array(tprs)
        mean, sd = t.mean(0), t.std(0)
        ax.plot(grid, mean, color=COLORS[i % 10], label=model)
        ax.fill_between(
            grid,
            np.clip(mean - sd, 0, 1),
            np.clip(mean + sd, 0, 1),
            color=COLORS[i % 10],
            alpha=0.15,
        )
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set_xlabel("1 − specificity (MS called NMOSD)")
    ax.set_ylabel("sensitivity (NMOSD recall)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return save_figure(fig, folder, "roc")


def confusion_panel(ax, cm: np.ndarray, xlabel: str, ylabel: str = "") -> None:
    """One 2×2 confusion matrix (rows true MS, NMOSD; columns as called) drawn on ``ax``, the
    count in each cell. The colour scale runs from 0 to the panel's largest count (not from its
    smallest: with imshow's own scaling the smallest cell is white whatever its count), and each
    count is written in black or white by the luminance of its own cell, so every count stays
    readable (white on the near-white of a small cell had hidden them)."""
    cm = np.asarray(cm, dtype=float)
    cmap = plt.get_cmap("Blues")
    norm = matplotlib.colors.Normalize(vmin=0, vmax=max(cm.max(), 1e-9))
    ax.imshow(cm, cmap=cmap, norm=norm)
    for (r, c), v in np.ndenumerate(cm):
        red, green, blue, _ = cmap(norm(v))
        dark = 0.2126 * red + 0.7152 * green + 0.0722 * blue < 0.5
        ax.text(
            c,
            r,
            f"{v:.0f}" if float(v).is_integer() else f"{v:.1f}",
            ha="center",
            va="center",
            color="white" if dark else "black",
        )
    ax.set_xticks([0, 1], ["MS", "NMOSD"])
    ax.set_yticks([0, 1], ["MS", "NMOSD"])
    ax.set_xlabel(xlabel)
    if ylabel:  # one "true" label for the row: on every panel it overlapped the next one's ticks
        ax.set_ylabel(ylabel)


def confusion_matrices(run: Run, folder: Path) -> Path:
    n = len(run.models)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.3), squeeze=False)
    for i, (ax, model) in enumerate(zip(axes[0], run.models, strict=True)):
        p = run.predictions[run.predictions["model"] == model]
        reps = max(p["repeat"].nunique(), 1)
        y = (p["diagnosis"] == POSITIVE).astype(int)
        cm = confusion_matrix(y, (p["prob_nmosd"] >= THRESHOLD).astype(int), labels=[0, 1]) / reps
        confusion_panel(ax, cm, "predicted", "true" if i == 0 else "")
        ax.set_title(model, fontsize=9)
    fig.tight_layout(w_pad=2.0)
    return save_figure(fig, folder, "confusion")


def subject_probabilities(run: Run, folder: Path) -> tuple[Path, pd.DataFrame]:
    s = subject_summary(run)
    n = len(run.models)
    fig, axes = plt.subplots(n, 1, figsize=(11, 2.2 * n), squeeze=False, sharex=False)
    for ax, model in zip(axes[:, 0], run.models, strict=True):
        d = s[s["model"] == model].sort_values(["diagnosis", "mean_prob_nmosd"])
        x = np.arange(len(d))
        colors = [COLORS[3] if dx == POSITIVE else COLORS[0] for dx in d["diagnosis"]]
        ax.bar(
            x,
            d["mean_prob_nmosd"],
            color=colors,
            yerr=d["sd_prob_nmosd"].fillna(0),
            error_kw={"lw": 0.5},
        )
        wrong = d["always_wrong"].to_numpy()
        ax.scatter(x[wrong], np.full(wrong.sum(), 1.05), marker="v", color="black", s=12)
        ax.axhline(THRESHOLD, color="grey", lw=0.8, ls="--")
        ax.set_ylim(0, 1.12)
        ax.set_xticks([])
        ax.set_ylabel("P(NMOSD)")
        ax.set_title(f"{model}: blue = MS, red = NMOSD; ▼ = wrong in every repeat", fontsize=9)
    return save_figure(fig, folder, "subjects"), s
