"""X3D parity with pytorchvideo's create_x3d, checkpoint round trips for every layout, complexity table."""
import re
import subprocess
import sys

import pytest
import torch

import x3d
from pytorchvideo.models.x3d import create_x3d


def _randomise(model, seed=0):
    """Random weights everywhere and random BN statistics / affine, so a wrong mapping cannot pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) * 1.5 + 0.5)
            elif name.endswith("running_mean") or name.endswith("bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)
            elif t.dim() == 1:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
    return model


def _pytorchvideo(version, frames, activation=None):
    """pytorchvideo's X3D for a preset, built for `frames` input frames at the preset's train crop."""
    p = x3d.PRESETS[version]
    torch.manual_seed(1)
    model = create_x3d(input_clip_length=frames, input_crop_size=p.train_crop, depth_factor=p.depth_factor,
                       width_factor=p.width_factor, head_activation=activation)
    return _randomise(model).eval()


# L runs 4 frames instead of 16: both heads then pool all 4 frames, and the crop (which decides the
# head's fully convolutional behaviour) stays at the preset's train / test crop.
@pytest.mark.parametrize("version,frames", [("XS", 4), ("S", 13), ("L", 4)])
def test_eval_logits_match_pytorchvideo_at_train_and_test_crop(version, frames):
    """Converted weights give pytorchvideo's eval outputs within 1e-5 at the train and the test crop."""
    pv = _pytorchvideo(version, frames)
    ours = x3d.generate_model(version).eval()
    report = x3d.load_pretrained(ours, pv.state_dict())
    assert report["format"] == "pytorchvideo" and not report["classifier_reinitialized"]
    p = x3d.PRESETS[version]
    torch.manual_seed(2)
    for crop in (p.train_crop, p.test_crop):
        x = torch.randn(1, 3, frames, crop, crop)
        with torch.no_grad():
            expected, got = pv(x), ours(x)
        assert got.shape == (1, 400)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_predict_matches_pytorchvideo_softmax_head_at_test_crop():
    """predict() = softmax at every position then mean, as pytorchvideo 0.1.5 / PySlowFast eval (2x2 positions at 182)."""
    pv = _pytorchvideo("XS", 4, activation=torch.nn.Softmax)
    ours = x3d.generate_model("XS").eval()
    x3d.load_pretrained(ours, pv.state_dict())
    x = torch.randn(2, 3, 4, 182, 182)
    with torch.no_grad():
        expected, got = pv(x), ours.predict(x)
        assert ours.positions(x).shape == (2, 1, 2, 2, 400)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.sum(1), torch.ones(2))


# ---- round trips of every checkpoint layout -------------------------------------------------

def _to_pyslowfast(key):
    """This repo's key -> PySlowFast's, written independently of x3d.py's rules."""
    m = re.match(r"s(\d)\.(\d+)\.(.*)", key)
    if m:
        stage, block, rest = m.groups()
        rest = rest.replace("shortcut_bn.", "branch1_bn.!").replace("shortcut.", "branch1.")
        rest = rest.replace("branch1_bn.!", "branch1_bn.")
        if not rest.startswith("branch1"):
            rest = "branch2." + rest
        return f"s{stage}.pathway0_res{block}.{rest}"
    if key.startswith("stem."):
        return "s1.pathway0_stem." + key[5:].replace("conv_t.", "conv.")
    return key


def _to_x3d_multigrid(sd, splits):
    """This repo's state dict -> x3d-multigrid's, with SubBatchNorm3d .bn / .split_bn buffers of `splits` splits."""
    out = {}
    for key, value in sd.items():
        spread = torch.linspace(-0.1, 0.1, splits).view(splits, 1).expand(splits, value.numel()) if value.dim() else None
        key = (key.replace("stem.conv_xy.", "conv1_s.").replace("stem.conv_t.", "conv1_t.").replace("stem.bn.", "bn1.")
               .replace("head.conv_5_bn.", "bn5.").replace("head.conv_5.", "conv5.")
               .replace("head.lin_5.", "fc1.").replace("head.projection.", "fc2."))
        m = re.match(r"s(\d)\.(\d+)\.(.*)", key)
        if m:
            rest = m[3]
            for ours, theirs in (("shortcut_bn.", "downsample.1."), ("shortcut.", "downsample.0."), ("se.", ""),
                                 ("a_bn.", "bn1."), ("b_bn.", "bn2."), ("c_bn.", "bn3."),
                                 ("a.", "conv1."), ("b.", "conv2."), ("c.", "conv3.")):
                if rest.startswith(ours):
                    rest = theirs + rest[len(ours):]
                    break
            key = f"layer{int(m[1]) - 1}.{m[2]}.{rest}"
        name = key.rsplit(".", 1)[1]
        prefix = key.rsplit(".", 1)[0]
        if name == "running_mean":  # split means differ around the aggregate; .bn holds stale defaults
            out[f"{prefix}.bn.{name}"] = torch.zeros_like(value)
            out[f"{prefix}.split_bn.{name}"] = (value + spread).flatten()
        elif name == "running_var":  # aggregate var = mean split var + variance of split means
            out[f"{prefix}.bn.{name}"] = torch.ones_like(value)
            out[f"{prefix}.split_bn.{name}"] = (value - (spread ** 2).mean(0)).repeat(splits)
        elif name == "num_batches_tracked":
            out[f"{prefix}.bn.{name}"] = out[f"{prefix}.split_bn.{name}"] = value + 1
        else:
            out[key] = value
    return out


@pytest.fixture(scope="module")
def trained_xs():
    """An XS model with random weights and BN statistics, and a clip."""
    torch.manual_seed(3)
    model = _randomise(x3d.generate_model("XS", n_classes=7)).eval()
    return model, torch.randn(1, 3, 2, 64, 64)


def _assert_same_outputs(a, b, x):
    """Eval outputs of two models agree."""
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), atol=1e-6, rtol=1e-6)


def test_round_trip_pyslowfast_pyth(trained_xs, tmp_path):
    """A PySlowFast .pyth file ({'model_state', 'cfg', ...}) loads back into identical outputs."""
    model, x = trained_xs
    path = tmp_path / "x3d_xs.pyth"
    sd = {_to_pyslowfast(k): v for k, v in model.state_dict().items()}
    assert "s1.pathway0_stem.conv.weight" in sd and "s2.pathway0_res0.branch1_bn.running_var" in sd
    assert "s3.pathway0_res0.branch2.se.fc1.bias" in sd and "head.lin_5.weight" in sd
    torch.save({"epoch": 300, "model_state": sd, "optimizer_state": {}, "cfg": "MODEL:\n  ARCH: x3d\n"}, path)
    fresh = x3d.generate_model("XS", n_classes=7)
    report = x3d.load_pretrained(fresh, str(path))
    assert report["format"] == "pyslowfast" and report["source"] == str(path)
    _assert_same_outputs(model, fresh, x)


def test_round_trip_pytorchvideo_hub_file(tmp_path):
    """A pytorchvideo hub file ({'model_state': create_x3d state dict}) loads; its res2 shortcut BN becomes identity."""
    pv = _pytorchvideo("XS", 4)
    path = tmp_path / "X3D_XS.pyth"
    torch.save({"model_state": pv.state_dict()}, path)
    ours = x3d.generate_model("XS")
    report = x3d.load_pretrained(ours, path)
    assert any("identity" in n for n in report["notes"])
    x = torch.randn(1, 3, 4, 160, 160)  # pytorchvideo fails below its train crop
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), pv(x), atol=1e-5, rtol=1e-5)


def test_round_trip_x3d_multigrid_uses_aggregated_split_stats(trained_xs, tmp_path):
    """An x3d-multigrid .pt (DataParallel prefix, split_bn of 8 splits, stale .bn) loads its aggregated split stats."""
    model, x = trained_xs
    sd = {f"module.{k}": v for k, v in _to_x3d_multigrid(model.state_dict(), 8).items()}
    assert "module.layer1.0.bn1.split_bn.running_var" in sd and "module.fc2.weight" in sd
    path = tmp_path / "x3d_multigrid_kinetics.pt"
    torch.save(sd, path)
    fresh = x3d.generate_model("XS", n_classes=7, base_bn_splits=4)
    report = x3d.load_pretrained(fresh, path)
    assert report["format"] == "x3d-multigrid"
    assert any("split_bn" in n for n in report["notes"])
    _assert_same_outputs(model, fresh, x)


def test_round_trip_own_checkpoint_and_bare_state_dict(trained_xs, tmp_path):
    """The trainer's {'model', 'x3d_version', 'n_classes', 'task'} dict and a bare state dict both load."""
    model, x = trained_xs
    path = tmp_path / "ckpt.pt"
    x3d.save_checkpoint(model, path, epoch=3)
    payload = torch.load(path, weights_only=True)
    assert (payload["x3d_version"], payload["n_classes"], payload["task"], payload["epoch"]) == ("XS", 7, "class", 3)
    for source in (str(path), model.state_dict()):
        fresh = x3d.generate_model("XS", n_classes=7, base_bn_splits=2)
        assert x3d.load_pretrained(fresh, source)["format"] == "x3d.py"
        _assert_same_outputs(model, fresh, x)
    with pytest.raises(ValueError, match="X3D-XS but the model is X3D-S"):
        x3d.load_pretrained(x3d.generate_model("S", n_classes=7), str(path))


def test_other_class_count_reinitialises_classifier(trained_xs):
    """A 7-class checkpoint into a 5-class model keeps the backbone and re-initialises the classifier."""
    model, x = trained_xs
    fresh = x3d.generate_model("XS", n_classes=5)
    report = x3d.load_pretrained(fresh, model.state_dict())
    assert report["classifier_reinitialized"] and "head.projection.weight" in report["missing"]
    assert any("7 classes" in n for n in report["notes"])
    torch.testing.assert_close(fresh.head.lin_5.weight, model.head.lin_5.weight)
    assert 0.005 < fresh.head.projection.weight.std() < 0.015
    with pytest.raises(ValueError, match="strict_classes"):
        x3d.load_pretrained(x3d.generate_model("XS", n_classes=5), model.state_dict(), strict_classes=True)


def test_other_architecture_fails_listing_keys(trained_xs, tmp_path):
    """Unmappable keys, another X3D version and non-checkpoints give errors naming keys and format."""
    model, _ = trained_xs
    foreign = dict(model.state_dict(), **{"layer9.conv.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"format x3d.py: 1 keys.*layer9\.conv\.weight"):
        x3d.load_pretrained(x3d.generate_model("XS", n_classes=7), foreign)
    with pytest.raises(ValueError, match=r"format x3d.py: \d+ keys do not map.*s2\.3\."):
        x3d.load_pretrained(x3d.generate_model("XS"), x3d.generate_model("L").state_dict())
    with pytest.raises(ValueError, match="unrecognised checkpoint format.*fc.weight"):
        x3d.load_pretrained(model, {"fc.weight": torch.zeros(2, 2)})
    partial = {k: v for k, v in model.state_dict().items() if not k.startswith("head.lin_5")}
    with pytest.raises(ValueError, match=r"absent from the checkpoint.*head\.lin_5\.weight"):
        x3d.load_pretrained(x3d.generate_model("XS", n_classes=7), partial)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        x3d.load_pretrained(model, tmp_path / "nope.pt")


def _stage_widths(model):
    """Output channels of the stem and of stages s2..s5."""
    return [model.stem.conv_xy.out_channels] + [model.get_submodule(f"s{i}")[0].c.out_channels for i in range(2, 6)]


def test_width_roundings_xl_counts_and_xs_to_l_unchanged():
    """XL: 2020 code (divisor 8) 32/72/136/280, PySlowFast's current code (divisor 1) 35/70/139/278; XS-L equal."""
    old, new = x3d.generate_model("XL"), x3d.generate_model("XL", width_divisor=1)
    assert _stage_widths(old) == [32, 32, 72, 136, 280] and _stage_widths(new) == [35, 35, 70, 139, 278]
    assert x3d.model_complexity(old, 16, 312)[0] == 11_095_904
    assert x3d.model_complexity(new, 16, 312)[0] == 11_087_571
    assert old.width_divisor == 8 and new.width_divisor == 1
    for version in ("XS", "S", "M", "L"):
        a, b = x3d.generate_model(version), x3d.generate_model(version, width_divisor=1)
        assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    with pytest.raises(ValueError, match="width_divisor=4"):
        x3d.generate_model("XL", width_divisor=4)


def test_load_pretrained_picks_the_xl_width_rounding_from_the_checkpoint(tmp_path):
    """A PySlowFast-current XL .pyth rebuilds a default XL model to its widths (and back); L into XL still fails."""
    torch.manual_seed(5)
    source = _randomise(x3d.generate_model("XL", n_classes=7, width_divisor=1)).eval()
    path = tmp_path / "x3d_xl.pyth"
    torch.save({"model_state": {_to_pyslowfast(k): v for k, v in source.state_dict().items()}}, path)
    model = x3d.generate_model("XL", n_classes=7).double().eval()
    report = x3d.load_pretrained(model, str(path))
    assert report["format"] == "pyslowfast" and model.width_divisor == 1
    assert any("35/70/139/278" in n and "width_divisor=1" in n for n in report["notes"])
    assert not model.training and model.stem.conv_xy.weight.dtype == torch.float64
    x = torch.randn(1, 3, 2, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x.double()).float(), source(x), atol=1e-5, rtol=1e-5)
    back = x3d.generate_model("XL", n_classes=7, width_divisor=1)
    report = x3d.load_pretrained(back, x3d.generate_model("XL", n_classes=7).state_dict())
    assert back.width_divisor == 8 and any("32/72/136/280" in n for n in report["notes"])
    same = x3d.generate_model("XL", n_classes=7, width_divisor=1)
    assert x3d.load_pretrained(same, source.state_dict())["notes"] == []
    with pytest.raises(ValueError, match="shape mismatch"):
        x3d.load_pretrained(x3d.generate_model("XL"), x3d.generate_model("L").state_dict())


def test_convert_command_writes_loadable_checkpoint(tmp_path):
    """`python x3d.py convert` turns a pytorchvideo file into this repo's checkpoint format."""
    pv = _pytorchvideo("XS", 4)
    src, out = tmp_path / "X3D_XS.pyth", tmp_path / "models" / "x3d_xs.pt"
    torch.save({"model_state": pv.state_dict()}, src)
    run = subprocess.run([sys.executable, x3d.__file__, "convert", "--version", "XS", "--src", str(src), "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "pytorchvideo" in run.stdout
    payload = torch.load(out, weights_only=True)
    assert (payload["x3d_version"], payload["n_classes"], payload["source_format"]) == ("XS", 400, "pytorchvideo")
    ours = x3d.generate_model("XS")
    assert x3d.load_pretrained(ours, out)["format"] == "x3d.py"
    x = torch.randn(1, 3, 4, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), pv(x), atol=1e-5, rtol=1e-5)


# ---- complexity ------------------------------------------------------------------------------

# version: (params, GMACs at train crop, GMACs at test crop or None): FAIR's published X3D numbers
# (model zoo and paper; GMACs count conv + linear multiply-adds), XL as PySlowFast's 2020 code builds it.
FAIR_NUMBERS = {
    "XS": (3_794_322, 0.6053, None),
    "S": (3_794_322, 1.9629, None),
    "M": (3_794_322, 4.7325, 6.186),
    "L": (6_153_432, 18.3677, 24.78),
    "XL": (11_095_904, 35.84, 48.4),
}


def test_complexity_table_matches_reference():
    """Params exact and GMACs within 0.5% of FAIR's numbers for every version."""
    rows = {r[0]: r[1:] for r in x3d.complexity_table()}
    for version, (params, train, test) in FAIR_NUMBERS.items():
        got_params, got_train, got_test = rows[version]
        assert got_params == params, version
        assert abs(got_train / train - 1) < 0.005, (version, got_train)
        if test is not None:
            assert abs(got_test / test - 1) < 0.005, (version, got_test)


def test_complexity_independent_of_bn_splits_and_mode():
    """Split count and train mode do not change the count; the model is left untouched."""
    model = x3d.generate_model("XS", base_bn_splits=8).train()
    assert x3d.model_complexity(model, 4, 160) == (3_794_322, pytest.approx(0.6053, rel=5e-4))
    assert model.training and model.stem.bn.num_splits == 8 and model.stem.conv_xy.weight.device.type == "cpu"
