"""ResidualStage: a ResNet stage (`layer1` ...) whose fused blocks may overwrite dead intermediates.

Inside an nn.Sequential of blocks nobody else sees a block's output except the next block, so
each fused block fed by the fused block before it may write its last conv's output over its
input (the identity shortcut): oneDNN's in-place sum post-op instead of a binary add that reads
the shortcut into a new tensor (a ResNet-50 stage-1 1x1 conv + add + ReLU at batch 8: 9.2 ms
instead of 11.9 on a 2-core Zen 4; docs/measurements.md, In-place residual sum post-op).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.modules import module as mod

from resfused.blocks import FusedModule, autocast_on, not_fx_traceable, not_scriptable
from resfused.runtime import buffer_cache

__all__ = ["ResidualStage"]


class ResidualStage(nn.Sequential):
    """Same children, indexing and state_dict keys as the nn.Sequential it replaces (`fuse` swaps
    them in). A block with hooks, or one after a block with hooks (a forward hook sees the output),
    is called normally, as is every block while global module hooks are registered; the stage's
    own input is never written."""

    def __prepare_scriptable__(self):
        raise not_scriptable(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):
            raise not_fx_traceable(self)
        if autocast_on(x):  # each fused block leaves autocast on its own
            return super().forward(x)
        global_hooks = _global_module_hooks()
        may_overwrite_x = False  # the stage's own input belongs to the caller
        with buffer_cache.scope_for(self):
            for block in self:
                if global_hooks or _has_hooks(block) or not isinstance(block, FusedModule):
                    # Called normally: a forward hook may keep the block's output, so the next block
                    # must not overwrite it.
                    x, may_overwrite_x = block(x), False
                else:
                    x, may_overwrite_x = block._forward(x, may_overwrite_x), True
        return x


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _global_module_hooks() -> bool:
    return bool(
        mod._global_forward_hooks
        or mod._global_forward_pre_hooks
        or mod._global_backward_hooks
        or mod._global_backward_pre_hooks
    )
