"""Differential testing against the float64 reference, with the tolerances of docs/design.md, Numerics.

    float32 (and float64): max|ours - ref| <= 1e-4 * max|ref|     (TF32 off)
    float16 / bfloat16:    max|ours - ref| <= 2 * max|eager - ref| + eps * max|ref|

over the finite elements of ref; a NaN, +Inf or -Inf must sit where ref has the same.

`ref` is the computation in float64; `eager` is the same computation done by eager PyTorch in
the low-precision dtype. On failure the message says where and by how much the tensors differ.
"""

from __future__ import annotations

import copy

import torch

FP32_RTOL = 1e-4
LOWP_EPS = {torch.float16: 1e-3, torch.bfloat16: 8e-3}  # one rounding step of the output dtype


def describe_difference(actual: torch.Tensor, expected: torch.Tensor, limit: float | None = None) -> str:
    """Where and how much two tensors differ: max error, its index, values there, how many exceed `limit`."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.shape != e.shape:
        return f"shape mismatch: actual {tuple(a.shape)} vs expected {tuple(e.shape)}"
    if a.numel() == 0:
        return "empty tensors"
    mismatch = _non_finite_mismatch(a, e)
    if mismatch.any():
        idx = tuple(int(i) for i in mismatch.nonzero()[0])
        return (
            f"NaN/Inf pattern differs: {int(mismatch.sum())} elements, first at {idx}: "
            f"actual {a[idx].item()} expected {e[idx].item()}"
        )
    diff = torch.where(e.isfinite(), (a - e).abs(), torch.zeros_like(a))
    flat = int(diff.argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape))
    msg = (
        f"max abs diff {diff.max().item():.3e} at index {idx} "
        f"(actual {a[idx].item():.6g}, expected {e[idx].item():.6g}); "
        f"max|expected| {e.abs().max().item():.3e}; shape {tuple(a.shape)}"
    )
    if limit is not None:
        msg += f"; {int((diff > limit).sum())} of {diff.numel()} elements exceed the limit {limit:.3e}"
    return msg


def _non_finite_mismatch(a: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Where a NaN, +Inf or -Inf of one tensor is not the same in the other."""
    return (a.isnan() != e.isnan()) | (a.isposinf() != e.isposinf()) | (a.isneginf() != e.isneginf())


def _max_abs(t: torch.Tensor) -> float:
    """max |t| over its finite elements (the scale of the tolerance; NaN/Inf must match exactly)."""
    t = t.detach().double()
    t = t[t.isfinite()]
    return float(t.abs().max()) if t.numel() else 0.0


def tolerance(expected64: torch.Tensor, dtype: torch.dtype, eager: torch.Tensor | None = None) -> float:
    """The allowed max abs error for a result of `dtype` against the float64 reference."""
    scale = _max_abs(expected64)
    if dtype in (torch.float32, torch.float64):
        return FP32_RTOL * scale
    if eager is None:
        raise ValueError("float16/bfloat16 tolerances need the eager same-dtype result")
    eager_err = _max_abs(eager.double() - expected64.double())
    return 2.0 * eager_err + LOWP_EPS[dtype] * scale


def assert_matches_reference(actual, expected64, dtype=None, eager=None, what: str = "") -> None:
    """Assert the tolerances of docs/design.md, Numerics, for `actual` against the float64 `expected64`."""
    dtype = dtype or actual.dtype
    assert actual.shape == expected64.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    limit = tolerance(expected64, dtype, eager)
    a, e = actual.detach().double().cpu(), expected64.detach().double().cpu()
    assert not _non_finite_mismatch(a, e).any(), f"{what}: " + describe_difference(a, e, limit)
    finite = e.isfinite()
    err = float((a[finite] - e[finite]).abs().max()) if finite.any() else 0.0
    assert err <= limit, f"{what}: " + describe_difference(a, e, limit)


def randomize_bn(module: torch.nn.Module, generator: torch.Generator | None = None) -> torch.nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters (fresh BN is the identity)."""
    g = generator or torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return module


def compare_modules(
    fused: torch.nn.Module, reference: torch.nn.Module, x: torch.Tensor, what: str = ""
) -> torch.Tensor:
    """Run `fused` on x (its dtype) and `reference` in float64 and in x's dtype; assert §5. Returns fused(x)."""
    # The reference sees what the fused module sees: parameters rounded to x's dtype, then float64.
    ref64 = copy.deepcopy(reference).to(x.dtype).double()
    with torch.no_grad():
        expected = ref64(x.detach().double())
        eager = None
        if x.dtype in LOWP_EPS:
            eager = copy.deepcopy(reference).to(x.dtype)(x)
        actual = fused(x)
    assert_matches_reference(actual, expected, x.dtype, eager, what or type(fused).__name__)
    return actual


def forward_backward(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor | None):
    """Forward, and a backward of `grad` when given; returns (output, {name: gradient} with the
    input's as "input", {buffer name: value}) for comparing a fused module with its reference."""
    x = x.detach().clone().requires_grad_(grad is not None)
    y = module(x)
    if grad is None:
        return y, {}, {}
    y.backward(grad)
    grads = {"input": x.grad} | {n: p.grad for n, p in module.named_parameters()}
    return y, grads, {n: b.clone() for n, b in module.named_buffers()}


def original_stem_names(named: dict) -> dict:
    """A fused torchvision ResNet's {name: tensor} (parameters, gradients) with the stem under the
    original model's names: fuse() puts conv1 + bn1 into one ConvBNAct at conv1 (conv1.conv.*,
    conv1.bn.*); its state_dict keeps the original keys, named_parameters() does not."""
    stem = {"conv1.conv.": "conv1.", "conv1.bn.": "bn1."}
    out = {}
    for key, value in named.items():
        for new, old in stem.items():
            key = old + key[len(new) :] if key.startswith(new) else key
        out[key] = value
    return out


def compare_step(fused: torch.nn.Module, reference: torch.nn.Module, x: torch.Tensor, mode: str, what: str):
    """`fused` and `reference` (run in float64) on float32 `x`: in "eval" a forward without autograd,
    otherwise a forward and a backward of one random output gradient. Asserts the output, every
    gradient and every buffer against the float64 result; returns fused's trace_kernels() record."""
    from resfused.ops import trace_kernels

    with torch.no_grad():
        shape = copy.deepcopy(reference).double()(x.double()).shape
    g = None if mode == "eval" else torch.randn(shape)
    with torch.set_grad_enabled(g is not None), trace_kernels() as ran:
        y, grads, buffers = forward_backward(fused, x, g)
    y64, grads64, buffers64 = forward_backward(
        copy.deepcopy(reference).double(), x.double(), None if g is None else g.double()
    )
    assert_matches_reference(y, y64, torch.float32, what=what)
    for key, expected in grads64.items():
        assert_matches_reference(grads[key], expected, torch.float32, what=f"{what} grad {key}")
    for key, expected in buffers64.items():
        assert_matches_reference(buffers[key].double(), expected, torch.float32, what=f"{what} buffer {key}")
    return ran
