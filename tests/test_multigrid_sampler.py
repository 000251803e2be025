"""MultigridBatchSampler: sharding, shapes, determinism, resume, DDP equivalence, DataLoader."""
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from multigrid import ClipRequest, MultigridBatchSampler, MultigridPlan, sample_seed


def small_plan(batch_per_gpu=2, **kwargs):
    """T=8, S=32 Multigrid plan; phases 0-4, 4-6, 6-8, 8-9, 9-12 (batch factors 8, 4, 2, 1, 1)."""
    args = dict(frames=8, crop=32, rate=2, batch_per_gpu=batch_per_gpu, max_epoch=8,
                steps=[0, 4], base_lr=0.1, bn_base_size=batch_per_gpu)
    args.update(kwargs)
    return MultigridPlan(**args)


def epoch_batches(sampler, epoch, start_iteration=0):
    """All batches the sampler yields for `epoch` from `start_iteration`."""
    sampler.set_epoch(epoch, start_iteration)
    return list(sampler)


def test_small_plan_phases():
    plan = small_plan()
    assert [(p.start_epoch, p.end_epoch, p.batch_factor, p.frames, p.crop)
            for p in plan.phases] == [(0, 4, 8, 2, 23), (4, 6, 4, 4, 23), (6, 8, 2, 4, 32),
                                      (8, 9, 1, 8, 32), (9, 12, 1, 8, 32)]


@pytest.mark.parametrize("world_size, iterations, dropped", [(2, 10, 1), (3, 6, 17)])
def test_shards_cover_each_index_once_and_count_the_remainder(world_size, iterations, dropped):
    # Short cycle only, crop 32, 2 per GPU: batches 8, 4, 2 at crops 16, 23, 32 (14 per cycle).
    # 101 samples: W=2 -> 50 per rank = 3 cycles + 8, drops 1; W=3 -> 33 per rank = 2 cycles
    # (28; the next 8 does not fit), drops 101 - 84 = 17.
    plan = small_plan(long_cycle=False)
    samplers = [MultigridBatchSampler(101, plan, rank=r, world_size=world_size, seed=3)
                for r in range(world_size)]
    for epoch in (0, 5):
        per_rank = [epoch_batches(s, epoch) for s in samplers]
        assert [len(b) for b in per_rank] == [iterations] * world_size
        assert all(s.iterations_in_epoch(epoch) == iterations and len(s) == iterations
                   and s.dropped_in_epoch(epoch) == dropped for s in samplers)
        indices = [r.index for batches in per_rank for batch in batches for r in batch]
        assert len(indices) == len(set(indices)) == 101 - dropped
        assert set(indices) <= set(range(101))
        assert [len(b) for b in per_rank[0]] == ([8, 4, 2] * 4)[:iterations]


@pytest.mark.parametrize("world_size", [2, 3])
def test_long_cycle_shards_across_phases(world_size):
    plan = small_plan()
    samplers = [MultigridBatchSampler(500, plan, rank=r, world_size=world_size)
                for r in range(world_size)]
    for epoch in range(plan.max_epoch):
        batches = [epoch_batches(s, epoch) for s in samplers]
        indices = [r.index for rank in batches for batch in rank for r in batch]
        assert len(indices) == len(set(indices)) == 500 - samplers[0].dropped_in_epoch(epoch)
        assert len({len(rank) for rank in batches}) == 1
        phase = plan.phase(epoch)
        assert 0 <= samplers[0].dropped_in_epoch(epoch) < (500 % world_size
                                                           + world_size * phase.shapes[0][0])


def test_batches_follow_the_schedule_shape_by_shape():
    plan = small_plan()
    sampler = MultigridBatchSampler(300, plan, seed=1)
    seen = set()
    for epoch in range(plan.max_epoch):
        for iteration, batch in enumerate(epoch_batches(sampler, epoch)):
            size, frames, crop = plan.iteration_shape(epoch, iteration)
            max_rate = 2 * (8 // frames)
            assert len(batch) == size
            assert {(r.frames, r.crop, r.max_rate) for r in batch} == {(frames, crop, max_rate)}
            seen.add((size, frames, crop))
    # Phase 0 (8 x 2 per GPU at T=2, crop 23): 32 @ 16, 16 @ 23, 16 @ 23; fine-tune 8 / 4 / 2.
    assert {(32, 2, 16), (16, 2, 23), (8, 8, 16), (4, 8, 23), (2, 8, 32)} <= seen


def test_same_seed_and_epoch_give_same_batches_and_others_differ():
    plan = small_plan()
    first, second = (MultigridBatchSampler(300, plan, seed=7) for _ in range(2))
    assert epoch_batches(first, 2) == epoch_batches(second, 2) == epoch_batches(first, 2)
    other_epoch = epoch_batches(first, 3)
    other_seed = epoch_batches(MultigridBatchSampler(300, plan, seed=8), 2)
    assert [r.index for r in other_epoch[0]] != [r.index for r in epoch_batches(first, 2)[0]]
    assert [r.index for r in other_seed[0]] != [r.index for r in epoch_batches(first, 2)[0]]
    batch = epoch_batches(first, 2)[1]
    assert batch[0].seed == sample_seed(7, 2, 32)  # 1 process: 2nd batch starts at position 32
    assert len({r.seed for b in epoch_batches(first, 2) for r in b}) == 288


def test_resume_yields_exactly_the_remaining_batches():
    plan = small_plan()
    sampler = MultigridBatchSampler(300, plan, rank=1, world_size=2, seed=5)
    for epoch in (0, 9):
        full = epoch_batches(sampler, epoch)
        assert len(full) == {0: 6, 9: 31}[epoch]
        for k in (0, 1, 2, 3, 5, len(full) - 1, len(full)):
            sampler.set_epoch(epoch, k)
            assert len(sampler) == len(full) - k
            assert list(sampler) == full[k:]
        state = sampler.state_dict(4)
        fresh = MultigridBatchSampler(300, plan, rank=1, world_size=2, seed=5)
        fresh.load_state_dict(state)
        assert list(fresh) == full[4:]
    with pytest.raises(ValueError, match=r"start_iteration=99 is outside \[0, 6\]"):
        sampler.set_epoch(0, 99)
    with pytest.raises(ValueError, match="seed=5, this run has 6"):
        MultigridBatchSampler(300, plan, rank=1, world_size=2, seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size=2, this run has 1"):
        MultigridBatchSampler(300, plan, seed=5).load_state_dict(state)
    MultigridBatchSampler(300, plan, seed=5).load_state_dict(sampler.state_dict(0))


def test_iterator_is_bound_when_created():
    sampler = MultigridBatchSampler(300, small_plan(), seed=2)
    sampler.set_epoch(1)
    iterator = iter(sampler)
    sampler.set_epoch(10, 3)
    assert list(iterator) == epoch_batches(sampler, 1)


def splits(batch, count):
    """Interleaved SubBatchNorm splits: split j holds samples j, j + count, j + 2 count, ..."""
    return [batch[j::count] for j in range(count)]


@pytest.mark.parametrize("world_size", [2, 3])
def test_one_process_with_world_size_splits_matches_ddp_ranks(world_size):
    # 1 process, W x 2 per GPU, bn_base_size 2 (W x n splits) == W ranks x 2 per GPU (n splits):
    # split W*j + r of the single process holds exactly rank r's split j, same clips and seeds.
    single_plan, rank_plan = small_plan(batch_per_gpu=2 * world_size, bn_base_size=2), small_plan()
    single = MultigridBatchSampler(401, single_plan, seed=11)
    ranks = [MultigridBatchSampler(401, rank_plan, rank=r, world_size=world_size, seed=11)
             for r in range(world_size)]
    for epoch in (0, 5, 7, 10):
        phase = rank_plan.phase(epoch)
        assert single_plan.phase(epoch).bn_splits == world_size * phase.bn_splits
        one = epoch_batches(single, epoch)
        many = [epoch_batches(s, epoch) for s in ranks]
        assert all(len(m) == len(one) for m in many)
        for i, batch in enumerate(one):
            n = phase.bn_splits
            single_splits = splits(batch, world_size * n)
            for r in range(world_size):
                for j, split in enumerate(splits(many[r][i], n)):
                    assert single_splits[world_size * j + r] == split


def test_too_little_data_is_refused_before_training():
    with pytest.raises(ValueError, match=r"15 per process, fewer than the first batch \(32\) of "
                                         r"phase 0 \(epochs 0-4\)"):
        MultigridBatchSampler(31, small_plan(), rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        MultigridBatchSampler(100, small_plan(), rank=2, world_size=2)


class ClipShapes(Dataset):
    """Stand-in dataset that returns a uint8 clip of the requested shape and echoes the request."""

    def __getitem__(self, request):
        clip = torch.full((3, request.frames, request.crop, request.crop), request.index % 251,
                          dtype=torch.uint8)
        return clip, request.index, request.seed

    def __len__(self):
        return 120


def test_real_dataloader_with_two_workers_and_resume():
    plan = small_plan(long_cycle=False)  # batches 8, 4, 2 at crops 16, 23, 32, T=8
    sampler = MultigridBatchSampler(120, plan, seed=4)
    loader = DataLoader(ClipShapes(), batch_sampler=sampler, num_workers=2,
                        persistent_workers=True)
    for epoch, start in ((0, 0), (1, 0), (1, 5)):
        sampler.set_epoch(epoch, start)
        expected = list(sampler)
        assert len(loader) == len(expected) == sampler.iterations_in_epoch(epoch) - start
        got = list(loader)
        assert len(got) == len(expected)
        for iteration, ((clips, indices, seeds), requests) in enumerate(zip(got, expected),
                                                                        start):
            size, frames, crop = plan.iteration_shape(epoch, iteration)
            assert clips.shape == (size, 3, frames, crop, crop) and clips.dtype == torch.uint8
            assert indices.tolist() == [r.index for r in requests]
            assert seeds.tolist() == [r.seed for r in requests]
    assert isinstance(expected[0][0], ClipRequest)


def test_two_processes_drop_the_remainder_where_pyslowfast_pads():
    # 2 processes, 1007 videos, short cycle at 8 clips per GPU and crop 224: batches 32 / 16 / 8.
    plan = MultigridPlan(16, 224, 5, 8, 10, [0, 4], 0.1, long_cycle=False)
    assert plan.phases[0].shapes == ((32, 112), (16, 158), (8, 224))
    # PySlowFast's DistributedSampler pads 1007 to 1008 with a repeat: 504 per rank, which its
    # short-cycle batches (drop_last) use up in 504 / (32 + 16 + 8) = 9 cycles, 27 batches.
    padded = -(-1007 // 2)
    sizes, used = [], 0
    while used + (32, 16, 8)[len(sizes) % 3] <= padded:
        used += (32, 16, 8)[len(sizes) % 3]
        sizes.append((32, 16, 8)[len(sizes) % 3])
    assert (padded, len(sizes), used) == (504, 27, 504)
    # This sampler: 1007 // 2 = 503 per rank, 8 cycles (448) + 32 + 16 = 496 in 26 batches.
    samplers = [MultigridBatchSampler(1007, plan, rank=r, world_size=2) for r in range(2)]
    per_rank = [epoch_batches(s, 0) for s in samplers]
    assert [len(b) for b in per_rank] == [26, 26]
    assert [sum(len(batch) for batch in b) for b in per_rank] == [496, 496]
    assert samplers[0].per_rank == 503 and samplers[0].dropped_in_epoch(0) == 1007 - 2 * 496
    indices = [r.index for b in per_rank for batch in b for r in batch]
    assert len(indices) == len(set(indices)) == 992
