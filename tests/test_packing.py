"""Packed oneDNN weights per input shape (resfused/runtime/packing.py) and the kernels that use them."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from resfused.kernels import winograd_f43
from resfused.kernels.base import ConvParams
from resfused.kernels.conv_onednn import SUPPORTED_DTYPES, OneDNNConv
from resfused.runtime import packing

from harness import assert_matches_reference


def test_packs_once_per_shape_and_keeps_the_most_recently_used():
    made = []
    cache = packing.PackedByShape(lambda shape: made.append(shape) or torch.tensor(len(made)), keep=2)
    assert cache((1,)).item() == 1 and cache((1,)).item() == 1  # a hit packs nothing
    assert cache((2,)).item() == 2
    assert cache((1,)).item() == 1  # (1,) is now the most recently used...
    assert cache((3,)).item() == 3  # ...so (2,) is the one dropped
    assert cache.shapes() == [(1,), (3,)]
    assert cache((2,)).item() == 4  # packed again
    assert made == [(1,), (2,), (3,), (2,)]


def test_concurrent_callers_each_get_their_shapes_copy():
    cache = packing.PackedByShape(lambda shape: torch.tensor(shape[0]), keep=4)
    errors = []

    def worker(offset):
        try:
            for i in range(300):
                s = (i + offset) % 6  # six shapes through four slots: constant eviction
                assert cache((s,)).item() == s
        except Exception as e:  # noqa: BLE001  (reported below, not swallowed)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(cache.shapes()) == 4


needs_onednn = pytest.mark.skipif(torch.float32 not in SUPPORTED_DTYPES, reason="torch built without oneDNN")


@needs_onednn
def test_onednn_conv_packs_per_batch_size_and_stays_correct():
    # The 1x1 shape whose oneDNN layout differs between batch 1 and batch 8 (see runtime/packing.py).
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(1024, 256, 1, 1, generator=g) / 16, torch.randn(1024, generator=g)
    p, conv = ConvParams(w, b, (1, 1), (0, 0), (1, 1), 1), OneDNNConv()
    for n in (1, 8, 1, 3):
        x = torch.randn(n, 256, 14, 14, generator=g).contiguous(memory_format=torch.channels_last)
        r = torch.randn(n, 1024, 14, 14, generator=g).contiguous(memory_format=torch.channels_last)
        y = conv.run(x, p, r, True, None)
        assert_matches_reference(
            y,
            (F.conv2d(x.double(), w.double(), b.double()) + r.double()).relu(),
            torch.float32,
            what=f"1x1 conv + add + ReLU at batch {n}",
        )
    # Batch 1 and larger batches have copies of their own; 3 and 8 share one.
    assert p.kernel_state[conv.name].shapes() == [(1, 256, 14, 14), (2, 256, 14, 14)]


@needs_onednn
@pytest.mark.parametrize(
    "k, stride, hw, c_out",
    [
        (1, 1, (1, 1), 16),
        (3, 1, (1, 1), 16),
        (3, 2, (2, 2), 16),
        (1, 2, (2, 2), 16),
        (3, 1, (1, 2), 1),
        (3, 1, (3, 3), 1),
    ],
)
def test_onednn_conv_adds_the_residual_into_an_ambiguous_layout(k, stride, hw, c_out):
    # torch 2.11's out-of-place binary post-op fails on an output that is both contiguous and
    # channels_last (1x1 pixels or one channel): "could not create a memory". The kernel must
    # compute it, leaving the residual unchanged.
    g = torch.Generator().manual_seed(k + stride + c_out)
    w, b = torch.randn(c_out, 8, k, k, generator=g) / 4, torch.randn(c_out, generator=g)
    p, conv = ConvParams(w, b, (stride, stride), (k // 2, k // 2), (1, 1), 1), OneDNNConv()
    x = torch.randn(2, 8, *hw, generator=g).contiguous(memory_format=torch.channels_last)
    expected = F.conv2d(x.double(), w.double(), b.double(), stride, k // 2)
    r = torch.randn(expected.shape, generator=g).float().contiguous(memory_format=torch.channels_last)
    r_before = r.clone()
    y = conv.bind(x, p, True, True, None)(x, r)
    what = f"{k}x{k}/{stride} conv + add + ReLU, {c_out} channel(s) at {tuple(expected.shape[2:])}"
    assert_matches_reference(y, (expected + r.double()).relu(), torch.float32, what=what)
    assert torch.equal(r, r_before)


@pytest.mark.skipif(torch.bfloat16 not in SUPPORTED_DTYPES, reason="oneDNN has no bfloat16 conv on this CPU")
@pytest.mark.parametrize("k", [3, 7])
@pytest.mark.parametrize("width", [1, 2])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("residual", ["none", "add", "into"])
def test_onednn_bf16_strided_conv_with_one_output_column_reads_no_stale_memory(k, width, layout, residual):
    # torch 2.14.1's oneDNN bf16 conv (eager F.conv2d too) returned garbage for a strided, padded
    # conv with one output column on AVX-512 BF16 / AMX: it read memory it never wrote. Freed
    # memory is filled with huge values first, so a read of it shows; the kernel must match float64.
    g = torch.Generator().manual_seed(k * 10 + width)
    w, b = torch.randn(16, 12, k, k, generator=g) / k, torch.randn(16, generator=g)
    p = ConvParams(w.bfloat16(), b.bfloat16(), (2, 2), (k // 2, k // 2), (1, 1), 1)
    x = torch.randn(3, 12, 9, width, generator=g).bfloat16().contiguous(memory_format=layout)
    expected = F.conv2d(x.double(), p.weight.double(), p.bias.double(), 2, k // 2)
    r = torch.randn(expected.shape, generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
    if residual != "none":
        expected = expected + r.double()
    # The harness scales bf16 limits by eager bf16's own error, and eager bf16 is what is broken
    # here: a bf16 conv computed correctly (float32 math, one rounding) stands in for it.
    eager = expected.float().relu().bfloat16()
    for _ in range(5):
        junk = [torch.full((n,), 3e35, dtype=torch.bfloat16) for n in (180, 360, 648, 1024, 4096)]
        del junk
        conv = OneDNNConv()
        if residual == "into":
            y = conv.bind_into_residual(x, p, True, None)(x, r.clone())
        else:
            y = conv.bind(x, p, residual == "add", True, None)(x, r if residual == "add" else None)
        what = f"bf16 {k}x{k}/2 conv on width {width}, {layout}, residual {residual}"
        assert_matches_reference(y, expected.relu(), torch.bfloat16, eager, what=what)


@needs_onednn
def test_winograd_conv_packs_per_power_of_two_images_per_pass(monkeypatch):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 8, 3, 3, generator=g)
    u = winograd_f43.TransformedWeight(w)
    monkeypatch.setattr(winograd_f43, "_PASS_BYTES", 4 * 36 * 4 * 8 * 4)  # 4 images of 4 tiles per pass
    for n in (1, 3, 2, 6, 4):
        x = torch.randn(n, 8, 8, 8, generator=g)
        assert_matches_reference(
            winograd_f43.conv3x3(x, u),
            F.conv2d(x.double(), w.double(), padding=1),
            torch.float32,
            what=f"conv3x3 at batch {n}",
        )
    # batch 1 -> 1 image per pass, 3 and 2 -> 2, 6 and 4 -> 4 (the ragged last passes included).
    assert u.packed.shapes() == [(1, 288, 1, 4), (1, 288, 1, 8), (1, 288, 1, 16)]


@needs_onednn
def test_winograd_gemm_packs_per_pass_height():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 8, 3, 3, generator=g, dtype=torch.float64)
    u = winograd_f43.TransformedWeight(w.float())
    for t in (5, 12, 5):
        v = torch.randn(t, 36, 8, generator=g, dtype=torch.float64)
        expected = torch.einsum("tec,eoc->teo", v, winograd_f43.transform_weight(w).view(36, 16, 8))
        assert_matches_reference(u.gemm(v.float()), expected, torch.float32, what=f"GEMM at T = {t}")
    assert u.packed.shapes() == [(1, 288, 1, 12), (1, 288, 1, 5)]
