"""Figures a person would rather look at than read: training curves, val examples, test predictions."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from unet.data import read_grey


def _figure(figsize: tuple[float, float]):
    """A figure of its own, drawn to files only: Matplotlib's object API rather than pyplot, whose
    global figure list and backend switch are process state; so figures may be drawn in a thread
    while other work goes on (tasks/evaluate.py)."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def plot_history(history_csv: Path | str, out_png: Path | str) -> Path:
    """Loss and train/val IoU per epoch, with the best val epoch marked."""
    import pandas as pd  # here: the segmentation's preview (plot_segmentation) runs without pandas

    h = pd.read_csv(history_csv)
    fig = _figure((10, 3.6))
    ax1, ax2 = fig.subplots(1, 2)
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
    return Path(out_png)


def plot_examples(images: Sequence[Path], masks: Sequence[Path], cell_prob: np.ndarray,
                  out_png: Path | str, n: int = 3, threshold: float = 0.5) -> Path:
    """Rows of frame / ground truth / prediction / errors (red: missed membrane, blue: extra)."""
    n = min(n, len(images))
    fig = _figure((12, 3 * n))
    axes = fig.subplots(n, 4, squeeze=False)
    for row in range(n):
        frame = read_grey(images[row])
        truth = read_grey(masks[row]) > 127
        pred = cell_prob[row] >= threshold
        errors = np.zeros(truth.shape + (3,), np.float32) + 1.0
        errors[truth & ~pred] = (0.2, 0.4, 1.0)   # predicted membrane where there is cell: extra
        errors[~truth & pred] = (1.0, 0.2, 0.2)   # predicted cell where there is membrane: missed
        _show_row(axes[row], (frame, truth, pred, errors),
                  (Path(images[row]).name, "ground truth", "prediction", "errors"))
    return _save(fig, out_png)


def _show_row(axes, panels: Sequence[np.ndarray], titles: Sequence[str]) -> None:
    """One row of pictures: 2-D panels in grey from 0 (black) up, RGB panels as they are."""
    for ax, img, title in zip(axes, panels, titles):
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0 if img.ndim == 2 else None)
        ax.set_title(title, fontsize=9)
        ax.axis("off")


def _save(fig, out_png: Path | str) -> Path:
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
    return Path(out_png)


def plot_predictions(images: Sequence[Path], cell_prob: np.ndarray, out_png: Path | str, n: int = 3,
                     threshold: float = 0.5) -> Path:
    """Rows of frame / cell probability / cell instances (the thresholded map's components grown
    over the membrane, :func:`unet.segment.segment_cells`, in random colours): frames without
    ground truth, such as the test set."""
    from unet.segment import segment_cells

    n = min(n, len(images))
    rng = np.random.default_rng(0)
    fig = _figure((9, 3 * n))
    axes = fig.subplots(n, 3, squeeze=False)
    for row in range(n):
        cells = segment_cells(cell_prob[row], threshold, fill_membrane=True)
        colours = rng.uniform(0.25, 1.0, size=(int(cells.max()) + 1, 3))
        colours[0] = 0.0
        panels = (read_grey(images[row]), cell_prob[row], colours[cells])
        titles = (Path(images[row]).name, "cell probability", f"{int(cells.max())} cells (threshold {threshold})")
        _show_row(axes[row], panels, titles)
    return _save(fig, out_png)


def plot_segmentation(frames: Sequence[np.ndarray], cell_probs: Sequence[np.ndarray], cells: Sequence[np.ndarray],
                      titles: Sequence[str], out_png: Path | str, cell_counts: Sequence[int] | None = None) -> Path:
    """Rows of section / cell probability / cell instances over the section (random colours, the
    membrane dark): the segmentation flow's preview, from sections already subsampled to a
    viewable size. ``cell_counts``: the sections' cell counts (default: the ids shown)."""
    rng = np.random.default_rng(0)
    fig = _figure((10, 3.3 * len(frames)))
    axes = fig.subplots(len(frames), 3, squeeze=False)
    for row, (frame, prob, labels, title) in enumerate(zip(frames, cell_probs, cells, titles)):
        labels = np.asarray(labels)
        ids, inverse = np.unique(labels, return_inverse=True)  # colours for the ids shown only
        colours = rng.uniform(0.25, 1.0, size=(len(ids), 3))
        colours[ids == 0] = 0.0
        grey = np.repeat(frame[..., None] / 255.0, 3, axis=-1)
        blend = 0.55 * colours[inverse.reshape(labels.shape)] + 0.45 * grey
        count = cell_counts[row] if cell_counts is not None else int((ids > 0).sum())
        _show_row(axes[row], (frame, np.asarray(prob), blend), (title, "cell probability", f"{count} cells"))
    return _save(fig, out_png)
