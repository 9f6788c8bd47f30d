"""Bad-input fuzzing: random wrong or unusual inputs to the fused blocks, a converted model and the
op API. Each must give the reference's result or raise ValueError / TypeError / RuntimeError
whose message names the argument and what was expected; none may crash the process or return a
wrong result.

Kinds (each drawn with random sizes, dtypes, strides and positions from RESFUSED_BAD_INPUT_SEED):

    must raise a clear error   not a tensor, wrong rank, wrong channels, integer / bool / float64 /
                               float16 / complex dtype, meta input for CPU parameters, sparse and
                               oneDNN layouts, huge sizes with wrong channels (as_strided on a
                               one-element storage, nothing read)
    must match the reference   non-contiguous (sliced, permuted, storage offset), stride-0 (expand),
                               overlapping as_strided windows, batch 0, NaN / +Inf / -Inf at random
                               positions, huge sizes on the meta device (shapes past 2**31 elements)
    either                     H or W of 0 (the reference raises too)

in three modes (eval without autograd, eval with autograd: output and input gradient, train:
output and running statistics). Inputs of huge sizes on real memory, which would try to allocate
tens of GB, and the compiled ops called directly with bad arguments run in a subprocess whose
address space is capped (RLIMIT_AS): there the process must raise, not crash or allocate.
"""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn

import resfused
from resfused import ops
from resfused import reference as R
from resfused.ops import ConvParams

from cases import BLOCK_CASES, case_id
from harness import assert_matches_reference, randomize_bn

SEED = int(os.environ.get("RESFUSED_BAD_INPUT_SEED", "20261130"))
DRAWS = 2  # random variants of each kind per target and mode
ALLOWED = (ValueError, TypeError, RuntimeError)
MODES = ("eval", "eval+grad", "train")
_TRIED: dict[str, int] = {}  # kind -> inputs tried, over the whole module


def _tried(kind: str) -> None:
    _TRIED[kind] = _TRIED.get(kind, 0) + 1


def assert_clear_error(error: BaseException, words, what: str) -> None:
    """A ValueError / TypeError / RuntimeError from resfused whose message holds every one of
    `words` (the argument and what it expected)."""
    assert isinstance(error, ALLOWED), f"{what}: {type(error).__name__} is not a clear error: {error}"
    message = str(error).lower()
    assert "resfused" in message, f"{what}: the error does not come from resfused's checks: {error}"
    for word in words:
        assert word.lower() in message, f"{what}: the message does not say {word!r}: {error}"


def _outcome(fn, failed=None):
    """(fn(), None), or (`failed`, the exception) when fn raises."""
    try:
        return fn(), None
    except Exception as error:  # compared by the caller
        return failed, error


# ---------------------------------------------------------------------------------------------
# Inputs: each kind draws (description, leaf, view, expectation, words). `view(leaf)` is the
# input (so that a gradient of an expanded or overlapping view reaches its leaf); expectation is
# "error" (must raise with `words`), "match" (the reference's result, or its error kind when the
# reference raises) or "either".


def _dense(rng: random.Random, shape, dtype=torch.float32):
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    return torch.randn(shape, generator=g).to(dtype)


def _size(rng: random.Random, in_ch: int, min_hw: int = 1):
    return rng.randint(1, 3), in_ch, rng.randint(min_hw, 9), rng.randint(min_hw, 9)


def kind_not_a_tensor(rng, in_ch, param_dtype):
    n, c, h, w = _size(rng, in_ch)
    value = rng.choice(
        [None, 3, 2.5, "x", [torch.zeros(n, c, h, w)], (torch.zeros(n, c, h, w),), np.zeros((n, c, h, w), "f4")]
    )
    return f"{type(value).__name__}", value, None, "error", ("4-D input",)


def kind_wrong_rank(rng, in_ch, param_dtype):
    rank = rng.choice((0, 1, 2, 3, 5, 6))
    shape = [rng.randint(1, 4) for _ in range(rank)]
    if rank >= 2:
        shape[1 if rank > 3 else 0] = in_ch
    return f"rank {rank}", _dense(rng, shape), None, "error", ("4-D input",)


def kind_wrong_channels(rng, in_ch, param_dtype):
    n, _, h, w = _size(rng, in_ch)
    c = rng.choice([c for c in (1, in_ch - 1, in_ch + 1, 2 * in_ch, 3) if c > 0 and c != in_ch])
    return f"{c} channels", _dense(rng, (n, c, h, w)), None, "error", (f"{in_ch} input channels",)


def _wrong_dtype(dtypes):
    def kind(rng, in_ch, param_dtype):
        dtype = rng.choice(dtypes)
        x = _dense(rng, _size(rng, in_ch))
        x = (x > 0) if dtype == torch.bool else (x * 5).to(dtype)
        return f"{dtype}", x, None, "error", ("dtype", str(param_dtype))

    return kind


kind_int_dtype = _wrong_dtype((torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64))
kind_bool_dtype = _wrong_dtype((torch.bool,))
kind_other_float_dtype = _wrong_dtype((torch.float64, torch.float16, torch.bfloat16))
kind_complex_dtype = _wrong_dtype((torch.complex64,))


def kind_meta_device(rng, in_ch, param_dtype):
    return "meta input", torch.empty(_size(rng, in_ch), device="meta"), None, "error", ("meta", "cpu")


def kind_sparse_layout(rng, in_ch, param_dtype):
    return "sparse_coo", _dense(rng, _size(rng, in_ch)).to_sparse(), None, "error", ("dense",)


def kind_onednn_layout(rng, in_ch, param_dtype):
    return "to_mkldnn()", _dense(rng, _size(rng, in_ch)).to_mkldnn(), None, "error", ("dense",)


def kind_huge_wrong_channels(rng, in_ch, param_dtype):
    # 2**33 elements or more, all aliasing one float: nothing may read it before the check.
    n, h, w = rng.choice(((1, 2**17, 2**17), (2**20, 2**8, 2**8), (2**31, 1, 4)))
    c = in_ch + rng.randint(1, 3)
    x = torch.zeros(1).as_strided((n, c, h, w), (0, 0, 0, 0))
    return f"{n}x{c}x{h}x{w} aliased", x, None, "error", (f"{in_ch} input channels",)


def kind_non_contiguous(rng, in_ch, param_dtype):
    n, c, h, w = _size(rng, in_ch)
    how = rng.choice(("step", "channel slice", "permuted", "offset"))
    if how == "step":
        big = _dense(rng, (n, c, 2 * h, 2 * w))
        return how, big, lambda t: t[:, :, ::2, ::2], "match", ()
    if how == "channel slice":
        big = _dense(rng, (n, c + 3, h, w))
        return how, big, lambda t: t[:, 2 : 2 + c], "match", ()
    if how == "permuted":  # H and W swapped in memory: strides (C*H*W, H*W, 1, H)
        big = _dense(rng, (n, c, w, h))
        return how, big, lambda t: t.transpose(2, 3), "match", ()
    big = _dense(rng, (n * c * h * w + 7,))
    return how, big, lambda t: t[7:].view(n, c, h, w), "match", ()


def kind_expanded(rng, in_ch, param_dtype):
    n, c, h, w = _size(rng, in_ch)
    dims = rng.choice(((0,), (2, 3), (0, 2), (1,)))
    small = [1 if d in dims else s for d, s in enumerate((n, c, h, w))]
    return f"expand over dims {dims}", _dense(rng, small), lambda t: t.expand(n, c, h, w), "match", ()


def kind_overlapping(rng, in_ch, param_dtype):
    n, c, h, w = _size(rng, in_ch)
    strides = (rng.randint(0, 40), rng.randint(0, 9), rng.randint(0, 5), rng.randint(0, 3))
    need = 1 + sum((s - 1) * st for s, st in zip((n, c, h, w), strides))
    return f"as_strided {strides}", _dense(rng, (need,)), lambda t: t.as_strided((n, c, h, w), strides), "match", ()


def kind_batch_zero(rng, in_ch, param_dtype):
    _, c, h, w = _size(rng, in_ch)
    return "batch 0", _dense(rng, (0, c, h, w)), None, "match", ()


def kind_zero_hw(rng, in_ch, param_dtype):
    n, c, h, w = _size(rng, in_ch)
    shape = rng.choice(((n, c, 0, w), (n, c, h, 0), (n, c, 0, 0)))
    return f"{shape}", _dense(rng, shape), None, "either", ("height and width",)


def kind_non_finite(rng, in_ch, param_dtype):
    n, c, h, w = _size(rng, in_ch, min_hw=3)
    x = _dense(rng, (n, c, h, w))
    values = []
    for _ in range(rng.randint(1, 3)):
        value = rng.choice((float("nan"), float("inf"), float("-inf")))
        x[rng.randrange(n), rng.randrange(c), rng.randrange(h), rng.randrange(w)] = value
        values.append(value)
    return f"{values}", x, None, "match", ()


BLOCK_KINDS = {
    "not a tensor": kind_not_a_tensor,
    "wrong rank": kind_wrong_rank,
    "wrong channels": kind_wrong_channels,
    "integer dtype": kind_int_dtype,
    "bool dtype": kind_bool_dtype,
    "float64 / float16 / bfloat16 for float32 parameters": kind_other_float_dtype,
    "complex dtype": kind_complex_dtype,
    "meta device for CPU parameters": kind_meta_device,
    "sparse layout": kind_sparse_layout,
    "oneDNN layout": kind_onednn_layout,
    "huge, wrong channels (aliased storage)": kind_huge_wrong_channels,
    "non-contiguous": kind_non_contiguous,
    "stride 0 (expand)": kind_expanded,
    "overlapping as_strided": kind_overlapping,
    "batch 0": kind_batch_zero,
    "H or W of 0": kind_zero_hw,
    "NaN / Inf": kind_non_finite,
}


def _run(module, leaf, view, mode):
    """(output, input gradient or None) of `module` on view(leaf) in `mode`."""
    module.train(mode == "train")
    if not isinstance(leaf, torch.Tensor) or not leaf.is_floating_point() or leaf.layout != torch.strided:
        with torch.set_grad_enabled(mode == "eval+grad"):  # the parameters' gradients, then
            return module(leaf if view is None else view(leaf)), None
    # No copy: a huge input aliases one element, and a fused module never writes its input.
    leaf = leaf.detach().requires_grad_(mode == "eval+grad")
    with torch.set_grad_enabled(mode == "eval+grad"):
        y = module(leaf if view is None else view(leaf))
        if mode != "eval+grad" or y.numel() == 0:
            return y, None
        (y.double() * torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view(y.shape)).sum().backward()
    return y, leaf.grad


def check_kind(fused, ref, kind: str, drawn, mode: str, what: str, ref64=None) -> None:
    """`drawn` on `fused` against `ref` (run in float64) in `mode`: the error it must raise, or the
    output, the input gradient (eval+grad) and the buffers (train) within tests/harness.py's rule."""
    description, leaf, view, expectation, words = drawn
    what = f"{what}, {kind} ({description}), {mode}, RESFUSED_BAD_INPUT_SEED={SEED}"
    _tried(kind)
    ref64 = copy.deepcopy(ref).double() if ref64 is None else ref64
    (actual, actual_grad), error = _outcome(lambda: _run(fused, leaf, view, mode), (None, None))
    if expectation == "error":
        assert error is not None, f"{what}: expected an error, got a result"
        assert_clear_error(error, words, what)
        return
    leaf64 = leaf.double() if isinstance(leaf, torch.Tensor) and leaf.layout == torch.strided else leaf
    (expected, expected_grad), ref_error = _outcome(lambda: _run(ref64, leaf64, view, mode), (None, None))
    if error is not None:
        if expectation == "either":
            assert_clear_error(error, words, what)
        elif ref_error is not None:  # e.g. a train-mode BatchNorm that sees one value per channel
            assert isinstance(error, ALLOWED), f"{what}: {type(error).__name__}: {error}"
        else:
            raise AssertionError(f"{what}: the reference computes it, the fused module raised {error!r}")
        return
    assert ref_error is None, f"{what}: the reference raised {ref_error!r}, the fused module returned a result"
    if expected.device.type == "meta":
        assert actual.device.type == "meta" and actual.shape == expected.shape, f"{what}: {actual} vs {expected}"
        return
    assert_matches_reference(actual, expected, torch.float32, what=f"{what}: output")
    if expected_grad is not None and kind != "NaN / Inf":  # see test_input_gradient_through_a_nan_...
        assert actual_grad is not None, f"{what}: no input gradient"
        assert_matches_reference(actual_grad, expected_grad, torch.float32, what=f"{what}: input gradient")
    if mode == "train":
        buffers64 = dict(ref64.named_buffers())
        for name, b in fused.state_dict().items():  # the original model's keys
            if name not in buffers64:
                continue
            if name.endswith("num_batches_tracked"):
                assert torch.equal(b, buffers64[name].to(b.dtype)), f"{what}: {name}"
            else:
                assert_matches_reference(b, buffers64[name], torch.float32, what=f"{what}: {name}")


def _fresh_pair(make_ref, fuse):
    ref = make_ref()
    return fuse(copy.deepcopy(ref)), ref


def _fuzz_target(make_ref, fuse, in_ch: int, what: str, rng: random.Random, modes=MODES) -> int:
    tried = 0
    fused, ref = _fresh_pair(make_ref, fuse)
    ref64 = copy.deepcopy(ref).double()
    for kind, draw in BLOCK_KINDS.items():
        for mode in modes:
            for _ in range(DRAWS):
                if mode == "train":  # changes the running statistics: a fresh pair each time
                    train_fused, train_ref = _fresh_pair(make_ref, fuse)
                    check_kind(train_fused, train_ref, kind, draw(rng, in_ch, torch.float32), mode, what)
                else:  # eval modes leave both modules as they were (but for parameter .grad)
                    check_kind(fused, ref, kind, draw(rng, in_ch, torch.float32), mode, what, ref64)
                tried += 1
    return tried


def _block_ref(name, args, index):
    def make():
        return randomize_bn(getattr(R, name)(*args), torch.Generator().manual_seed(index)).eval()

    return make


@pytest.mark.parametrize("index", range(len(BLOCK_CASES)), ids=[case_id(c) for c in BLOCK_CASES])
def test_blocks_reject_or_compute_bad_inputs(index):
    name, args = BLOCK_CASES[index]
    rng = random.Random(SEED * 1009 + index)
    tried = _fuzz_target(
        _block_ref(name, args, index), getattr(resfused, name).from_reference, args[0], f"{name}{args}", rng
    )
    print(f"{name}{args}: {tried} bad inputs, {len(BLOCK_KINDS)} kinds x {len(MODES)} modes x {DRAWS}")


def test_converted_model_rejects_or_computes_bad_inputs():
    tv = pytest.importorskip("torchvision")

    def make():
        return randomize_bn(tv.models.resnet18(weights=None, num_classes=10)).eval()

    rng = random.Random(SEED + 1)
    # A converted resnet18's input goes to its stem (ConvBNAct, 3 channels), then its stages.
    # Eval modes only: in train mode, batch statistics over the few values a small input leaves at
    # layer3 / layer4 are ill-conditioned in float32 itself (eager float32 differs from float64 by
    # ~0.2 of max|y| on a resnet18 at 5x7 pixels, batch 2), so no float64 rule can judge them.
    tried = _fuzz_target(make, resfused.fuse, 3, "fused resnet18", rng, modes=("eval", "eval+grad"))
    print(f"fused resnet18: {tried} bad inputs")


@pytest.mark.parametrize("kind", ["sparse layout", "oneDNN layout"])
@pytest.mark.parametrize("index", [1, 5])
def test_blocks_reject_other_layouts_clearly(index, kind):
    name, args = BLOCK_CASES[index]
    rng = random.Random(SEED * 7 + index)
    fused, ref = _fresh_pair(_block_ref(name, args, index), getattr(resfused, name).from_reference)
    check_kind(fused, ref, kind, BLOCK_KINDS[kind](rng, args[0], torch.float32), "eval", name)


@pytest.mark.parametrize("mode", MODES)
def test_huge_meta_inputs_give_the_reference_shapes(mode):
    """Shapes past 2**31 elements (and past 2**31 in one dimension) on the meta device: the fused
    blocks' shape logic must give the reference's output shape, allocating nothing."""
    for index in (1, 5, 7, 10):
        name, args = BLOCK_CASES[index]
        ref = getattr(R, name)(*args).eval()
        fused = getattr(resfused, name).from_reference(copy.deepcopy(ref)).to("meta")
        ref = ref.to("meta")
        for shape in ((1, args[0], 2**16 + 3, 2**16 + 1), (2**31 + 5, args[0], 1, 1), (3, args[0], 2**31 + 1, 2)):
            x = torch.empty(shape, device="meta")
            kind = "huge, meta device"
            check_kind(fused, ref, kind, (f"{shape}", x, None, "match", ()), mode, f"{name}{args}")


# ---------------------------------------------------------------------------------------------
# The op API (resfused.ops) called directly.


def _conv_params(rng, c_in=8, c_out=8, k=3, stride=1):
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False)
    bn = randomize_bn(nn.BatchNorm2d(c_out), torch.Generator().manual_seed(rng.randrange(2**31))).eval()
    return ConvParams.from_modules(conv, bn), conv, bn


def _op_cases(rng: random.Random):
    """(kind, call, expected result or None, words): `call()` must raise a clear error with `words`
    when expected is None, else return `expected` (computed in float64) within tolerance."""
    p, conv, bn = _conv_params(rng)
    n, h, w = rng.randint(1, 3), rng.randint(3, 9), rng.randint(3, 9)
    x = _dense(rng, (n, 8, h, w))
    r = _dense(rng, (n, 8, h, w))
    one = torch.ones(8)

    def conv64(x_, residual=None, relu=False):
        y = torch.nn.functional.conv2d(x_.double(), p.weight.double(), p.bias.double(), p.stride, p.padding)
        y = y if residual is None else y + residual.double()
        return torch.relu(y) if relu else y

    bad_values = [None, 1, "x", [1.0], np.ones(3)]
    cases = [
        ("conv_bias_act: x not a tensor", lambda: ops.conv_bias_act(rng.choice(bad_values), p), None, ("'x'",)),
        ("conv_bias_act: x of rank 3", lambda: ops.conv_bias_act(x[0], p), None, ("'x'", "rank 4")),
        ("conv_bias_act: x wrong channels", lambda: ops.conv_bias_act(x[:, :5], p), None, ("'x'", "8 channels")),
        ("conv_bias_act: x integer", lambda: ops.conv_bias_act(x.int(), p), None, ("'x'", "floating-point")),
        ("conv_bias_act: x bool", lambda: ops.conv_bias_act(x > 0, p), None, ("'x'", "floating-point")),
        ("conv_bias_act: x float64, weight float32", lambda: ops.conv_bias_act(x.double(), p), None, ("'x'", "dtype")),
        ("conv_bias_act: x on meta", lambda: ops.conv_bias_act(x.to("meta"), p), None, ("'x'", "meta")),
        ("conv_bias_act: x sparse", lambda: ops.conv_bias_act(x.to_sparse(), p), None, ("'x'", "dense")),
        (
            "conv_bias_act: residual of another shape",
            lambda: ops.conv_bias_act(x, p, residual=r[:, :, 1:]),
            None,
            ("'residual'", "shape"),
        ),
        (
            "conv_bias_act: residual broadcastable only",
            lambda: ops.conv_bias_act(x, p, residual=r[:1, :, :1, :1]),
            None,
            ("'residual'", "shape"),
        ),
        (
            "conv_bias_act: residual float64",
            lambda: ops.conv_bias_act(x, p, residual=r.double()),
            None,
            ("'residual'", "dtype"),
        ),
        ("conv_bias_act: residual on meta", lambda: ops.conv_bias_act(x, p, residual=r.to("meta")), None, ("meta",)),
        (
            "conv_bias_act: residual not a tensor",
            lambda: ops.conv_bias_act(x, p, residual=rng.choice(bad_values[1:])),
            None,
            ("'residual'",),
        ),
        (
            "conv_bias_act: prologue of the wrong length",
            lambda: ops.conv_bias_act(x, p, prologue=(one[:5], one)),
            None,
            ("'prologue scale'", "shape"),
        ),
        (
            "conv_bias_act: prologue integer",
            lambda: ops.conv_bias_act(x, p, prologue=(one, one.int())),
            None,
            ("'prologue shift'", "floating-point"),
        ),
        (
            "conv_bias_act: non-contiguous x and residual, ReLU",
            lambda: ops.conv_bias_act(x.transpose(2, 3), p, residual=r.transpose(2, 3), relu=True),
            conv64(x.transpose(2, 3), r.transpose(2, 3), relu=True),
            (),
        ),
        (
            "conv_bias_act: expanded x",
            lambda: ops.conv_bias_act(x[:1, :, :1].expand(n, 8, h, w), p, relu=True),
            conv64(x[:1, :, :1].expand(n, 8, h, w), relu=True),
            (),
        ),
        (
            "conv_bias_act: NaN in x, ReLU",
            lambda: ops.conv_bias_act(_with_nan(x, rng), p, relu=True),
            None,  # filled in below (needs the same NaN positions)
            (),
        ),
        (
            "conv_bias_act: batch 0",
            lambda: ops.conv_bias_act(x[:0], p, residual=r[:0], relu=True),
            conv64(x[:0], r[:0], relu=True),
            (),
        ),
        ("add_relu: not tensors", lambda: ops.add_relu(rng.choice(bad_values), r), None, ("'x'",)),
        ("add_relu: shapes differ", lambda: ops.add_relu(x, r[:, :, 1:]), None, ("'residual'", "shape")),
        ("add_relu: broadcasting", lambda: ops.add_relu(x, r[:1, :, :1, :1]), None, ("'residual'", "shape")),
        ("add_relu: dtypes differ", lambda: ops.add_relu(x, r.double()), None, ("'residual'", "dtype")),
        ("add_relu: devices differ", lambda: ops.add_relu(x, r.to("meta")), None, ("'residual'", "meta")),
        ("add_relu: integer", lambda: ops.add_relu(x.long(), r.long()), None, ("'x'", "floating-point")),
        ("add_relu: rank 1", lambda: ops.add_relu(x.flatten(), r.flatten()), None, ("'x'", "rank")),
        ("add_relu: oneDNN layout", lambda: ops.add_relu(x.to_mkldnn(), r.to_mkldnn()), None, ("'x'", "dense")),
        (
            "add_relu: overlapping and expanded",
            lambda: ops.add_relu(x[:, :1].expand(n, 8, h, w), r.as_strided((n, 8, h, w), (3, 1, 2, 1))),
            torch.relu(x[:, :1].expand(n, 8, h, w).double() + r.as_strided((n, 8, h, w), (3, 1, 2, 1)).double()),
            (),
        ),
        ("add_relu: batch 0", lambda: ops.add_relu(x[:0], r[:0]), torch.relu(x[:0] + r[:0]).double(), ()),
        (
            "scale_shift_act: scale of the wrong length",
            lambda: ops.scale_shift_act(x, one[:3], one),
            None,
            ("'scale'", "shape [8]"),
        ),
        ("scale_shift_act: 2-D shift", lambda: ops.scale_shift_act(x, one, one[None]), None, ("'shift'", "shape")),
        (
            "scale_shift_act: integer scale",
            lambda: ops.scale_shift_act(x, one.long(), one),
            None,
            ("'scale'", "floating-point"),
        ),
        ("scale_shift_act: scale on meta", lambda: ops.scale_shift_act(x, one.to("meta"), one), None, ("'scale'",)),
        (
            "scale_shift_act: float64 scale for float32 x",
            lambda: ops.scale_shift_act(x, one.double() * 1.5, one * 0.25),
            torch.relu(x.double() * 1.5 + 0.25),
            (),
        ),
        ("batch_norm_act: bn not a BatchNorm", lambda: ops.batch_norm_act(x, conv, True), None, ("'bn'", "BatchNorm")),
        ("batch_norm_act: bn None", lambda: ops.batch_norm_act(x, None, True), None, ("'bn'", "BatchNorm")),
        ("batch_norm_act: wrong channels", lambda: ops.batch_norm_act(x[:, :3], bn, True), None, ("'x'", "8 channels")),
        ("conv2d_train: conv not a Conv2d", lambda: ops.conv2d_train(x, bn), None, ("'conv'", "nn.Conv2d")),
        ("conv2d_train: wrong channels", lambda: ops.conv2d_train(x[:, :7], conv), None, ("'x'", "8 channels")),
        ("conv2d_train: integer x", lambda: ops.conv2d_train(x.int(), conv), None, ("'x'", "floating-point")),
        ("conv2d_train: float64 x", lambda: ops.conv2d_train(x.double(), conv), None, ("'x'", "dtype")),
        ("fuse: not a module", lambda: resfused.fuse(rng.choice(bad_values)), None, ("'model'", "nn.Module")),
        ("fuse: inplace not a bool", lambda: resfused.fuse(nn.Sequential(), inplace="yes"), None, ("'inplace'",)),
    ]
    return cases


def _with_nan(x, rng):
    x = x.clone()
    x.view(-1)[rng.randrange(x.numel())] = float("nan")
    return x


def test_input_gradient_through_a_nan_matches_the_reference():
    name, args = BLOCK_CASES[0]
    fused, ref = _fresh_pair(_block_ref(name, args, 0), getattr(resfused, name).from_reference)
    x = torch.randn(2, 8, 6, 6)
    x[0, 3, 2, 2] = float("nan")
    # Output and input gradient against the float64 reference.
    check_kind(fused, ref, "NaN in eval with autograd", ("one NaN", x, None, "match", ()), "eval+grad", name)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_train_batch_norm_of_a_non_finite_channel_matches_the_reference(value):
    _tried("NaN / Inf in train-mode BatchNorm")
    bn, bn64 = nn.BatchNorm2d(4).train(), nn.BatchNorm2d(4).double().train()
    x = torch.randn(3, 4, 5, 5)
    x[1, 2, 0, 0] = value
    with torch.no_grad():
        y = ops.batch_norm_act(x, bn, relu=True)
        y64 = torch.relu(bn64(x.double()))
    assert_matches_reference(bn.running_mean, bn64.running_mean, torch.float32, what="running_mean")
    assert_matches_reference(bn.running_var, bn64.running_var, torch.float32, what="running_var")
    assert_matches_reference(y, y64, torch.float32, what="output")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_ops_reject_or_compute_bad_arguments(backend):
    rng = random.Random(SEED + 3)
    count = 0
    with resfused.use_backend(backend), torch.no_grad():
        for _ in range(DRAWS):
            for kind, call, expected, words in _op_cases(rng):
                what = f"{kind} (backend {backend}, RESFUSED_BAD_INPUT_SEED={SEED})"
                _tried(kind)
                count += 1
                if kind == "conv_bias_act: NaN in x, ReLU":
                    p, _, _ = _conv_params(rng)
                    x = _with_nan(_dense(rng, (2, 8, 5, 5)), rng)
                    y64 = torch.relu(
                        torch.nn.functional.conv2d(x.double(), p.weight.double(), p.bias.double(), padding=1)
                    )
                    assert_matches_reference(ops.conv_bias_act(x, p, relu=True), y64, torch.float32, what=what)
                    continue
                result, error = _outcome(call)
                if expected is None:
                    assert error is not None, f"{what}: expected an error, got a result"
                    assert_clear_error(error, words, what)
                else:
                    assert error is None, f"{what}: raised {error!r}"
                    assert_matches_reference(result, expected, torch.float32, what=what)
    print(f"ops, backend {backend}: {count} bad calls")


@pytest.mark.parametrize("bad", ["conv", "None", "prologue"])
def test_conv_bias_act_rejects_a_wrong_params_argument_clearly(bad):
    p, conv, _ = _conv_params(random.Random(SEED))
    x = torch.randn(2, 8, 5, 5)
    _tried(f"conv_bias_act: p is {bad}")
    with pytest.raises(ALLOWED) as info:
        if bad == "prologue":
            ops.conv_bias_act(x, p, prologue=(torch.ones(8),))
        else:
            ops.conv_bias_act(x, conv if bad == "conv" else None)
    assert_clear_error(info.value, ("'p'",) if bad != "prologue" else ("'prologue'",), bad)


# ---------------------------------------------------------------------------------------------
# In a subprocess with a capped address space: huge inputs on real memory, and the compiled ops
# called with bad arguments. Each call prints one JSON line: its kind and the error type and
# message, or "ok".

_SUBPROCESS = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    import resfused
    from resfused import reference as R

    torch.manual_seed(0)
    block = resfused.Bottleneck.from_reference(R.Bottleneck(16, 8, 2)).eval()
    with torch.no_grad():
        block(torch.randn(2, 16, 8, 8))  # kernels loaded, weights packed: what follows allocates only data
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * resource.getpagesize()
    cap = mapped + (1 << 30)  # 1 GiB beyond what is mapped now: the huge tensors below need tens of GB
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    def attempt(kind, fn):
        try:
            y = fn()
            print(json.dumps({"kind": kind, "result": "ok", "shape": list(getattr(y, "shape", ()))}), flush=True)
        except Exception as e:
            allowed = isinstance(e, (ValueError, TypeError, RuntimeError))  # NotImplementedError is one
            print(json.dumps({"kind": kind, "result": type(e).__name__, "allowed": allowed, "message": str(e)[:300]}),
                  flush=True)

    def aliased(shape):
        return torch.zeros(1).as_strided(shape, [0] * len(shape))

    x = torch.randn(2, 8, 5, 5)
    w = torch.randn(8, 2, 3, 3)
    ops = torch.ops.resfused
    with torch.no_grad():
        attempt("huge aliased input to a block, 2**34 elements", lambda: block(aliased((1, 16, 2**15, 2**15))))
        attempt("huge aliased input to a block, batch 2**31", lambda: block(aliased((2**31, 16, 1, 1))))
        attempt("huge aliased operands to add_relu", lambda: resfused.ops.add_relu(aliased((2**31, 2, 2, 2)),
                                                                                  aliased((2**31, 2, 2, 2))))
        attempt("huge aliased operand to scale_shift_act",
                lambda: resfused.ops.scale_shift_act(aliased((2**20, 8, 2**10, 2)), torch.ones(8), torch.ones(8)))
        attempt("raw add_relu: shapes differ", lambda: ops.add_relu(x, x[:, :, 1:]))
        attempt("raw add_relu: dtypes differ", lambda: ops.add_relu(x, x.double()))
        attempt("raw add_relu: integer", lambda: ops.add_relu(x.int(), x.int()))
        v = x[0, 0, 0]  # 5 values for 8 channels
        attempt("raw scale_shift_act: scale of the wrong length", lambda: ops.scale_shift_act(x, v, v, True))
        attempt("raw scale_shift_act: rank 1", lambda: ops.scale_shift_act(v, v, v, True))
        attempt("raw grouped_conv3x3: stride 0", lambda: ops.grouped_conv3x3(x, w, None, 0, True))
        w5 = torch.randn(8, 2, 5, 5)
        attempt("raw grouped_conv3x3: 5x5 weight", lambda: ops.grouped_conv3x3(x, w5, None, 1, True))
        attempt("raw grouped_conv3x3: channels not a multiple of the group width",
                lambda: ops.grouped_conv3x3(x[:, :7], w, None, 1, True))
        attempt("raw grouped_conv3x3: bias of the wrong length",
                lambda: ops.grouped_conv3x3(x, w, torch.ones(3), 1, True))
        attempt("raw grouped_conv3x3: H of 0", lambda: ops.grouped_conv3x3(x[:, :, :0], w, None, 1, True))
        attempt("raw bn_train_act: eps < 0", lambda: ops.bn_train_act(x, torch.ones(8), torch.zeros(8), -1.0, True))
        attempt("raw bn_train_act: one value per channel",
                lambda: ops.bn_train_act(x[:1, :, :1, :1], torch.ones(8), torch.zeros(8), 1e-5, True))
        attempt("raw bn_train_act: weight of the wrong length",
                lambda: ops.bn_train_act(x, torch.ones(3), torch.zeros(8), 1e-5, True))
        attempt("raw winograd_f43_input: integer", lambda: ops.winograd_f43_input(x.int()))
        attempt("raw winograd_f43_input: rank 3", lambda: ops.winograd_f43_input(x[0]))
        attempt("raw winograd_f43_output: wrong tile count",
                lambda: ops.winograd_f43_output(torch.randn(3, 36, 8), 1, 5, 5, None, None, True))
        attempt("raw winograd_f43_output: h of 0",
                lambda: ops.winograd_f43_output(torch.randn(4, 36, 8), 1, 0, 5, None, None, True))
        attempt("raw all_finite: integer", lambda: ops.all_finite(x.int()))
        attempt("raw all_finite: meta", lambda: ops.all_finite(x.to("meta")))
        attempt("raw scale_add_relu: gate of the wrong shape",
                lambda: ops.scale_add_relu(x, torch.ones(2, 3), x))
        attempt("raw scale_add_relu: rank 3", lambda: ops.scale_add_relu(x[0], torch.ones(2, 8), x[0]))
    print(json.dumps({"kind": "done"}), flush=True)
    """
)


def test_huge_inputs_and_raw_ops_raise_in_a_capped_process():
    """Never a crash: the subprocess must exit normally, and every call must raise a RuntimeError
    (an allocation the cap refuses, or the op's own check naming its argument) or, for a huge
    input, one of the allowed errors. A crash (segfault, abort) shows as the return code."""
    proc = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS], capture_output=True, text=True, timeout=600, cwd=os.getcwd()
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, f"the subprocess died (return code {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    assert lines and lines[-1]["kind"] == "done", f"the subprocess stopped early:\n{proc.stdout}\n{proc.stderr}"
    for line in lines[:-1]:
        kind = line["kind"]
        _tried(kind)
        assert line["result"] != "ok" and line["allowed"], f"{kind}: {line}"
        if kind.startswith("raw "):
            # The compiled ops' own checks: TORCH_CHECK messages that name the op.
            assert "resfused" in line["message"] or "value per channel" in line["message"], f"{kind}: {line}"
    print(f"capped subprocess: {len(lines) - 1} calls, every one raised")


@pytest.fixture(scope="module", autouse=True)
def _report_kinds_tried(request):
    """After the module: how many kinds of bad input were tried, and how many inputs and calls
    (printed past pytest's output capture; each kind with its count under -v)."""
    yield
    if not _TRIED:
        return
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\nbad-input fuzzing: {len(_TRIED)} kinds tried, {sum(_TRIED.values())} inputs and calls")
        if request.config.getoption("verbose") > 0:
            for kind, count in sorted(_TRIED.items()):
                print(f"  {count:5d}  {kind}")
