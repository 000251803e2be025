"""SubBatchNorm3d, precise BN, activation checkpointing and the model's training helpers."""
import copy

import pytest
import torch
import torch.nn as nn
from fvcore.nn.precise_bn import update_bn_stats

import x3d


def _clip(n, frames=2, crop=32, seed=0):
    """A random float clip batch (N, 3, frames, crop, crop)."""
    return torch.randn(n, 3, frames, crop, crop, generator=torch.Generator().manual_seed(seed))


def test_split_bn_equals_separate_batchnorms_on_interleaved_sub_batches():
    """k splits == k BatchNorm3d over samples j, j+k, ... (outputs, gradients and running stats), aggregated as PySlowFast."""
    torch.manual_seed(0)
    k, c = 3, 5
    bn = x3d.SubBatchNorm3d(c, num_splits=k)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    refs = [nn.BatchNorm3d(c) for _ in range(k)]
    for ref in refs:
        ref.load_state_dict(bn.state_dict())
    for step in range(3):
        x = (torch.randn(6, c, 2, 3, 3) * (step + 1) + step).requires_grad_()
        g = torch.randn(6, c, 2, 3, 3)
        y = bn.train()(x)
        bn.zero_grad()
        y.backward(g)
        ref_x = x.detach().clone().requires_grad_()
        for j, ref in enumerate(refs):
            ref.zero_grad()
            ref_y = ref.train()(ref_x[j::k])
            torch.testing.assert_close(y[j::k], ref_y, atol=1e-5, rtol=1e-5)
            ref_y.backward(g[j::k])
        torch.testing.assert_close(x.grad, ref_x.grad, atol=1e-5, rtol=1e-5)
        for name in ("weight", "bias"):  # one shared affine: its gradient sums the splits'
            torch.testing.assert_close(getattr(bn, name).grad, sum(getattr(r, name).grad for r in refs),
                                       atol=1e-5, rtol=1e-5)
    means = torch.stack([r.running_mean for r in refs])
    variances = torch.stack([r.running_var for r in refs])
    torch.testing.assert_close(bn.split_running_mean.view(k, c), means)
    torch.testing.assert_close(bn.split_running_var.view(k, c), variances)
    torch.testing.assert_close(bn.running_mean, means.mean(0))
    torch.testing.assert_close(bn.running_var, variances.mean(0) + means.var(0, unbiased=False))
    assert set(bn.state_dict()) == set(nn.BatchNorm3d(c).state_dict())


def test_indivisible_batch_names_both_numbers():
    """A batch of 6 with 4 splits is a clear error, not a reshape failure."""
    model = x3d.generate_model("XS", base_bn_splits=4).train()
    with pytest.raises(ValueError, match=r"batch of 6 samples does not divide into 4 BN splits"):
        model(_clip(6, 1, 32))
    with pytest.raises(ValueError, match="positive int"):
        x3d.set_bn_splits(model, 0)


def _train_steps(model, steps, batch=8, seed=0):
    """A few SGD steps on random clips."""
    opt = torch.optim.SGD(x3d.parameter_groups(model, 5e-5), lr=0.1, momentum=0.9)
    model.train()
    for i in range(steps):
        loss = nn.functional.cross_entropy(model(_clip(batch, seed=seed + i)), torch.arange(batch) % model.n_classes)
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.fixture(scope="module")
def split_trained():
    """XS trained 2 steps with 8 BN splits (one sample per split)."""
    torch.manual_seed(0)
    model = x3d.generate_model("XS", n_classes=4, base_bn_splits=8)
    _train_steps(model, steps=2)
    return model


def test_eval_sees_aggregated_stats_without_any_call(split_trained):
    """After split training, eval == a plain-BN model holding the aggregate computed here from the split buffers."""
    model = copy.deepcopy(split_trained)
    plain = x3d.generate_model("XS", n_classes=4)
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        for (name, sub), ref in zip(model.named_modules(), plain.modules()):
            if isinstance(sub, x3d.SubBatchNorm3d):
                means = sub.split_running_mean.view(8, -1)
                ref.running_mean.copy_(means.mean(0))
                ref.running_var.copy_(sub.split_running_var.view(8, -1).mean(0) + means.var(0, unbiased=False))
        x = _clip(2, seed=9)
        torch.testing.assert_close(model.eval()(x), plain.eval()(x), atol=1e-5, rtol=1e-5)
    assert model.stem.bn.num_batches_tracked == 2


def test_split_changes_keep_statistics(split_trained):
    """8 -> 2 -> 1 splits keeps the aggregated statistics and eval outputs; split buffers restart from them."""
    model = copy.deepcopy(split_trained).eval()
    x = _clip(2, seed=9)
    with torch.no_grad():
        before = model(x)
        stats = {k: v.clone() for k, v in model.state_dict().items()}
        for k in (2, 1):
            x3d.set_bn_splits(model, k)
            for key, v in model.state_dict().items():
                torch.testing.assert_close(v, stats[key], msg=key)
            torch.testing.assert_close(model(x), before)
    x3d.set_bn_splits(model, 2)
    torch.testing.assert_close(model.s3[1].a_bn.split_running_mean, stats["s3.1.a_bn.running_mean"].repeat(2))
    _train_steps(model, steps=1, batch=2)  # trains at the new count


@pytest.mark.parametrize("splits", [1, 4])
def test_save_with_8_splits_loads_at_other_counts(split_trained, splits, tmp_path):
    """A state dict saved at 8 splits is plain BN and loads into 1 or 4 splits with equal eval outputs."""
    torch.save(split_trained.state_dict(), tmp_path / "sd.pt")
    sd = torch.load(tmp_path / "sd.pt", weights_only=True)
    assert not any("split" in k for k in sd)
    other = x3d.generate_model("XS", n_classes=4, base_bn_splits=splits)
    other.load_state_dict(sd)
    if splits > 1:
        torch.testing.assert_close(other.head.conv_5_bn.split_running_var, sd["head.conv_5_bn.running_var"].repeat(splits))
    x = _clip(2, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(x), copy.deepcopy(split_trained).eval()(x))


class _SplitReference(nn.Module):
    """Conv + torch BatchNorm3d over the PySlowFast split view, for fvcore's update_bn_stats."""

    def __init__(self, conv, k):
        super().__init__()
        self.conv, self.k = conv, k
        self.bn = nn.BatchNorm3d(conv.out_channels * k, affine=False)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y.reshape(y.shape[0] // self.k, -1, *y.shape[2:]))


@pytest.mark.parametrize("k", [1, 2])
def test_recompute_bn_stats_equals_fvcore_update_bn_stats(k):
    """Precise BN equals fvcore's update_bn_stats (PySlowFast's) with unequal batch shapes, at any split count, then aggregates."""
    torch.manual_seed(0)
    conv = nn.Conv3d(3, 4, 1)
    ours = nn.Sequential(copy.deepcopy(conv), x3d.SubBatchNorm3d(4, num_splits=k)).eval()
    ref = _SplitReference(copy.deepcopy(conv), k).train()
    batches = [_clip(n, 1 + s % 2, 6, seed=s) * (s + 1) + s for s, n in enumerate((4, 2, 6, 2, 4))]
    assert x3d.recompute_bn_stats(ours, iter(batches + batches), 5) == 5
    update_bn_stats(ref, batches, num_iters=5)
    assert not ours.training and ours[1].momentum == 0.1
    means = ref.bn.running_mean.view(k, 4)
    torch.testing.assert_close(ours[1].running_mean, means.mean(0))
    torch.testing.assert_close(ours[1].running_var, ref.bn.running_var.view(k, 4).mean(0) + means.var(0, unbiased=False))
    assert x3d.recompute_bn_stats(ours.train(), [(b, 0) for b in batches], 200) == 5 and ours.training
    with pytest.raises(ValueError, match="yielded no batch"):
        x3d.recompute_bn_stats(ours, [], 3)


def test_activation_checkpointing_same_gradients_and_stats():
    """Checkpointed residual blocks give identical loss, gradients and BN statistics (recompute is not counted)."""
    torch.manual_seed(0)
    base = x3d.generate_model("XS", n_classes=3, base_bn_splits=2, dropout=0.0).train()
    with torch.no_grad():
        for m in base.modules():
            if isinstance(m, x3d.SubBatchNorm3d):
                m.weight.uniform_(0.5, 1.5)
    ckpt = copy.deepcopy(base)
    ckpt.set_activation_checkpointing(True)
    x = _clip(4, 2, 32, seed=1)
    for model in (base, ckpt):
        model(x).square().sum().backward()
    for (name, a), b in zip(base.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name, atol=1e-6, rtol=1e-5)
    for (name, a), b in zip(base.named_buffers(), ckpt.buffers()):
        torch.testing.assert_close(a, b, msg=name)


def test_channels_last_input_gives_same_outputs():
    """channels_last_3d input works in training with splits and in eval."""
    torch.manual_seed(0)
    model = x3d.generate_model("XS", n_classes=3, base_bn_splits=2, dropout=0.0)
    x = _clip(4, 1, 32, seed=2)
    x_cl = x.contiguous(memory_format=torch.channels_last_3d)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(model.train()(x), twin.train()(x_cl), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), model(x_cl), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("frames,crop", [(1, 80), (2, 113), (5, 32)])
def test_every_multigrid_shape_runs_without_rebuild(frames, crop):
    """XS takes 1-5 frames and crops 32-113 in train and eval: the head pools globally below the train shape."""
    model = x3d.generate_model("XS", n_classes=6, base_bn_splits=2)
    x = _clip(2, frames, crop)
    assert model.train()(x).shape == (2, 6)
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 6)
        assert model.positions(x).shape == (2, max(1, frames - 3), 1, 1, 6)


def test_loc_task_and_predict_shapes():
    """task='loc' gives per-time logits / probabilities (N, classes, T); predict applies softmax or sigmoid."""
    model = x3d.generate_model("XS", n_classes=5, task="loc", multi_label=True).eval()
    x = _clip(2, 6, 64)
    with torch.no_grad():
        logits, probs = model(x), model.predict(x)
    assert logits.shape == probs.shape == (2, 5, 6)
    torch.testing.assert_close(probs, torch.sigmoid(logits))
    single = x3d.generate_model("XS", n_classes=5).eval()
    with torch.no_grad():
        torch.testing.assert_close(single.predict(x).sum(1), torch.ones(2))
    with pytest.raises(ValueError, match="unknown task 'detect'"):
        x3d.generate_model("XS", task="detect")
    with pytest.raises(ValueError, match="unknown X3D version 'XXL'"):
        x3d.generate_model("XXL")
    with pytest.raises(ValueError, match=r"got torch.float32 of shape \(3, 4, 64, 64\)"):
        single(torch.zeros(3, 4, 64, 64))
    with pytest.raises(ValueError, match=r"got torch.uint8 of shape"):
        single(torch.zeros(1, 3, 4, 64, 64, dtype=torch.uint8))


def test_init_parameter_groups_and_replace_logits():
    """PySlowFast init; BN affine (and only that) in the no-decay group; replace_logits gives N(0, 0.01)."""
    torch.manual_seed(0)
    model = x3d.generate_model("M", n_classes=400, base_bn_splits=2)
    bns = [m for m in model.modules() if isinstance(m, x3d.SubBatchNorm3d)]
    for m in bns:
        assert (m.weight == (0.0 if hasattr(m, "final_bn") else 1.0)).all() and (m.bias == 0).all()
    assert sum(hasattr(m, "final_bn") for m in bns) == 3 + 5 + 11 + 7
    assert abs(model.head.projection.weight.std().item() - 0.01) < 5e-4
    assert model.s3[0].se.fc1.bias.abs().sum() == 0
    groups = x3d.parameter_groups(model, 5e-5)
    assert [g["weight_decay"] for g in groups] == [5e-5, 0.0]
    bn_params = {id(p) for m in bns for p in (m.weight, m.bias)}
    assert {id(p) for p in groups[1]["params"]} == bn_params
    decayed = {id(p) for p in groups[0]["params"]}
    assert id(model.head.projection.bias) in decayed and id(model.s2[0].se.fc2.bias) in decayed
    assert len(decayed) + len(bn_params) == len(list(model.parameters()))
    torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True)
    model.replace_logits(157)
    assert model.n_classes == 157 and model.head.projection.bias.abs().sum() == 0
    assert abs(model.head.projection.weight.std().item() - 0.01) < 5e-4
