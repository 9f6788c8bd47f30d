"""The op layer: every fused computation the blocks use, each with argument checks and the
kernel choice of ops/selection.py. Blocks call these functions; they never launch a kernel.
Importing this package registers every compiled op's fake kernel and autograd formula.
"""

from resfused.kernels.base import ConvParams
from resfused.ops.batchnorm import batch_norm_act
from resfused.ops.conv import conv_bias_act
from resfused.ops.conv_train import conv2d_train
from resfused.ops.tails import add_relu, scale_shift_act
from resfused.runtime.trace import KernelChoice, trace_kernels

__all__ = [
    "ConvParams", "KernelChoice", "add_relu", "batch_norm_act", "conv2d_train", "conv_bias_act", "scale_shift_act",
    "trace_kernels",
]  # fmt: skip
