"""ResumableDistributedSampler: partition, resume mid-epoch, resume at another world size."""

from __future__ import annotations

import pytest

from beitdist.data.sampler import ResumableDistributedSampler


def consume(sampler: ResumableDistributedSampler, batches: int, batch_size: int) -> list[int]:
    """What a training loop receives: `batches` batches, then `advance` as the loader does."""
    got = list(sampler)[: batches * batch_size]
    for _ in range(batches):
        sampler.advance(batch_size)
    return got


def test_ranks_partition_the_epoch_and_epochs_differ():
    samplers = [ResumableDistributedSampler(103, r, 4, seed=1, shuffle=True, drop_last=True) for r in range(4)]
    parts = [list(s) for s in samplers]
    assert all(len(p) == len(s) == 25 for p, s in zip(parts, samplers))
    assert len(set().union(*parts)) == 100
    padded = [list(ResumableDistributedSampler(103, r, 4, seed=1, drop_last=False)) for r in range(4)]
    assert set().union(*padded) == set(range(103)) and all(len(p) == 26 for p in padded)
    before = list(samplers[0])
    samplers[0].set_epoch(1)
    assert list(samplers[0]) != before
    assert list(ResumableDistributedSampler(10, shuffle=False)) == list(range(10))


def test_resume_mid_epoch_gives_the_same_remaining_sequence():
    full = [ResumableDistributedSampler(50, r, 2, seed=7, shuffle=True) for r in range(2)]
    for s in full:
        s.set_epoch(3)
    reference = [list(s) for s in full]

    run = [ResumableDistributedSampler(50, r, 2, seed=7, shuffle=True) for r in range(2)]
    for s in run:
        s.set_epoch(3)
    seen = [consume(s, batches=3, batch_size=4) for s in run]
    state = run[0].state_dict()
    assert state == {"epoch": 3, "position": 24} == run[1].state_dict()

    resumed = [ResumableDistributedSampler(50, r, 2, seed=7, shuffle=True) for r in range(2)]
    for s in resumed:
        s.load_state_dict(state)
        s.set_epoch(3)  # the loop's usual call keeps the loaded position
    for r in range(2):
        assert seen[r] + list(resumed[r]) == reference[r]
    resumed[0].set_epoch(4)
    assert resumed[0].state_dict() == {"epoch": 4, "position": 0}


def test_world_size_change_2_to_1_covers_exactly_the_remaining_samples():
    run = [ResumableDistributedSampler(41, r, 2, seed=0, shuffle=True, drop_last=True) for r in range(2)]
    seen = [consume(s, batches=2, batch_size=5) for s in run]
    state = run[1].state_dict()
    assert state["position"] == 20

    single = ResumableDistributedSampler(41, 0, 1, seed=0, shuffle=True)
    single.load_state_dict(state)
    rest = list(single)
    consumed = set(seen[0]) | set(seen[1])
    assert len(consumed) == 20 and not consumed & set(rest)
    assert consumed | set(rest) == set(range(41))
    assert rest == list(single.order(0)[20:])  # same global order as the interrupted run


def test_world_size_change_1_to_3_splits_the_remainder():
    one = ResumableDistributedSampler(30, 0, 1, seed=2)
    consume(one, batches=1, batch_size=6)
    parts = []
    for r in range(3):
        s = ResumableDistributedSampler(30, r, 3, seed=2)
        s.load_state_dict(one.state_dict())
        parts.append(list(s))
    assert sorted(i for p in parts for i in p) == sorted(one.order()[6:].tolist())


def test_bad_arguments_and_states():
    with pytest.raises(ValueError, match="rank"):
        ResumableDistributedSampler(10, rank=2, world_size=2)
    with pytest.raises(ValueError, match="empty"):
        ResumableDistributedSampler(0)
    s = ResumableDistributedSampler(10)
    with pytest.raises(ValueError, match="missing"):
        s.load_state_dict({"epoch": 1})
    with pytest.raises(ValueError, match="outside"):
        s.load_state_dict({"epoch": 1, "position": 11})
