"""Differential fuzzing: random block configurations against the float64 reference.

Each configuration draws a block type, channels, groups, stride, an input of batch 0-3 and odd
sizes down to 1x1, a dtype, a memory format, a mode (eval, eval with autograd, train) and a
backend (the CPU kernels or the Triton kernels under the interpreter), and compares outputs,
every gradient and the running statistics with the reference block computed in float64
(tests/harness.py tolerances). Where the reference raises (a train-mode BatchNorm that sees one
value per channel), the fused block must raise the same kind of error.

    RESFUSED_FUZZ_CONFIGS   how many configurations (default 500: what CI runs; `make fuzz` 10000)
    RESFUSED_FUZZ_SEED      the seed (default fixed); a failure prints it with the config's index

Train mode and eval with autograd are drawn in float32 only: in bfloat16 a one-ulp difference
next to a ReLU kink decides whether a gradient element passes, in eager and fused alike, so an
elementwise rule would compare coin flips (tests/test_training.py checks bf16 training apart).
"""

import copy
import dataclasses
import os
import random

import pytest
import torch

import resfused
from resfused import reference as R

from harness import assert_matches_reference, forward_backward, randomize_bn

CONFIGS = int(os.environ.get("RESFUSED_FUZZ_CONFIGS", "500"))
SEED = int(os.environ.get("RESFUSED_FUZZ_SEED", "20261130"))
PER_TEST = 25
BLOCKS = ("BasicBlock", "PreActBasicBlock", "Bottleneck", "ResNeXtBottleneck", "PreActBottleneck")


@dataclasses.dataclass(frozen=True)
class Config:
    index: int
    block: str
    args: tuple
    batch: int
    height: int
    width: int
    dtype: torch.dtype
    channels_last: bool
    mode: str  # "eval" | "eval+grad" | "train"
    backend: str  # "cpu" | "triton"

    def __str__(self) -> str:
        return (
            f"config {self.index} (RESFUSED_FUZZ_SEED={SEED}): {self.block}{self.args} on "
            f"{self.batch}x{self.args[0]}x{self.height}x{self.width} {self.dtype} "
            f"{'channels_last' if self.channels_last else 'NCHW'}, {self.mode}, backend {self.backend}"
        )


def draw(index: int) -> Config:
    rng = random.Random(SEED * 1_000_003 + index)
    block = rng.choice(BLOCKS)
    stride = rng.choice((1, 2))
    if block == "ResNeXtBottleneck":
        groups, base_width, planes = rng.choice((2, 4, 8)), rng.choice((4, 8, 16)), rng.choice((16, 32))
        args_tail = (stride, groups, base_width)
    elif block == "PreActBottleneck":
        planes, groups = rng.randint(1, 8), 1
        args_tail = (stride,)
    else:
        planes = rng.randint(1, 12 if block == "Bottleneck" else 24)
        args_tail = (stride,)
    in_ch = planes * (4 if "Bottleneck" in block else 1) if rng.random() < 0.5 else rng.randint(1, 32)
    mode = rng.choice(("eval", "eval", "eval+grad", "train"))
    if mode != "eval":
        # A gradient tensor of one or two elements is a single long sum, where cancellation can
        # leave it far below its terms: float32 itself cannot meet a rule scaled by max|ref| there.
        # With >= 4 channels every weight gradient has >= 16 elements to scale by.
        planes, in_ch = max(planes, 4), max(in_ch, 4)
    backend = "triton" if mode == "eval" and rng.random() < 0.25 else "cpu"
    dtype = torch.bfloat16 if mode == "eval" and rng.random() < 0.3 else torch.float32
    batch, height, width = rng.randint(0, 3), rng.randint(1, 9), rng.randint(1, 9)
    if mode == "train":
        # Batch statistics over a handful of values are ill-conditioned in float32 itself (the
        # BN backward divides by their spread): train on >= 8 values per channel at every BN,
        # and now and then on an input too small for BN, which must raise as the reference does.
        batch, height, width = rng.randint(2, 3), rng.randint(4, 9), rng.randint(4, 9)
        if rng.random() < 0.1:
            batch, height, width = 1, 1, 1
    return Config(
        index,
        block,
        (in_ch, planes, *args_tail),
        batch=batch,
        height=height,
        width=width,
        dtype=dtype,
        channels_last=rng.random() < 0.5,
        mode=mode,
        backend=backend,
    )


def check(cfg: Config) -> None:
    torch.manual_seed(cfg.index)
    ref = randomize_bn(getattr(R, cfg.block)(*cfg.args), torch.Generator().manual_seed(cfg.index))
    ref = ref.train(cfg.mode == "train").to(cfg.dtype)
    fused = getattr(resfused, cfg.block).from_reference(copy.deepcopy(ref))
    x = torch.randn(cfg.batch, cfg.args[0], cfg.height, cfg.width, dtype=torch.float32).to(cfg.dtype)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref64 = copy.deepcopy(ref).double()
    grad = None
    try:
        if cfg.mode != "eval":
            with torch.no_grad():
                shape = copy.deepcopy(ref64)(x.double()).shape
            grad = torch.randn(shape, dtype=torch.float64).to(cfg.dtype)
        expected = forward_backward(ref64, x.double(), None if grad is None else grad.double())
    except (ValueError, RuntimeError) as error:  # e.g. train-mode BN with one value per channel
        with pytest.raises(type(error)), resfused.use_backend(cfg.backend):
            forward_backward(fused, x, torch.ones(1, dtype=cfg.dtype) if cfg.mode != "eval" else None)
        return
    eager = None
    if cfg.dtype != torch.float32:
        with torch.no_grad():
            eager = copy.deepcopy(ref)(x)
    with resfused.use_backend(cfg.backend), torch.set_grad_enabled(cfg.mode != "eval"):
        actual = forward_backward(fused, x, grad)
    assert_matches_reference(actual[0], expected[0], cfg.dtype, eager, f"{cfg}: output")
    for key, value in expected[1].items():
        assert actual[1][key] is not None, f"{cfg}: no gradient for {key}"
        assert_matches_reference(actual[1][key], value, cfg.dtype, None, f"{cfg}: grad {key}")
    for key, value in expected[2].items():
        if key.endswith("num_batches_tracked"):
            assert torch.equal(actual[2][key], value), f"{cfg}: {key}"
        else:
            assert_matches_reference(actual[2][key], value, cfg.dtype, None, f"{cfg}: buffer {key}")


@pytest.mark.parametrize("start", range(0, CONFIGS, PER_TEST))
def test_random_configurations_match_the_reference(start):
    for index in range(start, min(start + PER_TEST, CONFIGS)):
        check(draw(index))


def test_the_draw_covers_every_axis():
    configs = [draw(i) for i in range(CONFIGS)]
    assert {c.block for c in configs} == set(BLOCKS)
    assert {c.mode for c in configs} == {"eval", "eval+grad", "train"}
    assert {c.backend for c in configs} == {"cpu", "triton"}
    assert {c.dtype for c in configs} == {torch.float32, torch.bfloat16}
    assert {c.batch for c in configs} == {0, 1, 2, 3} and min(c.height for c in configs) == 1
