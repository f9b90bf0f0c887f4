"""The case's metric as MindSpore's ``Metric`` (``Model(..., metrics={"case": CaseMetrics()})`` and
training's per-epoch validation): :class:`unet.metrics.CaseScores` taking Tensors too. Kept apart
from :mod:`unet.metrics` so that scoring predictions never imports MindSpore."""
from __future__ import annotations

import numpy as np
from mindspore import Tensor
from mindspore.train import Metric, rearrange_inputs

from unet.metrics import CaseScores

__all__ = ["CaseMetrics"]


class CaseMetrics(Metric):
    """Per-image ``acc, iou, dice, sens, spec`` averaged over images (:class:`unet.metrics.CaseScores`);
    ``update(y_pred, y)`` takes Tensors or arrays, ``y_pred`` probabilities ``[N, 1, H, W]``."""

    def __init__(self, smooth: float = 1e-5) -> None:
        super().__init__()
        self.scores = CaseScores(smooth)
        self.smooth = smooth

    def clear(self) -> None:
        """Forget every image seen."""
        self.scores.clear()

    @rearrange_inputs
    def update(self, y_pred: Tensor | np.ndarray, y: Tensor | np.ndarray) -> None:
        """Add a batch: ``y_pred`` probabilities ``[N, 1, H, W]``, ``y`` binary mask of the same shape."""
        self.scores.update(_to_numpy(y_pred), _to_numpy(y))

    def eval(self) -> dict[str, float]:
        """Mean of each case score over the images seen; RuntimeError if there were none."""
        try:
            return self.scores.eval()
        except RuntimeError:
            raise RuntimeError("CaseMetrics.eval() called before any update(): no images to score") from None


def _to_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    return x.asnumpy() if isinstance(x, Tensor) else np.asarray(x)
