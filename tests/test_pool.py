"""AdversarialPool: fills, then replaces random entries; its state round-trips exactly."""

from __future__ import annotations

import pickle

import pytest
import torch

from advtrain.pool import AdversarialPool


def test_fills_then_replaces_a_random_subset() -> None:
    pool = AdversarialPool(capacity=10, seed=0)
    assert pool.add(torch.zeros(6, 3), torch.zeros(6, dtype=torch.long)) == 0 and len(pool) == 6
    assert pool.add(torch.ones(6, 3), torch.ones(6, dtype=torch.long)) == 2 and len(pool) == 10
    assert int(pool.labels.sum()) == 6  # four free slots plus two overwritten zeros
    assert pool.add(torch.full((3, 3), 2.0), torch.full((3,), 2, dtype=torch.long)) == 3
    assert int((pool.labels == 2).sum()) == 3 and len(pool) == 10
    assert torch.equal(pool.examples[:, 0].long(), pool.labels)  # examples and labels stay paired


def test_sample_without_replacement_while_it_can() -> None:
    pool = AdversarialPool(capacity=8)
    pool.add(torch.arange(8.0)[:, None], torch.arange(8))
    examples, labels = pool.sample(8)
    assert sorted(labels.tolist()) == list(range(8)) and torch.equal(examples[:, 0].long(), labels)
    assert pool.sample(20)[0].shape == (20, 1)


def test_state_round_trip_gives_the_same_future() -> None:
    pool = AdversarialPool(capacity=5, seed=3)
    pool.add(torch.randn(7, 2, 2), torch.randint(0, 10, (7,)))
    restored = AdversarialPool(capacity=5)
    restored.load_state_dict(pickle.loads(pickle.dumps(pool.state_dict())))
    assert len(restored) == 5 and torch.equal(restored.examples, pool.examples)
    fresh = torch.randn(2, 2, 2), torch.tensor([1, 2])
    pool.add(*fresh)
    restored.add(*fresh)
    assert torch.equal(restored.examples, pool.examples) and torch.equal(restored.labels, pool.labels)
    assert torch.equal(restored.sample(3)[1], pool.sample(3)[1])


def test_empty_pool_state_round_trips() -> None:
    restored = AdversarialPool(capacity=4)
    restored.load_state_dict(AdversarialPool(capacity=4).state_dict())
    assert len(restored) == 0 and restored.examples is None


def test_misuse_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="capacity must be a positive integer, got 0"):
        AdversarialPool(capacity=0)
    pool = AdversarialPool(capacity=4)
    with pytest.raises(RuntimeError, match="the pool is empty"):
        pool.sample(1)
    pool.add(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"examples of shape \(4,\) do not fit a pool of \(3,\)"):
        pool.add(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="2 examples but 3 labels"):
        pool.add(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="a pool of capacity 4 cannot be loaded into one of 5"):
        AdversarialPool(capacity=5).load_state_dict(pool.state_dict())
