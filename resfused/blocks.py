"""Fused residual blocks: same constructors and state_dict keys as `resfused.reference`.

Each block writes its computation once, as `_program(x, runner, may_overwrite_x)`: calls on a runner
(see runners.py) that runs it folded and fused in eval mode, or with fused batch-statistics
BatchNorm in train mode. Eval mode caches the folded weights; they are rebuilt whenever a
parameter or BN buffer changes (load_state_dict, in-place edits, `.to(dtype)`), detected
through tensor version counters and storage pointers, or a conv's geometry or a BN's eps does.
Edits through `.data` bypass the version counter, and parameters created under
torch.inference_mode have none: call `resfused.refresh(model)` after editing those in place.
When autograd must reach the parameters in eval mode (frozen-BN fine-tuning), the folding is
differentiable and rebuilt every call. On the CPU in eval mode a block checks its input for
NaN/Inf once and runs the reference computation on one (runtime/finite.py). A module holding an
nn.SyncBatchNorm in training mode runs its reference forward (torch synchronizes that BN's batch
statistics across processes; see `FusedModule._has_synced_bn`).

    block = resfused.Bottleneck(256, 64).eval()
    block.load_state_dict(reference_block.state_dict())
    with torch.inference_mode():
        y = block(x.to(memory_format=torch.channels_last))
"""

from __future__ import annotations

import threading

import torch
import torch.nn as nn

from resfused import backend, reference, structure
from resfused.ops.batchnorm import uses_batch_statistics
from resfused.runners import FoldedRunner, FoldedWeights, Plan, PlanRecorder, PlanRunner, TrainingRunner
from resfused.runtime import buffer_cache, finite, module_state, trace, tuning_cache

# Plans kept per block (input signatures), the least recently recorded dropped first. Each holds
# references to the folded weights and to the packed weight copies its calls use.
MAX_PLANS = 4


class Derived:
    """What a fused block derives from one state of its parameters: the folded weights per dtype
    and the plans (see FusedModule._forward). Replaced whole when the state changes."""

    def __init__(self):
        self.folded: dict[torch.dtype, FoldedWeights] = {}
        self.plans: dict[tuple, Plan] = {}
        self._lock = threading.Lock()

    def folded_for(self, dtype: torch.dtype) -> FoldedWeights:
        folded = self.folded.get(dtype)
        if folded is None:
            with self._lock:  # threads calling for the first time share one FoldedWeights
                folded = self.folded.setdefault(dtype, FoldedWeights(dtype))
        return folded

    def remember_plan(self, key: tuple, plan: Plan) -> None:
        with self._lock:
            if key not in self.plans and len(self.plans) >= MAX_PLANS:
                self.plans.pop(next(iter(self.plans)))  # the oldest
            self.plans[key] = plan


__all__ = [
    "BasicBlock",
    "PreActBasicBlock",
    "Bottleneck",
    "ResNeXtBottleneck",
    "PreActBottleneck",
    "RegNetBottleneck",
    "SEBasicBlock",
    "SEBottleneck",
    "ConvBNAct",
    "refresh",
]


class FusedModule(nn.Module):
    """Folded-weight caching and input checks shared by every fused module.

    Subclasses define `_program(x, runner, may_overwrite_x)`; the reference math comes from the
    reference class they also derive from (and stays available as `reference_forward`).
    """

    _snapshot = None  # module_state.Snapshot of the parameter state `_derived` was made from
    _derived = None  # Derived

    @classmethod
    def from_reference(cls, block: nn.Module) -> FusedModule:
        """A fused block that shares `block`'s submodules (parameters and buffers, not copies)
        and plain attributes; `block` must be an instance of the matching reference block
        (`resfused.reference.<same name>`). Other blocks (torchvision, timm): `resfused.fuse`."""
        ref_cls = next((b for b in cls.__mro__[1:] if b.__module__ == reference.__name__), None)
        if ref_cls is None:
            raise TypeError(f"resfused.{cls.__name__} has no reference block to convert from; build it from its parts")
        if type(block) is not ref_cls:
            raise TypeError(
                f"resfused.{cls.__name__}.from_reference: 'block' must be a "
                f"resfused.reference.{ref_cls.__name__}, got {type(block).__module__}.{type(block).__qualname__}"
                "; resfused.fuse(model) converts torchvision and timm blocks"
            )
        return cls._from_children(block)

    @classmethod
    def _from_children(cls, block: nn.Module) -> FusedModule:
        """from_reference without the type check: `block` holds the children by name (fuse()
        checks their structure before it calls this)."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        for name, child in block.named_children():
            setattr(fused, name, child)
        for name, value in vars(block).items():  # plain attributes: downsample=None, stride, ...
            if not name.startswith("_") and name != "training":
                setattr(fused, name, value)
        fused.train(block.training)
        return fused

    def __prepare_scriptable__(self):
        raise not_scriptable(self)

    def __getstate__(self):
        # The folded weights hold backend-specific tensors (oneDNN's opaque blocked weights) that
        # can be neither deep-copied nor pickled; derived state, rebuilt on the next forward.
        state = dict(super().__getstate__())
        for derived in ("_derived", "_snapshot"):
            state.pop(derived, None)
        return state

    def _folded_weights(self, x: torch.Tensor) -> FoldedWeights:
        if torch.compiler.is_compiling():
            return FoldedWeights(x.dtype)  # traced: the folding becomes part of the graph
        return self._current_derived().folded_for(x.dtype)

    def _current_derived(self) -> Derived:
        """The derived state for the current parameter state: a new one when it differs from the
        one the last was made from. Threads that run the block concurrently each read it once per
        call; a refresh replaces it whole (`_derived` first, then `_snapshot`, so that a reader
        never pairs a new snapshot with old derived state)."""
        snapshot, derived = self._snapshot, self._derived
        if snapshot is not None and derived is not None and snapshot.unchanged():
            return derived
        new = module_state.Snapshot(self)
        if snapshot is None or derived is None or not new.same_state(snapshot):
            derived = self._derived = Derived()
        self._snapshot = new
        return derived

    def _check_input(self, x: torch.Tensor) -> None:
        name = type(self).__name__
        if isinstance(x, torch.fx.Proxy):
            raise not_fx_traceable(self)
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"resfused.{name}: expected a 4-D input (N, C, H, W), got {shape}")
        if x.layout is not torch.strided:
            raise TypeError(
                f"resfused.{name}: expected a dense (strided) input, got layout {x.layout}; call .to_dense() first"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"resfused.{name}: expected {self.in_channels} input channels, got input of shape {tuple(x.shape)}"
            )
        if x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(
                f"resfused.{name}: expected a non-empty height and width, got input of shape {tuple(x.shape)}"
            )
        weight = self._entry_conv().weight
        if x.dtype != weight.dtype and not (autocast_on(x) and x.dtype == torch.get_autocast_dtype(x.device.type)):
            raise TypeError(
                f"resfused.{name}: input dtype {x.dtype} does not match the block's parameters ({weight.dtype})"
            )
        if x.device != weight.device:
            raise RuntimeError(
                f"resfused.{name}: input is on {x.device} but the block's parameters are on {weight.device}"
            )

    def _has_batch_statistics_bn(self) -> bool:
        """Whether a BN of this eval-mode module still normalizes with batch statistics: one left in
        train mode (BN re-calibration, AdaBN) or one without running statistics. Such a module
        cannot be folded; the training runner follows each BN's own mode, as the reference does."""
        return any(uses_batch_statistics(m) for m in self._batch_norms())

    def _has_synced_bn(self) -> bool:
        """Whether an nn.SyncBatchNorm of this module is in training mode. torch synchronizes such a
        BN's batch statistics across the processes of its group (when one is initialized), and the
        fused training kernels compute local statistics: the module runs `reference_forward`, which
        calls the SyncBatchNorm's own forward. In eval mode a SyncBatchNorm folds like a BatchNorm2d."""
        return any(type(m) is nn.SyncBatchNorm and m.training for m in self._batch_norms())

    def _needs_autograd(self, x: torch.Tensor) -> bool:
        if not torch.is_grad_enabled() or x.requires_grad:
            return torch.is_grad_enabled()
        if torch.compiler.is_compiling():
            return any(p.requires_grad for p in self.parameters())
        self._current_derived()
        return self._snapshot.any_requires_grad()

    def _batch_norms(self) -> list[nn.Module]:
        if torch.compiler.is_compiling():  # traced: the graph's guards watch the modules, not snapshots
            return [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._current_derived()
        return self._snapshot.bns

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if autocast_on(x):
            return self._autocast_forward(x)
        with buffer_cache.scope_for(self):
            return self._forward(x, may_overwrite_x=False)

    def _autocast_forward(self, x: torch.Tensor) -> torch.Tensor:
        """forward under torch.autocast. In eval mode without autograd the block computes in
        autocast's dtype, as the eager convs it stands for would: the input is cast to it, the
        weights are folded for it (float64 folding, then one rounding; kept next to the fold for
        the parameters' dtype) and the output has it. In training and with autograd it computes in
        its parameters' dtype with autocast off inside (an input autocast lowered is cast back up,
        as for an op on autocast's float32 list): the fused training kernels and the
        differentiable folding take activations and parameters in one dtype."""
        device = x.device.type
        low, params = torch.get_autocast_dtype(device), self._entry_conv().weight.dtype
        if not self.training and not self._needs_autograd(x) and x.dtype in (params, low):
            with buffer_cache.scope_for(self):
                return self._forward(x.to(low), may_overwrite_x=False)
        if x.dtype != params and x.dtype == low:
            x = x.to(params)
        with torch.autocast(device, enabled=False), buffer_cache.scope_for(self):
            return self._forward(x, may_overwrite_x=False)

    def _forward(self, x: torch.Tensor, may_overwrite_x: bool) -> torch.Tensor:
        """`may_overwrite_x`: nobody reads `x` after this call (ResidualStage knows it for the
        blocks it chains), so an identity shortcut may be overwritten by the last conv's output."""
        plan_key = self._plan_key(x, may_overwrite_x)
        derived = self._derived  # read after the snapshot check: a refresh replaces it first
        plan = None if plan_key is None or derived is None else derived.plans.get(plan_key)
        if plan is not None:
            # Recorded by a call with this input signature on the same parameter state, which
            # passed the checks below: only the NaN/Inf check depends on the data.
            if plan.check_finite and not finite.is_finite(x):
                return self.reference_forward(x)
            if plan.flow is not None:
                return plan.replay(x)
            return self._program(x, PlanRunner(plan.calls), may_overwrite_x)
        self._check_input(x)
        if self.training or self._has_batch_statistics_bn():
            if self._has_synced_bn():
                return self.reference_forward(x)
            return self._program(x, TrainingRunner(), may_overwrite_x)
        if self._needs_autograd(x):
            return self._program(x, FoldedRunner(FoldedWeights(x.dtype, differentiable=True)), may_overwrite_x)
        if torch.compiler.is_compiling():
            return self._program(x, FoldedRunner(self._folded_weights(x)), may_overwrite_x)
        # oneDNN's ReLU maps NaN to 0 (runtime/finite.py): on the CPU the block checks its input
        # once, and a NaN or Inf gets the reference computation, NaN and all.
        check_finite = x.device.type == "cpu"
        if check_finite and not finite.is_finite(x):
            return self.reference_forward(x)
        derived = self._current_derived()
        recorder = PlanRecorder(derived.folded_for(x.dtype), check_finite, x)
        y = self._program(x, recorder, may_overwrite_x)
        plan_key = self._plan_key(x, may_overwrite_x, recording=True)
        plan = recorder.plan(y)
        if plan is not None and plan_key is not None:
            # Into the plans of the state the calls were bound on: if a refresh replaced it
            # meanwhile, the plan is dropped with it.
            derived.remember_plan(plan_key, plan)
        return y

    def _plan_key(self, x, may_overwrite_x: bool, recording: bool = False):
        """The key of the plan that may run this call, or None when no plan may (see PlanRecorder):
        a plan holds the kernel calls of one eval forward without autograd, for one input signature
        and one parameter state."""
        derived = self._derived
        if not (recording or (derived is not None and derived.plans)) or self.training:
            return None
        if not isinstance(x, torch.Tensor):
            return None
        if x.layout is not torch.strided or trace.active() or torch.compiler.is_compiling():
            return None
        if torch.is_grad_enabled() and (x.requires_grad or self._snapshot.any_requires_grad()):
            return None
        if not self._snapshot.unchanged():  # the next full call refolds or takes a new snapshot
            return None
        # Whether tuning is on decides the kernels too (a plan recorded before tune() has the table's).
        return (*module_state.signature(x), may_overwrite_x, backend.get_backend(), tuning_cache.enabled())

    def _shortcut(self, x: torch.Tensor, runner, may_overwrite_x: bool):
        """The shortcut branch, and whether the last conv may accumulate into it in place (a
        projection's output always is a temporary; the identity only when x may be overwritten)."""
        if self.downsample is None:
            return x, may_overwrite_x
        return self._projection(x, runner), True

    def _projection(self, x: torch.Tensor, runner) -> torch.Tensor:
        """downsample(x) for a conv [+ BN] projection: `downsample[0]` the conv, `[1]` the BN or None.
        A ResNet-D projection pools first (`downsample.pre_pool`, fuse()'s ShortcutConvBN): the pool
        module runs as it is, then the folded 1x1 conv, exact for every input size (ceil_mode's
        border windows included). A 2x2 stride-2 conv with the 1x1 weights / 4 equals pool + conv on
        even sizes, but does 4x the multiply-adds: 2.2-2.5x slower than pool + 1x1 through oneDNN on
        ResNet-50-D's three shortcut shapes at batch 8 (2-core Xeon)."""
        pool = getattr(self.downsample, "pre_pool", None)
        if pool is not None:
            x = pool(x)
        return runner.conv_bn(x, self.downsample[0], self.downsample[1])

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The unfused reference computation (what the reference block's forward does)."""
        return super().forward(x)

    @property
    def in_channels(self) -> int:
        return self._entry_conv().in_channels

    def _entry_conv(self) -> nn.Conv2d:
        # Read from the module dict: hasattr / next(parameters()) cost more than the check itself.
        children = self._modules
        return children["conv1"] if "conv1" in children else children["conv"]


class BasicBlock(FusedModule, reference.BasicBlock):
    """conv1+BN1+ReLU; conv2+BN2 + shortcut + ReLU in one call; projection as a folded 1x1."""

    def _program(self, x, runner, may_overwrite_x=False):
        identity, identity_is_temporary = self._shortcut(x, runner, may_overwrite_x)
        out = runner.conv_bn(x, self.conv1, self.bn1, relu=True)
        return runner.conv_bn(
            out, self.conv2, self.bn2, relu=True, residual=identity, may_overwrite_residual=identity_is_temporary
        )


class _FusedPreActBase(FusedModule):
    """What the pre-activation blocks share: relu(bn1(x)) feeds conv1 (BN2 folded, ReLU) and the
    projection; the identity shortcut carries the raw x."""

    def _preact_conv1(self, x, runner, may_overwrite_x):
        """(relu(bn2(conv1(relu(bn1(x))))), the shortcut, whether the last conv may overwrite it)."""
        if self.downsample is None:
            # Only conv1 reads the pre-activated input: kernels that can, apply it while loading.
            out = runner.conv_bn(x, self.conv1, self.bn2, relu=True, pre_bn=self.bn1)
            return out, x, may_overwrite_x
        # conv1 and the projection both read it: materialize it once.
        act = runner.pre_act(x, self.bn1)
        identity = self._projection(act, runner)
        return runner.conv_bn(act, self.conv1, self.bn2, relu=True), identity, True


class PreActBasicBlock(_FusedPreActBase, reference.PreActBasicBlock):
    """relu(bn1(x)) as a prologue; conv1 with BN2 folded + ReLU; conv2 + shortcut (no ReLU)."""

    def _program(self, x, runner, may_overwrite_x=False):
        out, identity, identity_is_temporary = self._preact_conv1(x, runner, may_overwrite_x)
        return runner.conv_bn(out, self.conv2, None, residual=identity, may_overwrite_residual=identity_is_temporary)


class PreActBottleneck(_FusedPreActBase, reference.PreActBottleneck):
    """relu(bn1(x)) as a prologue; conv1 with BN2 folded + ReLU; conv2 (3x3, grouped or strided) with
    BN3 folded + ReLU; conv3 + shortcut (no ReLU)."""

    def _program(self, x, runner, may_overwrite_x=False):
        out, identity, identity_is_temporary = self._preact_conv1(x, runner, may_overwrite_x)
        out = runner.conv_bn(out, self.conv2, self.bn3, relu=True)
        return runner.conv_bn(out, self.conv3, None, residual=identity, may_overwrite_residual=identity_is_temporary)


class _FusedBottleneckBase(FusedModule):
    """1x1+BN+ReLU, 3x3 (grouped for ResNeXt)+BN+ReLU, 1x1+BN + shortcut + ReLU fused in one call."""

    def _program(self, x, runner, may_overwrite_x=False):
        identity, identity_is_temporary = self._shortcut(x, runner, may_overwrite_x)
        out = runner.conv_bn(x, self.conv1, self.bn1, relu=True)
        out = runner.conv_bn(out, self.conv2, self.bn2, relu=True)
        return runner.conv_bn(
            out, self.conv3, self.bn3, relu=True, residual=identity, may_overwrite_residual=identity_is_temporary
        )


class Bottleneck(_FusedBottleneckBase, reference.Bottleneck):
    pass


class ResNeXtBottleneck(_FusedBottleneckBase, reference.ResNeXtBottleneck):
    pass


class ConvBNAct(FusedModule):
    """conv -> BN -> [ReLU] as one fused conv (a model's stem, for example). Keys: conv.*, bn.*"""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | nn.SyncBatchNorm, relu: bool = True):
        super().__init__()
        for name, problem in (("conv", structure.conv_problem(conv)), ("bn", structure.bn_problem(bn))):
            if problem:
                raise TypeError(
                    f"resfused.ConvBNAct: '{name}' {problem}; a fused conv computes what a plain "
                    "zero-padded nn.Conv2d and an nn.BatchNorm2d (or nn.SyncBatchNorm) do, nothing else"
                )
        if bn.num_features != conv.out_channels:
            raise ValueError(
                f"resfused.ConvBNAct: 'bn' has {bn.num_features} features but 'conv' has "
                f"{conv.out_channels} output channels"
            )
        self.conv, self.bn, self.relu = conv, bn, relu

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return torch.relu(y) if self.relu else y

    def _program(self, x, runner, may_overwrite_x=False):
        return runner.conv_bn(x, self.conv, self.bn, relu=self.relu)

    def extra_repr(self) -> str:
        return f"relu={self.relu}"


class _FusedGatedTail:
    """What the v1 blocks with a channel gate after the last BN share (timm's SE-ResNet / SE-ResNeXt
    with SEModule, ECA-ResNet with EcaModule, as `se`): relu(se(bn(conv(out))) + shortcut), where
    se(y) = y * gate(mean_hw(y)). The last conv folds its BN alone; the gate runs in PyTorch on the
    pooled vector (ops/se.py); scale, add and ReLU are one pass (ops.se.scale_add_relu)."""

    def _gated_tail(self, out, conv, bn, identity, runner):
        y = runner.conv_bn(out, conv, bn)
        se = self.se
        gate = runner.se_gate(y, se.fc1, se.fc2) if "fc1" in se._modules else runner.eca_gate(y, se.conv)
        return runner.scale_add_relu(y, gate, identity)

    def _reference_shortcut(self, x):
        return x if self.downsample is None else self.downsample(x)


class SEBasicBlock(_FusedGatedTail, BasicBlock):
    """BasicBlock with a channel gate `se` applied to bn2's output before the add. Built by fuse()."""

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.se(self.bn2(self.conv2(out))) + self._reference_shortcut(x))

    def _program(self, x, runner, may_overwrite_x=False):
        identity, _ = self._shortcut(x, runner, may_overwrite_x)
        out = runner.conv_bn(x, self.conv1, self.bn1, relu=True)
        return self._gated_tail(out, self.conv2, self.bn2, identity, runner)


class SEBottleneck(_FusedGatedTail, Bottleneck):
    """Bottleneck (its 3x3 grouped for SE-ResNeXt) with a channel gate `se` applied to bn3's output
    before the add. Built by fuse()."""

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        return torch.relu(self.se(self.bn3(self.conv3(out))) + self._reference_shortcut(x))

    def _program(self, x, runner, may_overwrite_x=False):
        identity, _ = self._shortcut(x, runner, may_overwrite_x)
        out = runner.conv_bn(x, self.conv1, self.bn1, relu=True)
        out = runner.conv_bn(out, self.conv2, self.bn2, relu=True)
        return self._gated_tail(out, self.conv3, self.bn3, identity, runner)


class RegNetBottleneck(FusedModule):
    """torchvision RegNet X / Y's ResBottleneckBlock, over its own children (so its state_dict keys):
    `f` = BottleneckTransform(a: 1x1-BN-ReLU, b: 3x3 (stride, groups)-BN-ReLU, optional se:
    SqueezeExcitation(ReLU, Sigmoid), c: 1x1-BN), `proj` = Conv2dNormActivation(1x1 (stride), BN) or
    None, `activation` = ReLU after the add. Built by fuse() only.

    a and b fold their BN and ReLU; the SE gate runs in plain PyTorch on the pooled vector and
    scales b's output (ops/se.py); c folds its BN and takes the shortcut add and the ReLU."""

    downsample = property(lambda self: self.proj)  # [0] conv, [1] BN: what FusedModule._shortcut reads

    def _entry_conv(self) -> nn.Conv2d:
        return self.f.a[0]

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.proj is None else self.proj(x)
        return torch.relu(shortcut + self.f(x))

    def _program(self, x, runner, may_overwrite_x=False):
        identity, identity_is_temporary = self._shortcut(x, runner, may_overwrite_x)
        f = self.f
        out = runner.conv_bn(x, f.a[0], f.a[1], relu=True)
        out = runner.conv_bn(out, f.b[0], f.b[1], relu=True)
        se = f._modules.get("se")
        if se is not None:
            out = runner.squeeze_excite(out, se.fc1, se.fc2)
        return runner.conv_bn(
            out, f.c[0], f.c[1], relu=True, residual=identity, may_overwrite_residual=identity_is_temporary
        )


def not_fx_traceable(module: nn.Module) -> RuntimeError:
    return RuntimeError(
        f"resfused.{type(module).__name__} cannot be traced by torch.fx: fused modules choose "
        "their kernels in Python at each call. Keep them whole as leaf modules, e.g. "
        "torchvision's create_feature_extractor(model, nodes, tracer_kwargs={'leaf_modules': "
        "[resfused.blocks.FusedModule, resfused.ResidualStage]}), or use torch.compile / torch.export"
    )


def not_scriptable(module: nn.Module) -> RuntimeError:
    # torch.jit.script asks every module for __prepare_scriptable__ before compiling anything.
    return RuntimeError(
        f"resfused.{type(module).__name__} cannot be scripted with torch.jit.script: fused modules "
        "choose their kernels in Python at each call; use torch.compile or torch.export instead"
    )


def refresh(module: nn.Module) -> nn.Module:
    """Drop the folded and prepacked weights of every fused block in `module`, so the next forward
    rebuilds them: for edits their version counters cannot see (through `.data`). Returns `module`."""
    for m in module.modules():
        if isinstance(m, FusedModule):
            m._derived = m._snapshot = None
    return module


def autocast_on(x) -> bool:
    try:
        return isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type)
    except RuntimeError:  # a device type autocast does not know (meta, ...)
        return False
