"""Argument checks shared by every op, with messages that name the argument and the expectation.

The C++ kernels check the same things again (they can be called directly through torch.ops);
these run first so that every backend, the reference included, rejects bad input the same way.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def activation(x, name: str, rank: int | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"resfused: {name!r} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        # The kernels read strided memory; a sparse or oneDNN (to_mkldnn) tensor would reach them
        # only to fail in the dispatcher with a message that names neither argument nor fix.
        raise TypeError(
            f"resfused: {name!r} must be a dense (strided) tensor, got layout {x.layout}; convert it with .to_dense()"
        )
    if not x.is_floating_point():
        raise TypeError(f"resfused: {name!r} must be a floating-point tensor, got dtype {x.dtype}")
    if rank is not None and x.dim() != rank:
        raise ValueError(f"resfused: {name!r} must have rank {rank} (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dim() < 2:
        raise ValueError(f"resfused: {name!r} must have shape (N, C, ...) with rank >= 2, got {tuple(x.shape)}")


def same_device(a, a_name: str, b, b_name: str) -> None:
    if a.device != b.device:
        raise RuntimeError(
            f"resfused: {b_name!r} is on {b.device} but {a_name!r} is on {a.device}; move them to one device"
        )


def same_dtype(a, a_name: str, b, b_name: str) -> None:
    if a.dtype != b.dtype:
        raise TypeError(f"resfused: {b_name!r} has dtype {b.dtype} but {a_name!r} has dtype {a.dtype}; they must match")


def same_shape(a, a_name: str, b, b_name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"resfused: {b_name!r} must have the shape of {a_name!r} {tuple(a.shape)}, got {tuple(b.shape)}"
        )


def like(x, x_name: str, other, other_name: str) -> None:
    """`other` must match `x` in device, dtype and shape (a residual, a gradient)."""
    activation(other, other_name)
    same_device(x, x_name, other, other_name)
    same_dtype(x, x_name, other, other_name)
    same_shape(x, x_name, other, other_name)


def channel_vector(v, name: str, x, x_name: str) -> None:
    if not isinstance(v, torch.Tensor) or not v.is_floating_point():
        raise TypeError(f"resfused: {name!r} must be a floating-point tensor")
    same_device(x, x_name, v, name)
    if v.dim() != 1 or v.shape[0] != x.shape[1]:
        raise ValueError(
            f"resfused: {name!r} must have shape [{x.shape[1]}] (one value per channel of {x_name!r}), "
            f"got {tuple(v.shape)}"
        )


def module(m, name: str, expected: type, what: str) -> None:
    """`m` must be an instance of `expected` (an nn.Conv2d, a BatchNorm), described as `what`."""
    if not isinstance(m, expected):
        raise TypeError(f"resfused: {name!r} must be {what}, got {type(m).__module__}.{type(m).__qualname__}")


def conv_input(x, x_name: str, conv: nn.Conv2d, conv_name: str) -> None:
    """`x` is an input `conv` can take: a 4-D floating-point tensor with its input channels, on
    its device and in its dtype."""
    module(conv, conv_name, nn.Conv2d, "an nn.Conv2d")
    activation(x, x_name, rank=4)
    if x.shape[1] != conv.in_channels:
        raise ValueError(
            f"resfused: {x_name!r} must have {conv.in_channels} channels (dim 1) for {conv_name!r}, "
            f"got shape {tuple(x.shape)}"
        )
    same_device(conv.weight, f"{conv_name}.weight", x, x_name)
    same_dtype(conv.weight, f"{conv_name}.weight", x, x_name)
