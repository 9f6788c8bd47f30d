"""The op layer: every fused computation the blocks use, with backend choice, fake kernels and
autograd. Blocks call these functions; they never launch a kernel themselves.
"""

from resfused.ops.dispatch import trace_kernels
from resfused.ops.tails import add_relu, scale_shift_act

__all__ = ["add_relu", "scale_shift_act", "trace_kernels"]

from resfused.ops.conv import ConvParams, conv_bias_act  # noqa: E402

__all__ += ["ConvParams", "conv_bias_act"]
