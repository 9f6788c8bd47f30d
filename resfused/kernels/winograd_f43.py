"""Winograd F(4x4, 3x3): a 3x3, stride-1, padding-1, ungrouped convolution with 2.25 multiplies
per output and input channel instead of 9.

Per 4x4 output tile, with d the 6x6 input window around it (zero padded by 1):

    Y = A^T [ (G w G^T) (.) (B^T d B) ] A          ((.): elementwise over the 6x6 positions e)

Summed over input channels, the elementwise products become, for each of the 36 positions e, a
GEMM over tiles and channels, so a conv is three steps:

    forward       V = input(x)              [T, 36, C_in]      (B^T d B, csrc/cpu/winograd_f43.cpp)
                  M[:, e] = V[:, e] @ U[e]  [T, 36, C_out]     (TransformedWeight.gemm; U = G w G^T)
                  y = output(M) + bias ...  (A^T M A, then bias, residual, ReLU in the same pass)
    grad input    the forward applied to grad with w'[ci, co] = w[co, ci] rotated by 180 degrees
                  (the adjoint of a padding-1 3x3 correlation)
    grad weight   Z = grad_output(grad)     [T, 36, C_out]     (A g A^T: the adjoint of A^T . A)
                  dU[e] = Z[:, e]^T @ V[:, e]  [36, C_out, C_in]
                  dw = G^T dU G             (the adjoint of the weight transform)

The 36 GEMMs of the forward are one grouped 1x1 convolution in oneDNN (36 groups over a 1 x T
image of 36 * C channels, which is what the [T, 36, C] layout is), with U packed once into
oneDNN's blocked layout: measured 1.2-1.7x the GFLOP/s of torch.bmm on the same matrices.

All three are exact in real arithmetic (Y is linear in U = G w G^T, so dL/dU = sum over tiles of
V (.) Z, and dL/dw follows through G). The points 0, -1, 1, 1/2, -2 and infinity were chosen by
measuring float32 error against a float64 direct conv: about 3x below the common 0, +-1, +-2
(docs/design.md, Numerics, allows 1e-4). The matrices follow from the points by Toom-Cook
interpolation; the C++ file holds B^T and A^T, this file G.

Why not the larger F(6x6, 3x3) (1.78 multiplies per output and channel instead of 2.25): in a
float32 simulation its error against float64 was 4-5x F(4x4, 3x3)'s, too little margin to the
1e-4 tolerance for one conv before a model chains 16 of them. And ResNet's 56, 28, 14 and 7 pixel
sides are multiples of 4 but not of 6: padded to whole 6x6 tiles, the GEMM work per real output
falls little or not at all, and rises at 7x7.

Measured (GEMM speed, error study, F(6x6, 3x3)): docs/measurements.md, Winograd F(4x4, 3x3).
"""

from __future__ import annotations

import torch

from resfused import _native
from resfused.runtime import buffer_cache, packing

# G's rows are the evaluations [1, p, p^2] of the filter polynomial at each point (the last row,
# infinity, picks the leading coefficient), divided by the scale that made B^T's row integral.
_G64 = torch.tensor(
    [
        [1 / 2, 0, 0],
        [1 / 6, -1 / 6, 1 / 6],
        [1 / 6, 1 / 6, 1 / 6],
        [16 / 15, 8 / 15, 4 / 15],
        [1 / 30, -1 / 15, 2 / 15],
        [0, 0, 1 / 2],
    ],
    dtype=torch.float64,
)
POSITIONS = 36


def geometry_ok(weight_shape, stride, padding, dilation, groups) -> bool:
    """A 3x3, stride-1, padding-1, undilated, ungrouped conv: what F(4x4, 3x3) computes."""
    return (
        tuple(weight_shape[2:]) == (3, 3)
        and tuple(stride) == (1, 1)
        and tuple(padding) == (1, 1)
        and tuple(dilation) == (1, 1)
        and groups == 1
    )


def unusable_reasons(x: torch.Tensor, weight_shape, stride, padding, dilation, groups):
    """Why no Winograd path can take this conv (before each path's own measured size rule): it
    needs a float32 CPU input, a conv geometry_ok accepts, and the compiled transforms."""
    if x.device.type != "cpu":
        yield f"a CPU kernel, got {x.device.type} tensors"
    elif x.dtype != torch.float32:
        yield f"float32 only, got {x.dtype} (lower precisions lose too much accuracy, see the module docstring)"
    elif not geometry_ok(weight_shape, stride, padding, dilation, groups):
        yield "not a 3x3, stride-1, padding-1 conv without groups or dilation"
    elif not _native.has_kernel("winograd_f43_input", "cpu"):
        yield "resfused._C has no Winograd transforms"


def usable(x: torch.Tensor, weight_shape, stride, padding, dilation, groups) -> bool:
    return next(unusable_reasons(x, weight_shape, stride, padding, dilation, groups), None) is None


def tiles(n: int, h: int, w: int) -> int:
    """T: the 4x4 output tiles of an N x H x W output (the rows of each transformed matrix)."""
    return n * ((h + 3) // 4) * ((w + 3) // 4)


# (G (x) G)[a*6 + b, k*3 + l] = G[a, k] G[b, l]: the weight transform as one [36, 9] matrix, so
# that transforming all C_out * C_in filters is one GEMM rather than millions of 6x3 products.
_KRON64 = torch.kron(_G64, _G64)


def _kron(like: torch.Tensor) -> torch.Tensor:
    return _KRON64.to(like.device, like.dtype)


def transform_weight(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """U[e] = (G w G^T)[e] as the weight of the grouped 1x1 conv that does the GEMMs:
    [36 * C_out, C_in, 1, 1], group e holding U[e]^T; computed in `dtype` (default: weight's).
    (The 3x3 filters are transformed in place as rows of 9: OIHW is already (co, ci)-major.)"""
    c_out, c_in = weight.shape[:2]
    w_oi = weight.detach().to(dtype or weight.dtype).reshape(c_out * c_in, 9)  # [(co, ci), 9]
    u = _kron(w_oi) @ w_oi.T  # [36, C_out * C_in]
    return u.reshape(POSITIONS * c_out, c_in, 1, 1).to(weight.dtype)


def transposed_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weights whose forward conv is the grad-input of `weight`'s: w'[ci, co] = rot180(w[co, ci])."""
    return weight.transpose(0, 1).flip(2, 3)


def weight_grad(du: torch.Tensor) -> torch.Tensor:
    """dw = G^T dU G for dU [36, C_out, C_in] -> [C_out, C_in, 3, 3] (in du's dtype)."""
    _, c_out, c_in = du.shape
    dw = _kron(du).T @ du.reshape(POSITIONS, c_out * c_in)  # [9, (co, ci)]
    return dw.T.reshape(c_out, c_in, 3, 3)


_ONEDNN = torch.backends.mkldnn.is_available()


def _as_image(v: torch.Tensor) -> torch.Tensor:
    """[T, 36, C] contiguous as the channels_last [1, 36 * C, 1, T] image of the grouped 1x1 conv."""
    return v.view(1, 1, v.shape[0], -1).permute(0, 3, 1, 2)


class TransformedWeight:
    """U for one conv and its GEMMs, with U packed for oneDNN per GEMM height (runtime/packing.py).

    oneDNN's packed layout depends on the height T, and a copy packed for one T can run another
    far slower (measured: up to 2x per GEMM; docs/measurements.md, oneDNN weight packing).
    conv3x3 asks for a copy per power-of-two count of images per pass, so a model served at
    varying batch sizes keeps at most log2(pass size) + 1 copies per conv (4 at 512 channels,
    7x7) instead of repacking."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype | None = None):
        # U itself is not kept, only its packed copies: U is derived again for each new copy
        # (rare), which halves what a conv holds (ResNet-50: 132 MB of U beside its copies).
        self.c_out, self.c_in = weight.shape[:2]
        self.u = lambda: transform_weight(weight, dtype)
        self.packed = packing.onednn_conv_weight(self.u, (0, 0), (1, 1), (1, 1), POSITIONS)

    def gemm(self, v: torch.Tensor, packed_height: int | None = None) -> torch.Tensor:
        """M[:, e] = V[:, e] @ U[e]: [T, 36, C_in] -> [T, 36, C_out], with U packed for a GEMM of
        `packed_height` rows (default T)."""
        t = v.shape[0]
        if v.dtype != torch.float32 or not _ONEDNN:  # float64 (tests, gradcheck): oneDNN has no float64 conv
            u = self.u().view(POSITIONS, self.c_out, self.c_in)
            return torch.bmm(v.transpose(0, 1), u.transpose(1, 2)).transpose(0, 1).contiguous()
        image = _as_image(v)
        packed = self.packed((1, POSITIONS * self.c_in, 1, packed_height or t))
        m = torch.ops.mkldnn._convolution_pointwise(
            image, packed, None, [0, 0], [1, 1], [1, 1], POSITIONS, "none", [], None
        )
        return m.permute(0, 2, 3, 1).reshape(t, POSITIONS, self.c_out)


# Images per pass of conv3x3: the transformed input of a pass, 36 * tiles * C_in floats, is kept
# near this size so that it is still in cache when the GEMM and the output transform read it
# (measured by images per pass: docs/measurements.md, Winograd F(4x4, 3x3), Kernel-level figures).
_PASS_BYTES = 2.5e6


def images_per_pass(x: torch.Tensor) -> int:
    """How many images conv3x3 transforms at a time (see _PASS_BYTES), at most x's batch."""
    n, c, h, w = x.shape
    per_image = POSITIONS * tiles(1, h, w) * c * x.element_size()
    return max(1, min(n, int(_PASS_BYTES // per_image)))


def transform_input(x: torch.Tensor) -> torch.Tensor | None:
    """V = B^T d B for every tile of x, or None when x holds a NaN or Inf: Winograd would spread it
    over every output of the tiles whose window holds it (up to 8x8 outputs, where the direct conv
    touches 3x3), so such inputs are left to the direct conv, which gives the reference's result."""
    v, finite = torch.ops.resfused.winograd_f43_input(x)
    return v if finite.item() else None


def conv3x3(x, u: TransformedWeight, bias=None, residual=None, relu: bool = False) -> torch.Tensor | None:
    """act(conv3x3(x, w) + bias [+ residual]) with u = TransformedWeight(w), channels_last; None
    when x is not finite (see transform_input). Runs images_per_pass(x) images at a time, each
    pass writing its slice of the output."""
    n, _, h, w = x.shape
    y = torch.empty((n, u.c_out, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    k = images_per_pass(x)
    packed_height = (1 << (k.bit_length() - 1)) * tiles(1, h, w)  # see TransformedWeight
    for i in range(0, n, k):
        v = transform_input(x[i : i + k])
        if v is None:
            return None
        ri = None if residual is None else residual[i : i + k]
        m = u.gemm(v, packed_height)
        torch.ops.resfused.winograd_f43_output_into(m, bias, ri, relu, y[i : i + k])
    return y


class _Conv3x3(torch.autograd.Function):
    """conv3x3(x, weight) + bias for training, given V = transform_input(x): V is saved for the
    weight gradient (2.25x the input's size); the backward allocates from the buffer cache."""

    @staticmethod
    def forward(ctx, x, weight, bias, v):
        n, _, h, w = x.shape
        y = torch.ops.resfused.winograd_f43_output(TransformedWeight(weight).gemm(v), n, h, w, bias, None, False)
        ctx.save_for_backward(v if ctx.needs_input_grad[1] else None, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        v, weight = ctx.saved_tensors
        gx = gw = gb = None
        with buffer_cache.scope():
            if ctx.needs_input_grad[0]:
                gx = conv3x3(grad, TransformedWeight(transposed_weight(weight)))
                if gx is None:  # a non-finite gradient: the direct conv's grad-input
                    n, _, h, w = grad.shape
                    gx = torch.nn.grad.conv2d_input((n, weight.shape[1], h, w), weight, grad, padding=1)
            if ctx.needs_input_grad[1]:
                # A NaN in grad reaches all of dw[c_out] here as it does in the direct conv.
                z = torch.ops.resfused.winograd_f43_grad_output(grad)
                # dU[e] = Z[:, e]^T V[:, e]: strided views, no copies (BLAS takes the leading dims).
                gw = weight_grad(torch.bmm(z.permute(1, 2, 0), v.transpose(0, 1)))
            if ctx.has_bias and ctx.needs_input_grad[2]:
                gb = grad.sum((0, 2, 3))
        return gx, gw, gb, None


def conv3x3_train(x, weight, bias=None) -> torch.Tensor | None:
    """conv3x3(x, weight) + bias with autograd (the weight transform is redone every call); None
    when x is not finite (see transform_input)."""
    v = transform_input(x.detach())
    return None if v is None else _Conv3x3.apply(x, weight, bias, v)


def _register_fakes() -> None:
    @torch.library.register_fake("resfused::winograd_f43_input")
    def _(x):
        n, c, h, w = x.shape
        return x.new_empty((tiles(n, h, w), POSITIONS, c)), x.new_empty((), dtype=torch.bool)

    @torch.library.register_fake("resfused::winograd_f43_grad_output")
    def _(grad):
        n, c, h, w = grad.shape
        return grad.new_empty((tiles(n, h, w), POSITIONS, c))

    @torch.library.register_fake("resfused::winograd_f43_output")
    def _(m, n, h, w, bias, residual, relu):
        return m.new_empty((n, m.shape[2], h, w)).contiguous(memory_format=torch.channels_last)

    @torch.library.register_fake("resfused::winograd_f43_output_into")
    def _(m, bias, residual, relu, out):
        return None


if _native.has_op("winograd_f43_input"):
    _register_fakes()
