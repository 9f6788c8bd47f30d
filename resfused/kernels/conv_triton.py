"""The Triton implicit-GEMM conv (resfused/triton/conv.py) as a torch.library op, and its adapter.

    torch.ops.resfused.conv2d_triton(x, weight_hwio, bias, residual, scale, shift,
                                     stride, padding, relu, allow_tf32) -> y (channels_last)

    y = [relu]( conv(pro(x), W) + bias [+ residual] ),  pro(x) = relu(x*scale[c] + shift[c]) when
    scale/shift are given (padding stays 0 after it); W is given as HWIO (KH, KW, C_in/groups, C_out),
    groups = C_in / W.shape[2].

It is a `triton_op`: eager calls launch the autotuned kernel (on CUDA) or the interpreter
(TRITON_INTERPRET=1, CPU tensors, one fixed config: the autotuner needs a CUDA timer), and
torch.compile traces through `wrap_triton` to the kernel itself. The function body only
allocates and launches, so it doubles as the fake (meta) implementation; an explicit fake is
registered as well so that fake-tensor tracing never reaches a launch (the interpreter would
try to run on fake tensors).

On CUDA the launch runs under the input's device (torch.cuda.device(x.device)): Triton launches
on the current device and stream, and a model on cuda:1 must not launch on cuda:0. The first call
of each autotune key (resfused/triton/conv.py: M bucketed to a power of two, the channel counts,
kernel size, stride, variant, dtype) times the configs; later calls launch the compiled kernel with
the remembered config directly (`_TUNED`), without the autotuner. Timing cannot run while a CUDA
graph is being captured: run the model once on the shapes it will see before capturing.

`TritonConv` is the adapter resfused/ops/conv.py lists for CUDA tensors: it keeps the HWIO
weight in ConvParams.kernel_state. fp32 uses TF32 when torch.backends.cudnn.allow_tf32 is set
(read at each call), the flag that governs eager fp32 convolutions (cuDNN's), so fused and
eager fp32 convs do the same arithmetic; torch.backends.cuda.matmul.allow_tf32 governs matmuls.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch.library import triton_op, wrap_triton

from resfused import backend
from resfused.kernels.base import ConvParams, Kernel, measured_rule

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Below this many input channels per group (a network's stem: 3) the K chunks of the tensor-core
# configs (BLOCK_K 32 or 64) are mostly padding; under `auto` such convs go to the library conv
# (cuDNN) with the fused tail. The forced `triton` backend still runs them (the kernel is correct).
MIN_CHANNELS_PER_GROUP = 16


def _output(x: torch.Tensor, weight_hwio: torch.Tensor, stride, padding) -> torch.Tensor:
    n, _, h, w = x.shape
    kh, kw, _, c_out = weight_hwio.shape
    oh = (h + 2 * padding[0] - kh) // stride[0] + 1
    ow = (w + 2 * padding[1] - kw) // stride[1] + 1
    return torch.empty((n, c_out, oh, ow), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


def _check(x, weight_hwio, bias, residual, scale, shift, stride, padding) -> None:
    """Argument consistency, with messages naming the argument (the op can be called directly)."""
    if x.dim() != 4 or weight_hwio.dim() != 4:
        raise ValueError(
            f"conv2d_triton: 'x' and 'weight_hwio' must be 4-D, got {tuple(x.shape)} and {tuple(weight_hwio.shape)}"
        )
    if x.dtype not in _DTYPES or weight_hwio.dtype != x.dtype:
        raise TypeError(
            f"conv2d_triton: 'x' and 'weight_hwio' must share one dtype of {_DTYPES}, "
            f"got {x.dtype} / {weight_hwio.dtype}"
        )
    cig, c_out = weight_hwio.shape[2], weight_hwio.shape[3]
    if cig == 0 or x.shape[1] % cig != 0:
        raise ValueError(
            f"conv2d_triton: 'x' channels ({x.shape[1]}) must be a multiple of weight_hwio.shape[2] ({cig})"
        )
    groups = x.shape[1] // cig
    if c_out % groups != 0:
        raise ValueError(f"conv2d_triton: 'weight_hwio' C_out ({c_out}) must be divisible by groups ({groups})")
    if len(stride) != 2 or len(padding) != 2 or min(stride) < 1 or min(padding) < 0:
        raise ValueError(
            f"conv2d_triton: 'stride' (>= 1) and 'padding' (>= 0) must have 2 entries, got {stride} / {padding}"
        )
    for name, v, size in (("bias", bias, c_out), ("scale", scale, x.shape[1]), ("shift", shift, x.shape[1])):
        if v is not None and (v.dim() != 1 or v.shape[0] != size):
            raise ValueError(f"conv2d_triton: '{name}' must have shape [{size}], got {tuple(v.shape)}")
    if (scale is None) != (shift is None):
        raise ValueError("conv2d_triton: 'scale' and 'shift' must be given together (the prologue)")
    for name, t in (
        ("weight_hwio", weight_hwio),
        ("bias", bias),
        ("residual", residual),
        ("scale", scale),
        ("shift", shift),
    ):
        if t is not None and t.device != x.device:
            raise RuntimeError(f"conv2d_triton: '{name}' is on {t.device} but 'x' is on {x.device}")


def _traceable(kernel):
    """`kernel` wrapped by wrap_triton, so that torch.compile / make_fx see the launch.

    Under TRITON_INTERPRET=1, @triton.jit returns an InterpretedFunction (neither a JITFunction
    nor an Autotuner). Newer torch (2.14) passes it through wrap_triton unchanged; torch 2.11
    raises "wrap_triton only works on functions annotated with triton.jit or triton.autotune".
    An interpreted launch cannot be traced anyway (it would run on fake tensors; the fake
    implementation below serves tracing), so it is launched directly. Compiled kernels
    (TRITON_INTERPRET=0: a JITFunction or an Autotuner) always go through wrap_triton.
    """
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    return wrap_triton(kernel) if isinstance(kernel, (JITFunction, Autotuner)) else kernel


def device_guard(device: torch.device):
    """Make `device` current for a launch (Triton launches on the current device and its current
    stream); nothing to do for CPU tensors (the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def allow_tf32(dtype: torch.dtype) -> bool:
    """Whether an fp32 conv may use TF32: torch.backends.cudnn.allow_tf32, as eager convs do."""
    return dtype == torch.float32 and bool(torch.backends.cudnn.allow_tf32)


# Autotune key (+ dtypes, device) -> the config the autotuner chose for it, so that a tuned call
# launches the compiled kernel directly. Filled under _TUNE_LOCK, read without it.
_TUNED: dict = {}
_TUNE_LOCK = threading.Lock()


def _launch_cuda(kernels, args: tuple, tuner=None, direct=None) -> None:
    """Launch on CUDA: the remembered config of this autotune key if there is one (the hot
    path: the compiled kernel, no autotuner), else the autotuner, once per key, remembering its
    choice. `tuner` / `direct` stand in for the autotuned and the plain kernel in tests."""
    prepared = kernels.arguments(*args)
    if prepared is None:
        return
    runtime, constexprs, launch_grid = prepared
    x = args[0]
    dtypes = tuple(None if t is None else t.dtype for t in args[2:6])
    key = (x.device, x.dtype, dtypes, kernels.autotune_key(runtime, constexprs))
    config = _TUNED.get(key)
    if config is not None:
        (kernels.conv2d_nhwc_kernel if direct is None else direct)[launch_grid](*runtime, **constexprs, **config)
        return
    if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "conv2d_triton: this conv shape has not been autotuned yet, and autotuning cannot run "
            "while a CUDA graph is being captured; run the model once on these shapes before capturing"
        )
    tuner = kernels.conv2d_nhwc_autotuned if tuner is None else tuner
    with _TUNE_LOCK:  # the autotuner's best_config is shared state
        tuner[launch_grid](*runtime, **constexprs)
        _TUNED[key] = tuner.best_config.all_kwargs()


@triton_op("resfused::conv2d_triton", mutates_args=())
def conv2d_triton(
    x: torch.Tensor,
    weight_hwio: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    relu: bool,
    allow_tf32: bool,
) -> torch.Tensor:
    from resfused.triton import conv as kernels  # triton is imported on first use only

    _check(x, weight_hwio, bias, residual, scale, shift, stride, padding)
    y = _output(x, weight_hwio, stride, padding)
    if residual is not None and residual.shape != y.shape:
        raise ValueError(
            f"conv2d_triton: 'residual' must have the output shape {tuple(y.shape)}, got {tuple(residual.shape)}"
        )
    # The kernel reads x with unit channel stride; a channels_last input passes through unchanged.
    x = x.contiguous(memory_format=torch.channels_last)
    weight_hwio = weight_hwio.contiguous()
    groups = x.shape[1] // weight_hwio.shape[2]
    args = (x, weight_hwio, bias, residual, scale, shift, y, stride, padding, groups, relu, allow_tf32)
    with device_guard(x.device):
        if x.device.type != "cuda":  # TRITON_INTERPRET=1 on CPU tensors: no autotuning (it needs a CUDA timer)
            kernels.launch(_traceable(kernels.conv2d_nhwc_kernel), *args, config=kernels.INTERPRETER_CONFIG)
        elif torch.compiler.is_compiling() or not _plain_eager(x):
            # traced (torch.compile, make_fx): the autotuned kernel, which Inductor tunes itself
            kernels.launch(_traceable(kernels.conv2d_nhwc_autotuned), *args)
        else:
            _launch_cuda(kernels, args)
    return y


def _plain_eager(x: torch.Tensor) -> bool:
    """A call on real tensors outside any tracing mode, where launching the kernel directly is the
    same as what wrap_triton would do."""
    from torch.utils._python_dispatch import is_in_torch_dispatch_mode

    return type(x) is torch.Tensor and not is_in_torch_dispatch_mode()


@conv2d_triton.register_fake
def _(x, weight_hwio, bias, residual, scale, shift, stride, padding, relu, allow_tf32):
    _check(x, weight_hwio, bias, residual, scale, shift, stride, padding)
    return _output(x, weight_hwio, stride, padding)


def to_hwio(weight: torch.Tensor) -> torch.Tensor:
    """OIHW (PyTorch's conv weight) -> HWIO contiguous: output channels contiguous per (kh, kw, ci)."""
    return weight.permute(2, 3, 1, 0).contiguous()


class TritonConv(Kernel):
    """Every dense/grouped conv with dilation 1 in fp16/bf16/fp32; prologue and epilogue fused."""

    name = "triton"
    fuses_prologue = True
    fuses_residual = True

    def unsupported_reasons(self, x, p: ConvParams, residual, prologue):
        if x.dtype not in _DTYPES or p.weight.dtype != x.dtype:
            yield f"dtype {x.dtype} (the kernel has {_DTYPES})"
        if x.device.type != "cuda" and not (x.device.type == "cpu" and backend.triton_interpreter_enabled()):
            yield f"needs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {x.device.type}"
        if tuple(p.dilation) != (1, 1):
            yield f"dilation {p.dilation}"
        if x.shape[2] + 2 * p.padding[0] < p.kernel_size[0] or x.shape[3] + 2 * p.padding[1] < p.kernel_size[1]:
            yield "the input is smaller than the kernel (an empty output)"
        cig = p.weight.shape[1]
        if cig < MIN_CHANNELS_PER_GROUP and backend.get_backend() == "auto":
            # A speed rule (from the tile shapes; not yet timed on a GPU): measured selection may time it.
            yield measured_rule(
                f"{cig} input channels per group (< {MIN_CHANNELS_PER_GROUP}): most of each tensor-core "
                "K step would be padding; the library conv (cuDNN) with the fused tail is faster"
            )

    def _weight(self, p: ConvParams) -> torch.Tensor:
        return p.state_for(self.name, lambda: to_hwio(p.weight))

    def run(self, x, p: ConvParams, residual, relu, prologue):
        scale, shift = prologue if prologue is not None else (None, None)
        return torch.ops.resfused.conv2d_triton(
            x,
            self._weight(p),
            p.bias,
            residual,
            scale,
            shift,
            list(p.stride),
            list(p.padding),
            bool(relu),
            allow_tf32(x.dtype),
        )
