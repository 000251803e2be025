"""Export paths of the X3D model: torch.export, ONNX, and torch.compile with fullgraph (no graph break)."""
import copy

import pytest
import torch

import x3d


@pytest.fixture(scope="module")
def xs():
    """A small-class XS with non-trivial BN statistics, and a small clip."""
    torch.manual_seed(0)
    model = x3d.generate_model("XS", n_classes=5, base_bn_splits=2, dropout=0.0)  # eager == compiled in train
    model.train()(torch.randn(4, 3, 2, 32, 32))  # one training forward moves every BN's statistics
    return model.eval(), torch.randn(2, 3, 2, 32, 32)


@pytest.fixture(scope="module")
def program(xs):
    """torch.export.export of the eval model."""
    model, x = xs
    return torch.export.export(model, (x,))


def test_torch_export_eval_model(xs, program):
    """torch.export.export of the eval model runs and matches eager."""
    model, x = xs
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-5)


def test_onnx_export_matches_eager(xs, program, tmp_path):
    """ONNX export (dynamo exporter) gives a valid model whose reference evaluation matches eager."""
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    model, x = xs
    path = tmp_path / "x3d_xs.onnx"
    torch.onnx.export(program, (x,), str(path), dynamo=True, input_names=["clip"], output_names=["logits"])
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    (out,) = ReferenceEvaluator(proto).run(None, {"clip": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), model(x), atol=1e-4, rtol=1e-4)


def test_compile_fullgraph_eval_and_split_train(xs):
    """torch.compile(fullgraph=True) traces eval (test crop) and split-BN training (small clip) with no graph break.

    backend="eager" runs only Dynamo, where graph breaks happen, to keep the test short on CPU.
    """
    model, x = xs
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x_test = torch.randn(1, 3, 4, 192, 192)  # larger than the train crop: the head's window leaves 2x2 positions
    with torch.no_grad():
        torch.testing.assert_close(compiled(x_test), model(x_test), atol=1e-5, rtol=1e-5)
    eager, traced = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    x_train = torch.randn(4, 3, 2, 32, 32)
    step = torch.compile(traced, fullgraph=True, backend="eager")
    expected, got = eager(x_train), step(x_train)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    for (name, a), b in zip(eager.named_buffers(), traced.buffers()):
        torch.testing.assert_close(b, a, msg=name, atol=1e-6, rtol=1e-5)
    torch._dynamo.reset()
