"""Reproducible training input: a resumable batch stream and RNG state capture.

Exact resume needs two things restored: where the data stream was, and every random generator.

- :class:`BatchStream` runs through epochs of any re-iterable of batches (a list, a DataLoader...)
  and counts its position ``(epoch, index)``. At the start of each epoch it calls ``set_epoch(epoch)``
  on the data (and on ``data.sampler``, as a ``DistributedSampler`` expects) when they have it, so
  shuffling can be a function of the seed and the epoch. To resume, a new stream replays the epoch
  up to the saved index: the data must yield the same batches for the same epoch (seed its
  shuffling and augmentation per epoch, e.g. with :func:`seed_worker` as a DataLoader's
  ``worker_init_fn`` and a seeded ``generator``).
- :func:`capture_rng_state` / :func:`restore_rng_state` turn the global torch, numpy and Python
  generators and named ``torch.Generator`` objects into JSON-friendly lists and back.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, cast

import numpy as np
import torch

__all__ = ["BatchStream", "capture_rng_state", "restore_rng_state", "seed_worker"]


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn`` for a DataLoader: seed numpy and ``random`` in each worker from torch's seed.

    Torch seeds each worker from the loader's generator; numpy and Python's ``random`` are not
    seeded by torch, so without this every worker (and every run) would draw differently.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Global torch (CPU and initialised CUDA), numpy and Python RNG states, plus named generators.

    Everything is plain lists and numbers, so it can be stored in JSON.
    """
    np_state = cast(tuple[Any, ...], np.random.get_state(legacy=True))  # legacy=True: the tuple form
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state().tolist(),
        "numpy": {
            "kind": np_state[0],
            "keys": np_state[1].tolist(),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
        "generators": {name: g.get_state().tolist() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _bytes(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8)


def restore_rng_state(
    state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None
) -> None:
    """Restore what :func:`capture_rng_state` returned (named generators by name).

    Raises:
        KeyError: a generator in ``generators`` has no saved state.
    """
    torch.set_rng_state(_bytes(state["torch"]))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        saved = state["cuda"]
        if len(saved) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([_bytes(s) for s in saved])
    saved_gens = state.get("generators", {})
    for name, g in (generators or {}).items():
        if name not in saved_gens:
            raise KeyError(f"no saved state for generator {name!r}")
        g.set_state(_bytes(saved_gens[name]))


def _set_epoch(data: object, epoch: int) -> None:
    for obj in (data, getattr(data, "sampler", None), getattr(data, "batch_sampler", None)):
        fn = getattr(obj, "set_epoch", None)
        if callable(fn):
            fn(epoch)


class BatchStream:
    """Endless iterator over ``data`` that knows its position ``(epoch, index)``.

    Args:
        data: a re-iterable of batches (list, DataLoader, ...). A one-shot iterator is accepted
            but ends the stream when it is exhausted.
        epoch, index: position to start from (``index`` batches of ``epoch`` are replayed and dropped).

    Raises:
        ValueError (while iterating): the data yields no batches, or a one-shot iterator ran out.
    """

    def __init__(self, data: Iterable[Any], *, epoch: int = 0, index: int = 0) -> None:
        if epoch < 0 or index < 0:
            raise ValueError(f"stream position must be non-negative; got epoch {epoch}, index {index}")
        self.data = data
        self.epoch = epoch
        self.index = 0
        self._one_shot = iter(data) is data
        self._it: Iterator[Any] = self._start_epoch()
        for _ in range(index):
            try:
                next(self._it)
            except StopIteration:
                raise ValueError(
                    f"cannot resume the data stream at epoch {epoch}, batch {index}: the epoch now has "
                    f"only {self.index} batches; the data changed since the checkpoint"
                ) from None
            self.index += 1

    def _start_epoch(self) -> Iterator[Any]:
        _set_epoch(self.data, self.epoch)
        self.index = 0
        return iter(self.data)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Any:
        try:
            batch = next(self._it)
        except StopIteration:
            if self._one_shot:
                raise ValueError(
                    f"the data iterator ran out after {self.index} batches; pass a re-iterable "
                    "(a list or a DataLoader) so training can run several epochs"
                ) from None
            if self.index == 0:
                raise ValueError("the training data yields no batches") from None
            self.epoch += 1
            self._it = self._start_epoch()
            try:
                batch = next(self._it)
            except StopIteration:
                raise ValueError(f"the training data yields no batches in epoch {self.epoch}") from None
        self.index += 1
        return batch

    def position(self) -> dict[str, int]:
        """``{"epoch": e, "index": i}``: ``i`` batches of epoch ``e`` have been taken."""
        return {"epoch": self.epoch, "index": self.index}
