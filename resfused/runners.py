"""How a fused block's program runs.

A fused block writes its computation once, as calls on a runner (`conv_bn`, `pre_act`); the
runner decides how each call executes:

    FoldedRunner    eval mode: BN folded into the conv weights, the bias / residual add / ReLU in
                    the conv's epilogue (ops.conv_bias_act), from a FoldedWeights that the block
                    keeps while its parameters are unchanged
    TrainingRunner  train mode: ATen conv (its own backward), then batch-statistics BN+ReLU in one
                    fused kernel with a fused backward (ops.batch_norm_act), then the add+ReLU tail

`conv_bn(x, conv, bn, relu, residual, pre_bn, may_overwrite_residual)` computes
    act( bn(conv(pre(x))) [+ residual] ),   pre(x) = relu(pre_bn(x)) when pre_bn is given,
with act = ReLU when `relu`; `pre_act(x, bn)` is relu(bn(x)) on its own (materialized);
`squeeze_excite(y, fc1, fc2)` is y * sigmoid(fc2(relu(fc1(mean_hw(y))))) (ops/se.py); `se_gate` /
`eca_gate` compute such a gate as [N, C] and `scale_add_relu(y, gate, residual)` applies it with the
residual add and ReLU, the same ops in both runners (autograd is the ops').
`may_overwrite_residual` says no one reads `residual` afterwards: the folded runner lets the
kernel write the output into its storage; the training runner ignores it (autograd keeps it).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from resfused import folding
from resfused.ops import ConvParams, add_relu, batch_norm_act, conv2d_train, conv_bias_act, scale_shift_act
from resfused.ops.conv import bind_conv_bias_act
from resfused.ops.se import eca_gate, scale_add_relu, se_gate


class FoldedWeights:
    """The folded (and, by the kernels, prepacked) weights of one module, for one dtype, made on
    first use. `differentiable`: folded with autograd (frozen-BN fine-tuning), never kept."""

    def __init__(self, dtype: torch.dtype, differentiable: bool = False):
        self.dtype, self.differentiable = dtype, differentiable
        self._folded: dict = {}

    def conv(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> ConvParams:
        key = (conv, bn)
        if key not in self._folded:
            self._folded[key] = ConvParams.from_modules(conv, bn, self.dtype, self.differentiable)
        return self._folded[key]

    def scale_shift(self, bn: nn.BatchNorm2d):
        if bn not in self._folded:
            self._folded[bn] = folding.bn_scale_shift(bn, self.dtype, self.differentiable)
        return self._folded[bn]


class FoldedRunner:
    """Eval mode, on `weights`. `inputs_finite`: the block checked its input for NaN/Inf (every
    tensor inside is then a kernel output of finite values, see runtime/finite.py)."""

    se_gate, eca_gate, scale_add_relu = staticmethod(se_gate), staticmethod(eca_gate), staticmethod(scale_add_relu)

    def __init__(self, weights: FoldedWeights, inputs_finite: bool = False):
        self.weights, self.inputs_finite = weights, inputs_finite

    def conv_bn(self, x, conv, bn, relu=False, residual=None, pre_bn=None, may_overwrite_residual=False):
        prologue = None if pre_bn is None else self.weights.scale_shift(pre_bn)
        return conv_bias_act(
            x, self.weights.conv(conv, bn), residual=residual, relu=relu, prologue=prologue,
            may_overwrite_residual=may_overwrite_residual, inputs_finite=self.inputs_finite,
        )  # fmt: skip

    def pre_act(self, x, bn):
        return scale_shift_act(x, *self.weights.scale_shift(bn), relu=True)

    def squeeze_excite(self, y, fc1, fc2):
        gate = se_gate(y, fc1, fc2)[:, :, None, None]
        # y is the output of the conv before, read by no one else: scaled in place unless autograd
        # needs it (the product's backward reads y).
        return y * gate if y.requires_grad or gate.requires_grad else y.mul_(gate)


class Plan:
    """The kernel calls of one eval forward without autograd, for one input signature and one
    parameter state (see FusedModule._forward).

    `calls`: the bound function of each conv_bn / pre_act call, in program order, each taking
    (x, residual). `flow`: for each call, where its x and residual come from, as indices into
    [block input, output of call 0, output of call 1, ...] (None: no residual); None when some
    tensor of the program was made outside these calls (a pooled shortcut, a channel gate): then
    the block's program runs again on a PlanRunner. With `flow` a replay is one loop over the
    calls, without the program's Python (a ResNet-50 Bottleneck: 0.6-0.9 instead of 7.2 us).
    `check_finite`: the input is checked for NaN/Inf before a replay."""

    __slots__ = ("calls", "flow", "check_finite", "_dead_after")

    def __init__(self, calls: list, flow: list | None, check_finite: bool):
        self.calls, self.flow, self.check_finite = calls, flow, check_finite
        # The values each call reads for the last time, dropped after it as the program's own
        # variables would be: an intermediate kept alive to the block's end would hold its buffer
        # away from the next allocation.
        steps = flow or []
        last_read = {v: i for i, reads in enumerate(steps) for v in reads if v is not None}  # later i wins
        self._dead_after = [tuple(v for v, last in last_read.items() if last == i) for i in range(len(steps))]

    def replay(self, x: torch.Tensor) -> torch.Tensor:
        values = [x]
        for call, (xi, ri), dead in zip(self.calls, self.flow, self._dead_after):
            values.append(call(values[xi], None if ri is None else values[ri]))
            for v in dead:
                values[v] = None
        return values[-1]


class PlanRecorder(FoldedRunner):
    """FoldedRunner that also records each conv_bn and pre_act call as a bound function of its
    tensors (ops.bind_conv_bias_act), with where its inputs came from: the block's `plan(y)` for
    later calls with the same input signature and parameter state, or None when some call's kernel
    choice could not be fixed in advance."""

    def __init__(self, weights: FoldedWeights, inputs_finite: bool, x: torch.Tensor):
        super().__init__(weights, inputs_finite)
        self._calls: list | None = []
        # Tensors by identity: the block input, then each recorded call's output, kept alive while
        # recording so that no id is reused.
        self._values: list | None = [x]
        self._flow: list = []

    def conv_bn(self, x, conv, bn, relu=False, residual=None, pre_bn=None, may_overwrite_residual=False):
        prologue = None if pre_bn is None else self.weights.scale_shift(pre_bn)
        p = self.weights.conv(conv, bn)
        call = bind_conv_bias_act(x, p, residual, relu, prologue, may_overwrite_residual, self.inputs_finite)
        if call is None:
            self._calls = None
            return super().conv_bn(x, conv, bn, relu, residual, pre_bn, may_overwrite_residual)
        return self._record(call, x, residual)

    def pre_act(self, x, bn):
        scale, shift = self.weights.scale_shift(bn)
        return self._record(lambda x, _: scale_shift_act(x, scale, shift, relu=True), x, None)

    # Tensors these make, or scale in place, are not the recorded calls' outputs: no flow.
    def squeeze_excite(self, y, fc1, fc2):
        self._values = None
        return super().squeeze_excite(y, fc1, fc2)

    def se_gate(self, *args):
        self._values = None
        return se_gate(*args)

    def eca_gate(self, *args):
        self._values = None
        return eca_gate(*args)

    def scale_add_relu(self, *args):
        self._values = None
        return scale_add_relu(*args)

    def _record(self, call, x, residual):
        y = call(x, residual)
        if self._calls is not None:
            self._calls.append(call)
        if self._values is not None:
            xi, ri = self._index(x), None if residual is None else self._index(residual)
            if xi is None or (residual is not None and ri is None):
                self._values = None
            else:
                self._flow.append((xi, ri))
                self._values.append(y)
        return y

    def _index(self, t) -> int | None:
        return next((i for i, v in enumerate(self._values) if v is t), None)

    def plan(self, y: torch.Tensor) -> Plan | None:
        """The plan of the program that returned `y`, or None when it cannot be replayed."""
        if self._calls is None:
            return None
        flows = self._values is not None and self._values[-1] is y
        return Plan(self._calls, self._flow if flows else None, self.inputs_finite)


class PlanRunner(FoldedRunner):
    """Replays a plan without a flow: the block's program makes the same calls in the same order
    (its control flow depends only on its structure and `may_overwrite_x`, both fixed for a plan),
    so the i-th conv_bn / pre_act call runs the i-th bound function."""

    def __init__(self, calls: list):
        self.weights, self._calls = None, iter(calls)

    def conv_bn(self, x, conv, bn, relu=False, residual=None, pre_bn=None, may_overwrite_residual=False):
        return next(self._calls)(x, residual)

    def pre_act(self, x, bn):
        return next(self._calls)(x, None)


class TrainingRunner:
    """Train mode: batch statistics, running-statistics updates, autograd through every step."""

    se_gate, eca_gate, scale_add_relu = staticmethod(se_gate), staticmethod(eca_gate), staticmethod(scale_add_relu)

    def conv_bn(self, x, conv, bn, relu=False, residual=None, pre_bn=None, may_overwrite_residual=False):
        if pre_bn is not None:
            x = self.pre_act(x, pre_bn)
        y = conv2d_train(x, conv)
        if bn is not None:
            y = batch_norm_act(y, bn, relu=relu and residual is None)
        elif relu and residual is None:
            y = torch.relu(y)
        if residual is None:
            return y
        return add_relu(y, residual) if relu else y + residual

    def pre_act(self, x, bn):
        return batch_norm_act(x, bn, relu=True)

    def squeeze_excite(self, y, fc1, fc2):
        return y * se_gate(y, fc1, fc2)[:, :, None, None]
