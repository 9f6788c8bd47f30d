"""CPU dense/grouped conv through oneDNN post-op fusion (torch.ops.mkldnn._convolution_pointwise).

The folded bias, the residual add (a `binary` post-op) and the ReLU (a `unary` post-op) run in
oneDNN's epilogue, before the single store; weights are reordered once into oneDNN's blocked
layout and cached in ConvParams.packed. Output is channels_last whatever the input layout.
"""

from __future__ import annotations

import torch

from resfused.ops.conv import ConvParams


def _supported_dtypes() -> frozenset[torch.dtype]:
    if not torch.backends.mkldnn.is_available():
        return frozenset()
    dtypes = {torch.float32}
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        dtypes.add(torch.bfloat16)
    if torch.ops.mkldnn._is_mkldnn_fp16_supported():
        dtypes.add(torch.float16)
    return frozenset(dtypes)


# Asked once, at import (a CPU feature query): a constant keeps `supports` traceable by torch.compile.
SUPPORTED_DTYPES = _supported_dtypes()


class OneDNNConv:
    name = "onednn"
    fuses_prologue = False
    # Not traced by torch.compile: the binary post-op has no fake kernel, and Inductor (with
    # freezing) does this same oneDNN fusion itself on the traced ATen conv.
    traceable = False

    def supports(self, x, p: ConvParams, residual, prologue) -> bool:
        return x.device.type == "cpu" and x.dtype in SUPPORTED_DTYPES

    def _packed(self, p: ConvParams) -> torch.Tensor:
        packed = p.packed.get(self.name)
        if packed is None:
            packed = torch.ops.mkldnn._reorder_convolution_weight(
                p.weight, list(p.padding), list(p.stride), list(p.dilation), p.groups, None
            )
            p.packed[self.name] = packed
        return packed

    def run(self, x, p: ConvParams, residual, relu, prologue):
        args = (self._packed(p), p.bias, list(p.padding), list(p.stride), list(p.dilation), p.groups)
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(x, *args, "relu" if relu else "none", [], None)
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual, *args, "add", None, "relu" if relu else None, [], None
        )
