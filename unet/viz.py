"""Figures a person would rather look at than read: training curves, val examples, test predictions."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from unet.data import read_grey


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_history(history_csv: Path | str, out_png: Path | str) -> Path:
    """Loss and train/val IoU per epoch, with the best val epoch marked."""
    plt = _pyplot()
    h = pd.read_csv(history_csv)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(h["epoch"], h["loss"], color="tab:red")
    ax1.set(xlabel="epoch", ylabel="training loss", title="Loss")
    ax2.plot(h["epoch"], h["train_iou"], label="train IoU (training batches)")
    ax2.plot(h["epoch"], h["val_iou"], label="val IoU (no TTA)")
    best = h.loc[h["val_iou"].idxmax()]
    ax2.axvline(best["epoch"], color="grey", ls=":", label=f"best val {best['val_iou']:.3f} (epoch {int(best['epoch'])})")
    ax2.set(xlabel="epoch", ylabel="IoU (cell class)", title="IoU per epoch")
    ax2.legend(loc="lower right", fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)


def plot_examples(images: Sequence[Path], masks: Sequence[Path], cell_prob: np.ndarray,
                  out_png: Path | str, n: int = 3, threshold: float = 0.5) -> Path:
    """Rows of frame / ground truth / prediction / errors (red: missed membrane, blue: extra)."""
    plt = _pyplot()
    n = min(n, len(images))
    fig, axes = plt.subplots(n, 4, figsize=(12, 3 * n), squeeze=False)
    for row in range(n):
        frame = read_grey(images[row])
        truth = read_grey(masks[row]) > 127
        pred = cell_prob[row] >= threshold
        errors = np.zeros(truth.shape + (3,), np.float32) + 1.0
        errors[truth & ~pred] = (0.2, 0.4, 1.0)   # predicted membrane where there is cell: extra
        errors[~truth & pred] = (1.0, 0.2, 0.2)   # predicted cell where there is membrane: missed
        _show_row(axes[row], (frame, truth, pred, errors),
                  (Path(images[row]).name, "ground truth", "prediction", "errors"))
    return _save(plt, fig, out_png)


def _show_row(axes, panels: Sequence[np.ndarray], titles: Sequence[str]) -> None:
    """One row of pictures: 2-D panels in grey from 0 (black) up, RGB panels as they are."""
    for ax, img, title in zip(axes, panels, titles):
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0 if img.ndim == 2 else None)
        ax.set_title(title, fontsize=9)
        ax.axis("off")


def _save(plt, fig, out_png: Path | str) -> Path:
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return Path(out_png)


def plot_predictions(images: Sequence[Path], cell_prob: np.ndarray, out_png: Path | str, n: int = 3,
                     threshold: float = 0.5) -> Path:
    """Rows of frame / cell probability / cell instances (the thresholded map's components grown
    over the membrane, :func:`unet.segment.segment_cells`, in random colours): frames without
    ground truth, such as the test set."""
    from unet.segment import segment_cells

    plt = _pyplot()
    n = min(n, len(images))
    rng = np.random.default_rng(0)
    fig, axes = plt.subplots(n, 3, figsize=(9, 3 * n), squeeze=False)
    for row in range(n):
        cells = segment_cells(cell_prob[row], threshold, fill_membrane=True)
        colours = rng.uniform(0.25, 1.0, size=(int(cells.max()) + 1, 3))
        colours[0] = 0.0
        panels = (read_grey(images[row]), cell_prob[row], colours[cells])
        titles = (Path(images[row]).name, "cell probability", f"{int(cells.max())} cells (threshold {threshold})")
        _show_row(axes[row], panels, titles)
    return _save(plt, fig, out_png)


def plot_segmentation(frames: Sequence[np.ndarray], cell_probs: Sequence[np.ndarray], cells: Sequence[np.ndarray],
                      titles: Sequence[str], out_png: Path | str, max_side: int = 768) -> Path:
    """Rows of section / cell probability / cell instances over the section (random colours, the
    membrane dark): the segmentation flow's preview. Sections larger than ``max_side`` are shown
    subsampled."""
    plt = _pyplot()
    rng = np.random.default_rng(0)
    fig, axes = plt.subplots(len(frames), 3, figsize=(10, 3.3 * len(frames)), squeeze=False)
    for row, (frame, prob, labels, title) in enumerate(zip(frames, cell_probs, cells, titles)):
        step = max(1, int(np.ceil(max(frame.shape) / max_side)))
        frame, prob, labels = frame[::step, ::step], np.asarray(prob)[::step, ::step], np.asarray(labels)[::step, ::step]
        colours = rng.uniform(0.25, 1.0, size=(int(labels.max()) + 1, 3))
        colours[0] = 0.0
        grey = np.repeat(frame[..., None] / 255.0, 3, axis=-1)
        blend = 0.55 * colours[labels] + 0.45 * grey
        n = len(np.unique(labels)) - (1 if (labels == 0).any() else 0)
        _show_row(axes[row], (frame, prob, blend),
                  (f"{title} ({frame.shape[0] * step} x {frame.shape[1] * step})", "cell probability",
                   f"{n} cells"))
    return _save(plt, fig, out_png)
