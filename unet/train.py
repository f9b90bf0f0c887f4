"""Training: BCE (or BCE + membrane Dice) on logits, Adam, per-epoch metrics on train and val,
``best.ckpt`` by val IoU, ``last.ckpt`` for resuming, and a per-epoch ``history.csv``.

The per-epoch train metrics score the epoch's training batches (augmented, as the case's train
callback saw them) from the logits of the training step itself, so they cost no second forward
pass; the val metrics run the network in inference mode on the val frames after the epoch (as
:func:`unet.data.eval_transforms` gives them: resized for the case, whole native frames for crop
recipes).

Output folder after ``train(...)``::

    best.ckpt      network weights of the epoch with the best val IoU (what inference loads)
    last.ckpt      network + optimizer state after the last finished epoch (for resuming)
    last.json      {"epoch": k, "best_epoch": ..., "best_val_iou": ...} written with last.ckpt
    history.csv    one row per epoch: loss, the case's five metrics on train and val, seconds
                   (``train_seconds``: the steps; ``eval_seconds``: the val pass)

Data-parallel (``group`` from :func:`unet.parallel.init_data_parallel`, ranks started by msrun):
each rank trains on its shard of every epoch's samples with the gradients averaged over the ranks
(effective batch ``size * batch_size``, ``ceil(steps / size)`` steps per epoch); the BatchNorm
running statistics are averaged after each epoch, evaluation is split between the ranks, and only
rank 0 writes the files above, which keep the single-process layout. Resuming reads ``last.ckpt``
on rank 0 and broadcasts it. The ranks' weights are checked to be identical at start and end.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import unet  # noqa: F401  (sets the oneDNN ISA cap before mindspore loads)

import mindspore as ms
import mindspore.nn as nn
import mindspore.ops as ops
import numpy as np
import pandas as pd

from unet.data import SegmentationSource, create_dataset, eval_transforms, train_transforms
from unet.evaluate import case_metrics
from unet.parallel import SINGLE, ProcessGroup, params_digest, shard_steps
from unet.case_metric import CaseMetrics
from unet.metrics import CASE_METRICS, case_scores
from unet.model import UNet
from unet.recipes import Recipe

log = logging.getLogger(__name__)

Pairs = Sequence[tuple[Path, Path]]
HISTORY_COLUMNS = (
    ["epoch", "loss"] + [f"train_{m}" for m in CASE_METRICS] + [f"val_{m}" for m in CASE_METRICS]
    + ["lr", "train_seconds", "eval_seconds", "seconds"]
)


@dataclass(frozen=True)
class TrainResult:
    best_checkpoint: Path
    last_checkpoint: Path
    history: Path
    best_epoch: int
    best_val_iou: float
    epochs_run: int  # epochs trained by this call (less than recipe.epochs after a resume)
    weights_sha256: str = ""  # params_digest of the network after training (identical on every rank)
    label_shift: tuple[float, float] = (0.0, 0.0)  # (dy, dx) the training labels were moved by


class MembraneDiceBCELoss(nn.Cell):
    """BCE with logits + (1 - soft Dice of the membrane class), membrane = 1 - cell probability.

    The membrane is the 22 % minority class whose thin lines decide the segmentation; BCE alone
    lets the network blur them. Dice = (2 sum(p t) + 1) / (sum(p) + sum(t) + 1) over the batch.
    With ``weighted``, the target is [N, 2, H, W] (the mask and its boundary weight map, see
    :func:`unet.data.boundary_weight_map`) and the BCE term is the weighted mean
    ``sum(w * bce) / sum(w)``; the Dice term is unweighted.
    """

    def __init__(self, weighted: bool = False) -> None:
        super().__init__()
        self.weighted = weighted
        self.bce = nn.BCEWithLogitsLoss(reduction="none" if weighted else "mean")

    def construct(self, logits, target):
        if self.weighted:
            weight = target[:, 1:2]
            target = target[:, 0:1]
            bce = (self.bce(logits, target) * weight).sum() / weight.sum()
        else:
            bce = self.bce(logits, target)
        membrane_p = 1.0 - ops.sigmoid(logits)
        membrane_t = 1.0 - target
        inter = (membrane_p * membrane_t).sum()
        dice = (2.0 * inter + 1.0) / (membrane_p.sum() + membrane_t.sum() + 1.0)
        return bce + (1.0 - dice)


def make_loss(recipe: Recipe) -> nn.Cell:
    if recipe.loss == "bce_dice":
        return MembraneDiceBCELoss(weighted=recipe.boundary_weight > 0)
    return nn.BCEWithLogitsLoss()


class LossAndLogits(nn.Cell):
    """``(loss, logits)`` of a batch: ``nn.WithLossCell`` that also hands out the logits."""

    def __init__(self, backbone: nn.Cell, loss_fn: nn.Cell) -> None:
        super().__init__(auto_prefix=False)
        self._backbone = backbone  # the name nn.WithLossCell uses: checkpoints keep their keys
        self._loss_fn = loss_fn

    def construct(self, image, mask):
        logits = self._backbone(image)
        return self._loss_fn(logits, mask), logits


class TrainStep(nn.TrainOneStepCell):
    """One optimizer step that returns ``(loss, logits)``, so that the training batches are scored
    from the forward pass the step computes anyway (no second pass over the training set).

    The gradient is the loss's alone (the logits output gets a zero sensitivity); gradients are
    all-reduced across data-parallel ranks exactly as in ``nn.TrainOneStepCell``.
    """

    def construct(self, image, mask):
        loss, logits = self.network(image, mask)
        sens = (ops.fill(loss.dtype, loss.shape, 1.0), ops.zeros_like(logits))
        grads = self.grad(self.network, self.weights)(image, mask, sens)
        grads = self.grad_reducer(grads)
        loss = ops.depend(loss, self.optimizer(grads))
        return loss, logits


def make_train_step(net: UNet, recipe: Recipe, optimizer: nn.Optimizer) -> TrainStep:
    """The training step of ``recipe``: its loss on ``net``'s logits, ``optimizer``'s update."""
    return TrainStep(LossAndLogits(net, make_loss(recipe)), optimizer)


def learning_rates(recipe: Recipe, steps_per_epoch: int) -> list[float] | float:
    """Per-step learning rates: constant (the case) or cosine decay to 1 % over all steps."""
    if recipe.lr_schedule == "constant":
        return recipe.learning_rate
    total = recipe.epochs * steps_per_epoch
    low = recipe.learning_rate * 0.01
    return [low + 0.5 * (recipe.learning_rate - low) * (1 + math.cos(math.pi * i / total)) for i in range(total)]


def evaluate_case_metrics(net: UNet, source: SegmentationSource, batch_size: int,
                          group: ProcessGroup = SINGLE) -> dict[str, float]:
    """The case's five metrics (per-image means) of ``net`` on ``source`` (no augmentation).
    With a data-parallel ``group`` each rank scores every ``size``-th image and all get the means."""
    if group.size > 1:
        return _evaluate_sharded(net, source, batch_size, group)
    net.set_train(False)
    return case_metrics(lambda images: ops.sigmoid(net(ms.Tensor(images))).asnumpy()[:, 0], source, batch_size)


def _evaluate_sharded(net: UNet, source: SegmentationSource, batch_size: int,
                      group: ProcessGroup) -> dict[str, float]:
    """Rank r scores images r, r + size, ...; the per-image scores are gathered exactly and averaged
    in image order, as :class:`CaseMetrics` does."""
    net.set_train(False)
    mine = list(range(group.rank, len(source), group.size))
    scores = np.zeros((math.ceil(len(source) / group.size), len(CASE_METRICS)))
    for start in range(0, len(mine), batch_size):
        batch = [source[i] for i in mine[start:start + batch_size]]
        probs = ops.sigmoid(net(ms.Tensor(np.stack([b[0] for b in batch])))).asnumpy().astype(np.float64)
        for j, (p, (_, t)) in enumerate(zip(probs, batch)):
            s = case_scores(np.round(p), t)
            scores[start + j] = [s[k] for k in CASE_METRICS]
    every = group.gather(scores)  # [size, rows, metrics]; image i is row i // size of rank i % size
    per_image = [every[i % group.size, i // group.size] for i in range(len(source))]
    sums = [0.0] * len(CASE_METRICS)
    for row in per_image:
        for k, v in enumerate(row):
            sums[k] += float(v)
    return {name: sums[k] / len(source) for k, name in enumerate(CASE_METRICS)}


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    # keep the suffix last: mindspore.save_checkpoint appends ".ckpt" to any other name
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


STATE_KEYS = ("epoch", "best_epoch", "best_val_iou")


def _save_last(out_dir: Path, train_cell: nn.Cell, state: dict) -> None:
    """last.ckpt (weights, optimizer and the training state, one atomic replace) then last.json
    (the same state, for people and tools). A kill between the two leaves a last.json one epoch
    behind: resuming trusts the state stored inside last.ckpt."""
    extra = {f"state_{k}": state[k] for k in STATE_KEYS}
    _write_atomic(out_dir / "last.ckpt", lambda p: ms.save_checkpoint(train_cell, str(p), append_dict=extra))
    _write_atomic(out_dir / "last.json", lambda p: p.write_text(json.dumps(state)))


def _resume_state(out_dir: Path, train_cell: nn.Cell) -> tuple[dict, list[dict]]:
    """Load last.ckpt into ``train_cell``; the state saved with it and the history rows up to its epoch."""
    params = ms.load_checkpoint(str(out_dir / "last.ckpt"))
    stored = {k: params.pop(f"state_{k}", None) for k in STATE_KEYS}
    if any(v is None for v in stored.values()):  # a checkpoint written before the state was stored in it
        state = json.loads((out_dir / "last.json").read_text())
    else:
        state = {"epoch": int(stored["epoch"].asnumpy()), "best_epoch": int(stored["best_epoch"].asnumpy()),
                 "best_val_iou": float(stored["best_val_iou"].asnumpy())}
    missing, _ = ms.load_param_into_net(train_cell, params)
    if missing:
        raise RuntimeError(f"{out_dir / 'last.ckpt'}: no value for {len(missing)} parameters of the "
                           f"training step, such as {missing[:3]}")
    rows: list[dict] = []
    if (out_dir / "history.csv").exists():
        rows = pd.read_csv(out_dir / "history.csv").to_dict("records")
    rows = [r for r in rows if int(r["epoch"]) <= state["epoch"]]
    return state, rows


def train(recipe: Recipe, train_pairs: Pairs, val_pairs: Pairs, out_dir: Path | str, *,
          resume: bool = True, on_epoch: Callable[[dict], None] | None = None,
          group: ProcessGroup = SINGLE) -> TrainResult:
    """Train a UNet by ``recipe`` on (image, mask) PNG pairs; write checkpoints and history to
    ``out_dir``. With ``resume`` and a ``last.json`` in ``out_dir``, continue after its epoch.
    ``on_epoch`` is called with each epoch's history row (for progress reporting). ``group``:
    the data-parallel ranks this process trains with (see the module docstring)."""
    out_dir = Path(out_dir)
    writer = group.rank == 0
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_seed(recipe.seed)

    steps = shard_steps(recipe.steps_per_epoch or max(1, len(train_pairs) // recipe.batch_size), group.size)
    boundary = (recipe.boundary_weight, recipe.boundary_sigma) if recipe.boundary_weight > 0 else None
    train_source = SegmentationSource(train_pairs, train_transforms(recipe), recipe.in_channels,
                                      length=steps * recipe.batch_size * group.size, seed=recipe.seed,
                                      boundary=boundary, register_labels=recipe.register_labels,
                                      sections=recipe.sections)
    if recipe.register_labels:
        log.info("training labels registered to their images: shifted by (%+.2f, %+.2f) px", *train_source.label_shift)
    eval_val = SegmentationSource(val_pairs, eval_transforms(recipe), recipe.in_channels, sections=recipe.sections)
    # unshuffled: the source permutes each epoch itself, seeded, so that a resume sees the same order
    dataset = create_dataset(train_source, recipe.batch_size, shuffle=False, num_workers=recipe.num_workers,
                             drop_remainder=True, seed=recipe.seed, num_shards=group.size, shard_id=group.rank)

    net = UNet(recipe.in_channels, recipe.base_channels)
    lrs = learning_rates(recipe, steps)
    optimizer = nn.Adam(net.trainable_params(), learning_rate=lrs, weight_decay=recipe.weight_decay)
    # in a data-parallel context this cell all-reduces the gradients (mean over the ranks)
    train_cell = make_train_step(net, recipe, optimizer)
    if group.size > 1:
        group.check_same(params_digest(net.get_parameters()), "initial weights")
    running_stats = [p for p in net.get_parameters() if not p.requires_grad]  # BatchNorm moving mean/var

    state = {"epoch": 0, "best_epoch": 0, "best_val_iou": -1.0}
    rows: list[dict] = []
    if writer and resume and (out_dir / "last.json").exists():
        state, rows = _resume_state(out_dir, train_cell)
        log.info("resuming from %s after epoch %d", out_dir / "last.ckpt", state["epoch"])
    if group.size > 1:  # only rank 0 reads the checkpoint: the others get its state and weights
        shared = group.gather(np.array([state["epoch"], state["best_epoch"], state["best_val_iou"]]))[0]
        state = {"epoch": int(shared[0]), "best_epoch": int(shared[1]), "best_val_iou": float(shared[2])}
        if state["epoch"] > 0:
            group.broadcast_params(train_cell.get_parameters())
    start_epoch = state["epoch"] + 1

    for epoch in range(start_epoch, recipe.epochs + 1):
        t0 = time.perf_counter()
        train_source.set_epoch(epoch)  # epoch e's order and augmentation, the same after a resume
        train_cell.set_train(True)
        losses, batch_metric = [], CaseMetrics()
        for img, msk in dataset.create_tuple_iterator(num_epochs=1):
            step_loss, logits = train_cell(img, msk)
            losses.append(float(step_loss.asnumpy()))
            # logit >= 0: probability >= 0.5; channel 0 of the mask is the cell mask (1: its weight map),
            # soft at the edges when the labels are registered
            batch_metric.update(logits.asnumpy() >= 0.0, msk.asnumpy()[:, :1] >= 0.5)
        train_m = batch_metric.eval()
        if group.size > 1:  # every rank scored as many batches: the mean of the ranks' means
            train_m = {k: group.mean(v) for k, v in train_m.items()}
        loss = float(np.mean(losses)) if group.size == 1 else group.mean(float(np.mean(losses)))
        group.average_params(running_stats)
        t1 = time.perf_counter()
        val_m = evaluate_case_metrics(net, eval_val, recipe.val_batch_size, group)
        t2 = time.perf_counter()
        lr = lrs if isinstance(lrs, float) else lrs[min(epoch * steps, len(lrs)) - 1]
        row = {"epoch": epoch, "loss": loss,
               **{f"train_{k}": v for k, v in train_m.items()},
               **{f"val_{k}": v for k, v in val_m.items()},
               "lr": lr, "train_seconds": t1 - t0, "eval_seconds": t2 - t1, "seconds": t2 - t0}
        rows.append(row)
        if val_m["iou"] > state["best_val_iou"]:  # the same on every rank: the metrics are gathered
            state.update(best_epoch=epoch, best_val_iou=val_m["iou"])
            if writer:
                _write_atomic(out_dir / "best.ckpt", lambda p: ms.save_checkpoint(net, str(p)))
        state["epoch"] = epoch
        if writer:
            _write_atomic(out_dir / "history.csv",
                          lambda p: pd.DataFrame(rows, columns=HISTORY_COLUMNS).to_csv(p, index=False))
            _save_last(out_dir, train_cell, state)
        log.info("epoch %d/%d loss %.4f train IoU %.4f val Acc %.4f IoU %.4f Dice %.4f (%.1f s + eval %.1f s)",
                 epoch, recipe.epochs, row["loss"], train_m["iou"], val_m["acc"], val_m["iou"],
                 val_m["dice"], t1 - t0, t2 - t1)
        if on_epoch is not None:
            on_epoch(row)

    digest = params_digest(net.get_parameters())
    group.check_same(digest, "weights after training")
    return TrainResult(out_dir / "best.ckpt", out_dir / "last.ckpt", out_dir / "history.csv",
                       int(state["best_epoch"]), float(state["best_val_iou"]),
                       recipe.epochs - start_epoch + 1, digest, train_source.label_shift)
