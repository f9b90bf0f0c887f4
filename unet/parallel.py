"""The ranks of a data-parallel training, seen from inside one rank (MindSpore on CPU).

:func:`init_data_parallel` joins the msrun job the process was started by
(``mindspore.communication.init`` and ``set_auto_parallel_context(parallel_mode=DATA_PARALLEL,
gradients_mean=True)``), after which the training step (an ``nn.TrainOneStepCell``) averages the
gradients of all ranks with an all-reduce. Every rank builds the network after the same
``mindspore.set_seed``, so the weights start and stay identical; :func:`unet.train.train` checks
that at the start and at the end. The group also carries what training needs besides the
gradients, all made of MindSpore's CPU all-reduce (sum, float32 only): averages (loss, BatchNorm
running statistics), an exact gather of float64 rows (per-image metrics; sent as 16-bit integer
pieces, which a sum with zeros keeps exact) and a broadcast of rank 0's parameters (others send
zeros; for resuming from a checkpoint only rank 0 has to read).

:data:`SINGLE` is the one-process group, where every collective is the identity. Starting the ranks
is :mod:`unet.distributed`'s job; this module only needs MindSpore, inside the functions that use it.
"""
from __future__ import annotations

import hashlib
import math
import os
from typing import Iterable

import numpy as np

_CHUNK = 1 << 24  # elements per all-reduce call


class ProcessGroup:
    """The ranks training together. This base class is the single process (rank 0 of 1), where
    every collective is the identity; :class:`DataParallelGroup` is the msrun one."""

    rank: int = 0
    size: int = 1

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"

    def sum(self, x: np.ndarray) -> np.ndarray:
        """Element-wise float32 sum of ``x`` over the ranks."""
        return np.asarray(x, dtype=np.float32)

    def mean(self, value: float) -> float:
        """The mean of a scalar over the ranks."""
        return float(self.sum(np.array([value], np.float32))[0]) / self.size

    def gather(self, values: np.ndarray) -> np.ndarray:
        """Every rank's float64 ``values`` (same shape on each rank), exactly: shape ``[size, *shape]``."""
        values = np.ascontiguousarray(values, dtype="<f8")
        if self.size == 1:
            return values[None].copy()
        pieces = np.zeros((self.size, values.size * 4), np.float32)  # a float64 is four 16-bit pieces
        pieces[self.rank] = np.frombuffer(values.tobytes(), "<u2")
        summed = self.sum(pieces)  # every piece is an integer < 2**16 plus zeros: exact in float32
        return np.frombuffer(summed.astype("<u2").tobytes(), "<f8").reshape(self.size, *values.shape).copy()

    def broadcast_params(self, params: Iterable) -> None:
        """Give every rank rank 0's values of ``params`` (mindspore Parameters, float or int)."""
        if self.size == 1:
            return
        params, arrays, flat = _flatten(params)
        if self.rank != 0:
            flat[:] = 0.0
        self._set(params, arrays, self.sum(flat))

    def average_params(self, params: Iterable) -> None:
        """Replace float ``params`` by their mean over the ranks (BatchNorm running statistics)."""
        if self.size == 1:
            return
        params, arrays, flat = _flatten(params)
        self._set(params, arrays, self.sum(flat) / self.size)

    def check_same(self, digest: str, what: str) -> None:
        """RuntimeError unless every rank has the same ``digest`` (a hex string) of ``what``."""
        if self.size == 1:
            return
        mine = np.frombuffer(bytes.fromhex(digest[:32]).ljust(16, b"\0"), "<f8")  # any bytes: gather is exact
        every = self.gather(mine)
        differ = [r for r in range(self.size) if every[r].tobytes() != every[0].tobytes()]
        if differ:
            raise RuntimeError(f"{what} differ between rank 0 and rank(s) {differ} "
                               "(every rank must call mindspore.set_seed with the same seed)")

    @staticmethod
    def _set(params: list, arrays: list[np.ndarray], flat: np.ndarray) -> None:
        import mindspore as ms

        offset = 0
        for p, a in zip(params, arrays):
            value = flat[offset:offset + a.size].reshape(a.shape)
            offset += a.size
            if np.issubdtype(a.dtype, np.integer):
                value = np.rint(value)
            p.set_data(ms.Tensor(value.astype(a.dtype)))


SINGLE = ProcessGroup()


class DataParallelGroup(ProcessGroup):
    """The ranks of an msrun job, after :func:`init_data_parallel`."""

    def __init__(self, rank: int, size: int) -> None:
        import mindspore.ops as ops

        self.rank, self.size = rank, size
        self._all_reduce = ops.AllReduce()  # MindSpore's CPU all-reduce: sum, float32/16 only

    def sum(self, x: np.ndarray) -> np.ndarray:
        import mindspore as ms

        x = np.ascontiguousarray(x, dtype=np.float32)
        flat = x.ravel()
        out = np.empty_like(flat)
        for start in range(0, flat.size, _CHUNK):  # bounded message size, at most two kernel shapes
            part = flat[start:start + _CHUNK]
            out[start:start + part.size] = self._all_reduce(ms.Tensor(part)).asnumpy()
        return out.reshape(x.shape)


def init_data_parallel() -> DataParallelGroup:
    """Join the msrun job this process was started by; gradients are then averaged over its ranks.

    msrun also runs the worker script as the job's scheduler: for that process ``init()`` runs the
    scheduler and exits when the job ends, so call this before anything else."""
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    if "MS_ROLE" not in os.environ:
        raise RuntimeError("init_data_parallel() must run in a process started by msrun (MS_ROLE is not set)")
    ms.set_context(mode=ms.GRAPH_MODE)
    init()
    ms.reset_auto_parallel_context()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    return DataParallelGroup(get_rank(), get_group_size())


def params_digest(params: Iterable) -> str:
    """sha256 over the names, shapes, dtypes and values of mindspore Parameters (sorted by name)."""
    h = hashlib.sha256()
    for p in sorted(params, key=lambda q: q.name):
        a = np.ascontiguousarray(p.asnumpy())
        h.update(f"{p.name}:{a.shape}:{a.dtype}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def shard_steps(steps: int, size: int) -> int:
    """Optimizer steps per epoch on each of ``size`` ranks for an epoch of ``steps`` single-process
    batches: the epoch's samples are split between the ranks, rounded up so every frame is seen."""
    return math.ceil(steps / size)


def _flatten(params: Iterable) -> tuple[list, list[np.ndarray], np.ndarray]:
    """The parameters, their values, and those values as one float32 vector (for one collective)."""
    params = list(params)
    arrays = [p.asnumpy() for p in params]
    flat = np.concatenate([a.astype(np.float32).ravel() for a in arrays]) if arrays else np.zeros(0, np.float32)
    return params, arrays, flat
