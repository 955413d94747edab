"""The batch stream knows its position across epochs and resumes exactly; RNG states round-trip."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from medidiff.train.stream import BatchStream, capture_rng_state, restore_rng_state

from .conftest import EpochShuffled


def _ids(batches: list[dict]) -> list[int]:
    return [int(b["id"]) for b in batches]


def test_stream_runs_epochs_and_calls_set_epoch() -> None:
    data = EpochShuffled([{"id": i} for i in range(3)], seed=1)
    s = BatchStream(data)
    taken = [next(s) for _ in range(7)]
    assert s.position() == {"epoch": 2, "index": 1}
    assert data.set_epoch_calls == [0, 1, 2]
    # each epoch is a permutation of the data
    ids = _ids(taken)
    assert sorted(ids[:3]) == [0, 1, 2] and sorted(ids[3:6]) == [0, 1, 2]


def test_stream_resumes_at_position() -> None:
    batches = [{"id": i} for i in range(4)]
    full = BatchStream(EpochShuffled(batches, seed=3))
    ref = _ids([next(full) for _ in range(11)])
    first = BatchStream(EpochShuffled(batches, seed=3))
    head = [next(first) for _ in range(6)]
    resumed = BatchStream(EpochShuffled(batches, seed=3), **first.position())
    tail = [next(resumed) for _ in range(5)]
    assert _ids(head) + _ids(tail) == ref


def test_one_shot_iterator_and_empty_data_give_clear_errors() -> None:
    s = BatchStream(iter([{"id": 0}]))
    next(s)
    with pytest.raises(ValueError, match="re-iterable"):
        next(s)
    with pytest.raises(ValueError, match="no batches"):
        next(BatchStream([]))
    with pytest.raises(ValueError, match="data changed"):
        BatchStream([{"id": 0}], epoch=0, index=3)


def test_rng_state_round_trip() -> None:
    g = torch.Generator().manual_seed(5)
    torch.randn(3, generator=g)
    state = capture_rng_state({"train": g})
    expect = (torch.rand(4), np.random.rand(4), random.random(), torch.rand(2, generator=g))
    # disturb everything, then restore
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    g.manual_seed(99)
    restore_rng_state(state, {"train": g})
    got = (torch.rand(4), np.random.rand(4), random.random(), torch.rand(2, generator=g))
    assert torch.equal(got[0], expect[0])
    assert np.array_equal(got[1], expect[1])
    assert got[2] == expect[2]
    assert torch.equal(got[3], expect[3])
    # the state is plain JSON
    import json

    assert json.loads(json.dumps(state)) == state
    with pytest.raises(KeyError):
        restore_rng_state(state, {"other": torch.Generator()})
