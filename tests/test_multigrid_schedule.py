"""Multigrid schedule, LR and BN-split arithmetic against PySlowFast's numbers and by hand."""
import math
import struct

import pytest

import multigrid
from multigrid import MultigridPlan, long_cycle_schedule, multigrid_lr_steps, scale_lr

STEPWISE = dict(steps=[0, 94, 154, 196], max_epoch=239, frames=32, crop=224)

# PySlowFast's stepwise multigrid config (SLOWFAST_8x8_R50_stepwise_multigrid: steps [0, 94, 154,
# 196], max epoch 239, T=32, S=224) as its long cycle schedules it: (step index, (b, T, S), end).
WORKED_SCHEDULE = [
    (0, (8, 8, 158), 73), (0, (4, 16, 158), 110), (0, (2, 16, 224), 142), (0, (1, 32, 224), 158),
    (1, (8, 8, 158), 205), (1, (4, 16, 158), 228), (1, (2, 16, 224), 248), (1, (1, 32, 224), 259),
    (2, (8, 8, 158), 291), (2, (4, 16, 158), 308), (2, (2, 16, 224), 322), (2, (1, 32, 224), 329),
    (3, (1, 32, 224), 358)]
WORKED_STEPS = [0, 73, 110, 142, 158, 205, 228, 248, 259, 291, 308, 322, 329, 343]
WORKED_LRS = [8, 4, 2, 1, 0.8, 0.4, 0.2, 0.1, 0.08, 0.04, 0.02, 0.01, 0.01, 0.001]


def stepwise_plan(**kwargs):
    """PySlowFast's stepwise multigrid config: T=32, S=224, rate 2, 8 clips per GPU, LR 0.1."""
    args = dict(frames=32, crop=224, rate=2, batch_per_gpu=8, max_epoch=239,
                steps=[0, 94, 154, 196], base_lr=0.1)
    args.update(kwargs)
    return MultigridPlan(**args)


def test_worked_example_schedule_and_lr_steps_exactly():
    schedule = long_cycle_schedule(**STEPWISE)
    assert schedule == WORKED_SCHEDULE
    assert all(type(v) is int for _, shape, end in schedule for v in (*shape, end))
    steps, lrs, max_epoch = multigrid_lr_steps(schedule)
    assert steps == WORKED_STEPS and max_epoch == 358
    # PySlowFast computes gamma ** step_index * batch_factor, so e.g. 0.1 ** 2 * 8 != 0.08.
    assert lrs == [0.1 ** s * b for s, (b, _, _), _ in schedule[:-1]] + [0.1 ** 2 * 1, 0.1 ** 3 * 1]
    assert lrs == pytest.approx(WORKED_LRS, rel=1e-12, abs=0)


def test_worked_example_plan_phases_lr_and_bn_splits():
    plan = stepwise_plan(warmup_epochs=34.0, warmup_start_lr=0.01)
    assert plan.max_epoch == 358 and plan.steps == WORKED_STEPS
    assert [(p.step_index, (p.batch_factor, p.frames, p.crop), p.end_epoch)
            for p in plan.phases] == WORKED_SCHEDULE
    assert [p.start_epoch for p in plan.phases] == [0] + [e for _, _, e in WORKED_SCHEDULE[:-1]]
    # Per-GPU batch 8 x batch factor, BN splits = that / 8; sampling rate up to 2 x (32 // T').
    assert [p.per_gpu_batch for p in plan.phases] == [64, 32, 16, 8] * 3 + [8]
    assert [p.bn_splits for p in plan.phases] == [8, 4, 2, 1] * 3 + [1]
    assert [p.max_rate for p in plan.phases] == [8, 4, 4, 2] * 3 + [2]
    # Short cycle at crop 158: round((158/112)^2) = 2, round((158/158.39)^2) = 1.
    assert plan.phases[0].shapes == ((128, 112), (64, 158), (64, 158))
    assert plan.phases[2].shapes == ((64, 112), (32, 158), (16, 224))
    # Warm-up (PySlowFast): linear from 0.01 to the policy's LR at epoch 34, 0.1 x 8.
    assert plan.lr_at(0.0) == 0.01
    assert plan.lr_at(17.0) == pytest.approx(0.01 + 17 * (0.8 - 0.01) / 34, rel=1e-12)
    assert plan.lr_at(34.0) == pytest.approx(0.8, rel=1e-12)
    expected = {72.99: 0.8, 73.0: 0.4, 157.5: 0.1, 158.0: 0.08, 328.9: 0.001, 329.0: 0.001,
                342.99: 0.001, 343.0: 0.0001, 358.0: 0.0001}
    assert {e: plan.lr_at(e) for e in expected} == pytest.approx(expected, rel=1e-12)
    assert plan.phase(72).index == 0 and plan.phase(73).index == 1 and plan.phase(400).index == 12
    with pytest.raises(ValueError, match="outside"):
        plan.lr_at(358.5)


def test_short_cycle_only_scales_steps_and_max_epoch():
    plan = stepwise_plan(batch_per_gpu=16, long_cycle=False)
    # PySlowFast: int(step * 1.5), int(239 * 1.5) = int(358.5).
    assert plan.steps == [0, 141, 231, 294] and plan.max_epoch == 358
    assert plan.relative_lrs == [1, 0.1, 0.1 ** 2, 0.1 ** 3]
    assert [(p.start_epoch, p.end_epoch) for p in plan.phases] == [(0, 141), (141, 231),
                                                                    (231, 294), (294, 358)]
    # PySlowFast's short cycle at crop 224 and batch 16: round((224 / (f x 224))^2) x 16 clips at
    # crop round(f x 224) for f = 0.5, 0.707, then the base: 64 / 32 / 16 at 112 / 158 / 224.
    assert all(p.shapes == ((64, 112), (32, 158), (16, 224)) for p in plan.phases)
    assert all(p.bn_splits == 1 and p.frames == 32 and p.max_rate == 2 for p in plan.phases)
    assert [plan.iteration_shape(5, i) for i in range(4)] == [
        (64, 32, 112), (32, 32, 158), (16, 32, 224), (64, 32, 112)]
    assert plan.lr_at(140.99) == 0.1 and plan.lr_at(141) == pytest.approx(0.01)


def test_plain_training_keeps_shape_epochs_and_lr_policy():
    plan = stepwise_plan(batch_per_gpu=12, long_cycle=False, short_cycle=False)
    assert plan.max_epoch == 239 and plan.steps == [0, 94, 154, 196]
    assert all(p.shapes == ((12, 224),) and p.bn_splits == 1 for p in plan.phases)
    assert {plan.iteration_shape(e, i) for e in (0, 100, 238) for i in range(5)} == {(12, 32, 224)}
    assert plan.lr_at(93.9) == 0.1 and plan.lr_at(200) == pytest.approx(1e-4)
    cosine = stepwise_plan(long_cycle=False, short_cycle=False, lr_policy="cosine", steps=None,
                           max_epoch=300)
    assert len(cosine.phases) == 1 and cosine.max_epoch == 300
    assert cosine.lr_at(150) == pytest.approx(0.05) and cosine.lr_at(300) == pytest.approx(0.0)


def test_other_t_s_three_steps_by_hand():
    # X3D-S shape T=13, S=160, steps [0, 40, 70], max 100. By hand: long-cycle (T', S') =
    # (3, 113), (6, 113) [round(6.5) = 6, Python's and PySlowFast's], (6, 160), (13, 160).
    # Batch factors of (short0 S*0.5=80, short1 S*0.707=113.14, base):
    # 13*160^2 = 332800 over T'*S^2: (17, 9, 9), (9, 4, 4), (9, 4, 2), (4, 2, 1);
    # averages 35/3, 17/3, 15/3, 7/3, sum 74/3. Cumulative unscaled epochs: 1400/74, 2080/74,
    # 2680/74, 40, 4010/74, 4520/74, 4970/74, 70; iterations 840/74, saving 70 / that = 37/6;
    # fine-tune 30 / (37/6) * 7/3 = 420/37. Scale 150 / (70 + 420/37) = 1.84385; rounded
    # running ends 34.88, 51.83, 66.78, 73.75, 99.92, 112.62, 123.84, 129.07, 150.
    schedule = long_cycle_schedule([0, 40, 70], 100, 13, 160)
    assert schedule == [
        (0, (9, 3, 113), 35), (0, (4, 6, 113), 52), (0, (2, 6, 160), 67), (0, (1, 13, 160), 74),
        (1, (9, 3, 113), 100), (1, (4, 6, 113), 113), (1, (2, 6, 160), 124),
        (1, (1, 13, 160), 129), (2, (1, 13, 160), 150)]
    steps, lrs, max_epoch = multigrid_lr_steps(schedule)
    assert steps == [0, 35, 52, 67, 74, 100, 113, 124, 129, 139] and max_epoch == 150
    assert lrs == pytest.approx([9, 4, 2, 1, 0.9, 0.4, 0.2, 0.1, 0.1, 0.01], rel=1e-12)


def test_long_cycle_without_short_cycle_by_hand():
    # PySlowFast raises IndexError here. T=8, S=112, steps [0, 30, 50, 60], max 80. Shapes
    # (2, 79), (4, 79), (4, 112), (8, 112) with factors round(100352 / (T'*S'^2)) = 8, 4, 2, 1
    # (averages of one shape each, sum 15). Iterations 4 * 60 / 15 = 16, saving 60 / 16 = 3.75,
    # fine-tune 20 / 3.75 * 1 = 16/3; scale 120 / (60 + 16/3) = 1.83673; unscaled running ends
    # 16, 24, 28, 30, 40.67, 46, 48.67, 50, 55.33, 58, 59.33, 60, 65.33.
    schedule = long_cycle_schedule([0, 30, 50, 60], 80, 8, 112, short_cycle=False)
    ends = [29, 44, 51, 55, 75, 84, 89, 92, 102, 107, 109, 110, 120]
    shapes = [(8, 2, 79), (4, 4, 79), (2, 4, 112), (1, 8, 112)] * 3 + [(1, 8, 112)]
    assert schedule == [(i // 4, s, e) for i, (s, e) in enumerate(zip(shapes, ends))]
    plan = MultigridPlan(8, 112, 4, 8, 80, [0, 30, 50, 60], 0.2, short_cycle=False)
    assert plan.max_epoch == 120
    assert plan.steps == [0] + ends[:-1] + [115]
    assert [p.shapes for p in plan.phases[:4]] == [((64, 79),), ((32, 79),), ((16, 112),),
                                                     ((8, 112),)]
    assert [p.max_rate for p in plan.phases[:4]] == [16, 8, 8, 4]


def test_constant_batch_keeps_the_long_cycle_phases_at_the_base_batch_and_lr():
    """The small-data variant: PySlowFast's phases, shapes, epochs and rates, every phase at the base
    per-GPU batch (plain BN), the LR of each step the constant-shape run's (no batch factor)."""
    args = (8, 112, 4, 8, 80, [0, 30, 50, 60], 0.2)
    scaled = MultigridPlan(*args, short_cycle=False)
    plan = MultigridPlan(*args, short_cycle=False, constant_batch=True)
    keep = lambda p: (p.index, p.step_index, p.frames, p.crop, p.start_epoch, p.end_epoch, p.max_rate)  # noqa: E731
    assert [keep(p) for p in plan.phases] == [keep(p) for p in scaled.phases]
    assert [(p.batch_factor, p.per_gpu_batch, p.bn_splits, p.shapes) for p in plan.phases[:4]] == [
        (1, 8, 1, ((8, 79),)), (1, 8, 1, ((8, 79),)), (1, 8, 1, ((8, 112),)), (1, 8, 1, ((8, 112),))]
    assert plan.steps == scaled.steps and plan.max_epoch == scaled.max_epoch == 120
    # PySlowFast's split of the fine-tune phase: the previous phase's LR, then its own
    assert plan.relative_lrs == pytest.approx([0.1 ** p.step_index for p in plan.phases[:-1]] + [0.01, 0.001])
    assert scaled.relative_lrs[:4] == [8, 4, 2, 1]
    assert plan.lr_at(10) == pytest.approx(0.2) and plan.lr_at(60) == pytest.approx(0.02)


def test_cosine_with_long_cycle_places_phases_as_steps_and_scales_by_batch_factor():
    plan = stepwise_plan(lr_policy="cosine")
    assert [(p.step_index, (p.batch_factor, p.frames, p.crop), p.end_epoch)
            for p in plan.phases] == WORKED_SCHEDULE
    assert plan.steps is None and plan.max_epoch == 358
    for epoch in (0.0, 72.5, 100.25, 200.0, 357.0):
        factor = plan.phase(int(epoch)).batch_factor
        assert plan.lr_at(epoch) == pytest.approx(
            factor * 0.1 * (math.cos(math.pi * epoch / 358) + 1) / 2, rel=1e-12)
    assert plan.lr_at(0.0) == pytest.approx(0.8) and plan.lr_at(358) == pytest.approx(0.0)
    warm = stepwise_plan(lr_policy="cosine", warmup_epochs=10.0)
    end = 8 * 0.1 * (math.cos(math.pi * 10 / 358) + 1) / 2
    assert warm.warmup_start_lr == pytest.approx(0.01)
    assert warm.lr_at(5.0) == pytest.approx(0.01 + 5 * (end - 0.01) / 10, rel=1e-12)
    assert warm.lr_at(10.0) == pytest.approx(end, rel=1e-12)


def compute_band(plan):
    """Min and max over every iteration shape of batch*T*S^2 relative to the base shape."""
    base = plan.batch_per_gpu * plan.frames * plan.crop ** 2
    values = [b * p.frames * c * c / base for p in plan.phases for b, c in p.shapes]
    return min(values), max(values)


def test_compute_per_iteration_stays_in_band():
    # Worked example: every shape is exactly the base compute except crop 158, 158^2 / (224^2/2).
    assert compute_band(stepwise_plan()) == (158 ** 2 / (224 ** 2 / 2), 1.0)
    # X3D-S (T=13, S=160, 8 per GPU): lowest 4 x 6 x 113^2 / (13 x 160^2) at phase (4, 6, 113),
    # highest 18 x 3 x 80^2 / 332800 at phase (9, 3, 113), short-cycle position 0.
    x3d_s = MultigridPlan(13, 160, 6, 8, 100, [0, 40, 70], 0.1)
    assert compute_band(x3d_s) == (4 * 6 * 113 ** 2 / 332800, 18 * 3 * 80 ** 2 / 332800)
    assert 0.92 < compute_band(x3d_s)[0] and compute_band(x3d_s)[1] < 1.04


def test_bad_bn_split_configs_are_refused_with_what_to_set():
    with pytest.raises(ValueError, match=r"phase 3 .*per-GPU batch 4 is below bn_base_size=8.*"
                                         r"bn_base_size <= 4 or batch_per_gpu >= 8"):
        stepwise_plan(batch_per_gpu=4)
    # 14 per GPU: phase 2 (batch factor 2) has 28 per GPU -> 3 splits, which do not divide 28.
    with pytest.raises(ValueError, match=r"phase 2 .*per-GPU batch 28 .*3 BN splits"):
        stepwise_plan(batch_per_gpu=14)
    assert stepwise_plan(batch_per_gpu=4, bn_base_size=4).phases[-1].bn_splits == 1
    # Without the long cycle BN is plain, whatever the batch (PySlowFast).
    assert stepwise_plan(batch_per_gpu=3, long_cycle=False).phases[0].bn_splits == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=[0]), "at least two steps"),
    (dict(steps=[5, 94]), "starting at 0"),
    (dict(steps=[0, 94, 94]), "strictly increasing"),
    (dict(steps=[0, 239]), "below max_epoch=239"),
    (dict(steps=None), "steps=None"),
    (dict(lr_policy="step"), "lr_policy='step'"),
    (dict(batch_per_gpu=0), "batch_per_gpu must be a positive integer"),
    (dict(short_cycle_factors=(0.5,)), "2 spatial factors"),
    (dict(long_cycle_factors=((2.0, 1.0),)), "batch factor must be >= 1"),
    (dict(warmup_epochs=400.0), "warmup_epochs=400.0"),
    (dict(lr_policy="cosine", cosine_end_lr=0.5), "cosine_end_lr=0.5"),
])
def test_bad_plan_inputs_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        stepwise_plan(**kwargs)


def test_scale_lr_linear_rule():
    assert scale_lr(0.1, 128, 1024) == pytest.approx(0.8)
    assert scale_lr(0.05, 64, 16) == pytest.approx(0.0125)
    with pytest.raises(ValueError, match="global_batch=0"):
        scale_lr(0.1, 128, 0)


def pyslowfast_cosine_lr(epoch, base_lr, max_epoch, warmup_epochs, warmup_start_lr):
    """PySlowFast's get_lr_at_epoch for lr_func_cosine (COSINE_END_LR 0, no offset), restated."""
    def cosine(e):
        return base_lr * (math.cos(math.pi * e / max_epoch) + 1.0) * 0.5
    if epoch < warmup_epochs:
        return epoch * (cosine(warmup_epochs) - warmup_start_lr) / warmup_epochs + warmup_start_lr
    return cosine(epoch)


def x3d_m_plan(**kwargs):
    """The X3D-M recipe of `python multigrid.py --preset x3d-m` (8 GPUs of 16 clips)."""
    config = dict(multigrid.PRESETS["x3d-m"])
    config.pop("gpus")
    return MultigridPlan(**config, **kwargs)


def test_cosine_long_cycle_switch_gives_pyslowfast_lr_exactly():
    # PySlowFast with SOLVER.STEPS given runs the long cycle with cosine: MAX_EPOCH becomes the
    # schedule's last end (300 -> 450) and the LR is BASE_LR x cosine, with no batch factor.
    ours, theirs = x3d_m_plan(), x3d_m_plan(cosine_batch_factor=False)
    assert ours.max_epoch == theirs.max_epoch == 450
    assert [p[:9] for p in ours.phases] == [p[:9] for p in theirs.phases]

    def reference(epoch):
        return pyslowfast_cosine_lr(epoch, 0.1, 450, 35.0, 0.01)

    points = [e + f for e in range(450) for f in (0.0, 0.25, 0.5, 0.999)]
    for epoch in points:
        assert theirs.lr_at(epoch) == pytest.approx(reference(epoch), rel=1e-12, abs=1e-15)
    assert round(theirs.lr_at(0.25), 6) == 0.010632 and round(ours.lr_at(0.25), 6) == 0.015558
    # After warm-up the default is exactly the phase's batch factor x PySlowFast's LR.
    factors = set()
    for epoch in points:
        if epoch >= 35:
            factor = ours.phase(int(epoch)).batch_factor
            factors.add(factor)
            assert ours.lr_at(epoch) == pytest.approx(factor * reference(epoch), rel=1e-12)
    assert factors == {1, 2, 4, 8}
    differing = [e for e in range(450)
                 if any(abs(ours.lr_at(e + f) - reference(e + f)) > 1e-12 for f in (0.25, 0.5))]
    assert len(differing) == 371
    # Without the long cycle the switch changes nothing (the batch factor is 1).
    plain = [stepwise_plan(long_cycle=False, lr_policy="cosine", cosine_batch_factor=flag)
             for flag in (True, False)]
    assert [plain[0].lr_at(e) for e in (0, 100.5, 300)] == [plain[1].lr_at(e) for e in (0, 100.5, 300)]
    assert "cosine without batch factor (PySlowFast)" in theirs.describe().splitlines()[0]
    assert "cosine x batch factor" in ours.describe().splitlines()[0]
    with pytest.raises(ValueError, match="cosine_batch_factor must be True or False, got 0"):
        x3d_m_plan(cosine_batch_factor=0)


def demo_plan():
    """The Kinetics demo's plan: T=16, S=48, 8 clips, steps [0, 17, 19] over 20 epochs, no short cycle."""
    return MultigridPlan(16, 48, 2, 8, 20, [0, 17, 19], 0.05, short_cycle=False, bn_base_size=4,
                         warmup_epochs=2.0, warmup_start_lr=0.005)


def test_zero_epoch_phases_match_pyslowfast_rounding_and_are_left_out():
    # By hand, PySlowFast's arithmetic: shapes (4, 34), (8, 34), (8, 48), (16, 48) with batch
    # factors 8, 4, 2, 1 (sum 15); step epochs 17 and 2 give unscaled ends 136/15, 204/15, 238/15,
    # 255/15, 271/15, 279/15, 283/15, 285/15; iterations 76/15, saving 19 / (76/15) = 3.75,
    # fine-tune 1 / 3.75 = 4/15 (end 289/15); scale 30 / (289/15). Ends x 30/289: 14.12, 21.18,
    # 24.71, 26.47, 28.13, 28.96, 29.38, 29.58, 30 -> int(round()) 14, 21, 25, 26, 28, 29, 29, 30,
    # 30: phases 6 (29-29) and 8 (30-30) have zero epochs in PySlowFast too.
    plan = demo_plan()
    ends = [p.end_epoch for p in plan.phases]
    assert ends == [14, 21, 25, 26, 28, 29, 29, 30, 30]
    assert [p.index for p in plan.trained_phases] == [0, 1, 2, 3, 4, 5, 7]
    # No epoch trains in them (PySlowFast's get_current_long_cycle_shape: first end > epoch).
    assert [plan.phase(e).index for e in range(24, 30)] == [2, 3, 4, 4, 5, 7]
    table = plan.describe(num_samples=384).splitlines()
    assert [line.split()[0] for line in table[3:-1]] == ["0", "1", "2", "3", "4", "5", "7"]
    assert table[-1] == ("(zero-epoch phases 6 (29-29), 8 (30-30) never train (PySlowFast's "
                         "rounding of the phase ends gives them too) and are left out)")
    assert plan.zero_epoch_note() and not stepwise_plan().zero_epoch_note()
    assert "left out" not in stepwise_plan().describe()


def test_schedule_figure_leaves_out_zero_phases_keeps_the_legend_off_the_curves():
    import matplotlib.pyplot as plt
    fig = multigrid.schedule_figure(demo_plan(), num_samples=384)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        axes = fig.axes
        assert len(axes) == 5 and all(ax.get_xlabel() and ax.get_ylabel() for ax in axes)
        assert all(label.get_visible() and label.get_text()
                   for ax in axes for label in ax.get_xticklabels()[1:-1])
        legend = fig.legends[0].get_window_extent(renderer)
        assert not any(legend.overlaps(ax.get_window_extent(renderer)) for ax in axes)
        assert "6 (29-29), 8 (30-30)" in fig._suptitle.get_text().replace("\n", " ")
        # The batch curve steps through the trained phases only: no spike for phase 6 at epoch 29.
        xs, ys = axes[0].lines[0].get_data()
        assert list(xs) == [0, 14, 21, 25, 26, 28, 29, 30]
        assert list(ys) == [64, 32, 16, 8, 64, 32, 8, 8]
    finally:
        plt.close(fig)


def test_describe_and_cli_table(capsys):
    table = stepwise_plan().describe(world_size=8, num_samples=240000)
    lines = table.splitlines()
    assert "239 -> 358" in lines[0] and len(lines) == 3 + 13
    assert lines[3].split() == ["0", "0", "0-73", "128/64/64", "1024/512/512", "8", "x", "2..8",
                                "112/158/158", "8", "0.8", "->", "0.8", "351"]
    multigrid.main(["--steps", "0", "94", "154", "196", "--no-long-cycle", "--batch-per-gpu", "16"])
    out = capsys.readouterr().out
    assert "short cycle" in out and "64/32/16" in out and "239 -> 358" in out
    with pytest.raises(SystemExit) as exit_info:
        multigrid.main(["--help"])
    assert exit_info.value.code == 0
    with pytest.raises(SystemExit, match="bn_base_size=8"):
        multigrid.main(["--batch-per-gpu", "2"])


def test_cli_writes_plot(tmp_path, capsys):
    path = tmp_path / "schedule.png"
    multigrid.main(["--preset", "x3d-m", "--num-samples", "240000", "--plot", str(path)])
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 600 and height > 600
    multigrid.main(["--preset", "x3d-m", "--no-cosine-batch-factor"])
    assert "cosine without batch factor (PySlowFast)" in capsys.readouterr().out
