"""Compiler integration: torch.compile(fullgraph=True) with zero graph breaks in eval and train
mode, torch.export of a converted resnet18, and the module protocols users rely on."""

import copy
import io
import pickle

import pytest
import torch

import resfused
from resfused import reference as R

from cases import ONE_PER_TYPE, parametrize_cases
from harness import assert_matches_reference, compare_modules, randomize_bn


def _pair(name, args):
    ref = randomize_bn(getattr(R, name)(*args))
    fused = getattr(resfused, name)(*args)
    fused.load_state_dict(ref.state_dict())
    return fused, ref


def _no_graph_breaks(fn, *args):
    explanation = torch._dynamo.explain(fn)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.slow
@parametrize_cases(ONE_PER_TYPE)
def test_compiled_block_eval(name, args):
    fused, ref = _pair(name, args)
    fused.eval()
    x = torch.randn(2, args[0], 9, 9)
    with torch.no_grad():
        _no_graph_breaks(fused, x)
        compiled = torch.compile(fused, fullgraph=True)
        compare_modules(compiled, ref.eval(), x, f"compiled {name}")


@pytest.mark.slow
@parametrize_cases(ONE_PER_TYPE)
def test_compiled_block_train(name, args):
    fused, ref = _pair(name, args)
    twin = copy.deepcopy(fused)
    x = torch.randn(3, args[0], 7, 7)
    _no_graph_breaks(copy.deepcopy(fused).train(), x)
    compiled = torch.compile(fused.train(), fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.square().sum().backward()
    y_eager = twin.train()(x)
    y_eager.square().sum().backward()
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-5)
    for (n, p), (_, q) in zip(fused.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4, msg=n)
    for (n, b), (_, c) in zip(fused.named_buffers(), twin.named_buffers()):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=n)


@pytest.fixture(scope="module")
def resnet18():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = randomize_bn(tv.models.resnet18(weights=None, num_classes=10)).eval()
    return model, resfused.fuse(model)


@pytest.mark.slow
def test_compiled_converted_resnet18(resnet18):
    model, fused = resnet18
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _no_graph_breaks(fused, x)
        compiled = torch.compile(fused, fullgraph=True)
        expected = copy.deepcopy(model).double()(x.double())
        assert_matches_reference(compiled(x), expected, what="compiled resnet18")


@pytest.mark.slow
def test_export_converted_resnet18(resnet18):
    model, fused = resnet18
    x = torch.randn(2, 3, 32, 32)
    exported = torch.export.export(fused, (x,))
    x2 = torch.randn(2, 3, 32, 32)
    expected = copy.deepcopy(model).double()(x2.double())
    with torch.no_grad():
        assert_matches_reference(exported.module()(x2), expected, what="exported resnet18")


def test_module_protocols():
    fused, ref = _pair("Bottleneck", (16, 4, 1))
    fused.eval(), ref.eval()
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        compare_modules(fused, ref, x, "original")  # builds and caches the folded plan
        compare_modules(copy.deepcopy(fused), ref, x, "deepcopy")
        buffer = io.BytesIO()
        torch.save(fused.state_dict(), buffer)
        buffer.seek(0)
        for how, state in (
            ("torch.save", torch.load(buffer)),
            ("pickle", pickle.loads(pickle.dumps(fused.state_dict()))),
        ):
            clone = resfused.Bottleneck(16, 4).eval()
            clone.load_state_dict(state)
            compare_modules(clone, ref, x, f"state_dict round trip through {how}")
        bf16 = copy.deepcopy(fused).to(torch.bfloat16)
        compare_modules(bf16, ref, x.bfloat16(), ".to(bfloat16)")
        cl = copy.deepcopy(fused).to(memory_format=torch.channels_last)
        compare_modules(cl, ref, x.contiguous(memory_format=torch.channels_last), "channels_last module")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("what", ["block", "fused model"])
def test_torchscript_is_unsupported_and_says_so(what):
    # Documented in README: the fused modules dispatch in Python; use torch.compile / torch.export.
    module = resfused.BasicBlock(4, 4).eval()
    if what == "fused model":
        module = resfused.fuse(torch.nn.Sequential(R.BasicBlock(4, 4), R.BasicBlock(4, 4)).eval())
    with pytest.raises(
        RuntimeError,
        match=r"resfused\.\w+ cannot be scripted with "
        r"torch\.jit\.script.*use torch\.compile",
    ):
        torch.jit.script(module)
