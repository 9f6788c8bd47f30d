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

Outputs and running statistics are judged by the harness's rules. Gradients (float32) by two more
(docs/design.md, Numerics):

- Kinks. A ReLU input z of the float64 reference with |z| < KINK_ULPS * u * A, where A is the
  float64 sum of the magnitudes of z's terms (_ReluKinks) and u float32's unit roundoff, may come
  out of any float32 computation with either sign (eager and folded convs round differently), and
  the gradient elements behind that ReLU's mask bit then differ by whole terms: a BN in train mode
  spreads one flipped element over its channel. With k such positions, the float64 forward and
  backward are run for every side choice (k <= EXACT_KINKS; beyond, each flip alone, its changes
  summed into a hull), and each gradient element is judged by its distance from the range
  [low, high] of its float64 values. An element that depends on no kink has
  low = high = the float64 gradient: judged exactly as without the rule.
- Eager float32. A gradient passes when that distance is within max(1e-4 * max|ref|,
  2 * eager's distance), eager being the reference block run in float32: the bfloat16 rule's
  comparator, so a configuration float32 itself cannot compute well is judged by what it can do.

Whenever a rule decides a pass (today's comparison alone would have failed), a FuzzRuleApplied
warning names the configuration, the tensor, the rule and the numbers; pytest's warnings summary
lists them. A failure message gives the kink count, how many elements depend on the kinks,
eager's error and the limit.
"""

import copy
import dataclasses
import inspect
import itertools
import os
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import resfused
from resfused import reference as R

from harness import assert_matches_reference, describe_difference, forward_backward, randomize_bn, tolerance

CONFIGS = int(os.environ.get("RESFUSED_FUZZ_CONFIGS", "500"))
SEED = int(os.environ.get("RESFUSED_FUZZ_SEED", "20261130"))
PER_TEST = 25
BLOCKS = ("BasicBlock", "PreActBasicBlock", "Bottleneck", "ResNeXtBottleneck", "PreActBottleneck")
# A ReLU input z of the float64 reference is at a kink when |z| < KINK_ULPS * u * A: u the unit
# roundoff of the dtype, A the float64 sum of the magnitudes of every term that went into z (see
# _ReluKinks). Rounding moves a computed z by ~ u * A: over the 982 gradient configs among the
# first 2,500 drawn, a config's largest |z(eager float32) - z(float64)| / (u * A) was 2 at the
# median and 24 at most (the six largest, 6.5-24, all train-mode PreAct blocks). 32 leaves a margin.
KINK_ULPS = 32
# Gradients at k kink positions: every side choice up to EXACT_KINKS kinks, the hull of the single
# flips beyond (_kink_envelope); a config with more than MAX_KINKS fails, saying how many it has.
EXACT_KINKS = 4
MAX_KINKS = 64
_RELUS = (F.relu, torch.relu, torch.Tensor.relu)


class FuzzRuleApplied(UserWarning):
    """A configuration passed only through the kink rule or the eager-float32 rule (module
    docstring); the message names the configuration, the rule and the numbers. pytest lists these
    in its warnings summary, so no config passes by a rule silently."""


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


class _ReluKinks(TorchFunctionMode):
    """Runs the float64 reference and records, for every ReLU call in order, its input z and the
    magnitude A of z: the float64 value of the same computation with every term replaced by its
    absolute value (conv: conv(A_x, |W|) + |b|; BatchNorm: |s| * (A_x + |mean|) + |beta| with
    s = gamma / sqrt(var + eps) from the running or the batch statistics; add: A_a + A_b; mul:
    A_a |b| + |a| A_b; pooling and means of A_x; anything else: |value|, as if exact). Rounding
    each term and each partial sum to a dtype of unit roundoff u moves z by ~ u * A.

    With `flips` ({ReLU call index: bool mask}) the masked positions take the other side of their
    ReLU: z * ((z > 0) xor flip), whose gradient is the flipped mask and whose value differs from
    relu(z) by |z| (a kink's |z| is a few ulps of A)."""

    def __init__(self, flips: dict | None = None):
        super().__init__()
        self.flips = flips or {}
        self.relus: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._magnitude: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _m(self, t):
        """A of a tensor made under this mode, |t| for anything else (inputs, parameters)."""
        if not isinstance(t, torch.Tensor):
            return abs(t)
        hit = self._magnitude.get(id(t))
        return hit[1] if hit is not None and hit[0] is t else t.detach().abs()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELUS:
            z = args[0]
            a = self._m(z)
            flip = self.flips.get(len(self.relus))
            self.relus.append((z.detach(), a))
            out = func(*args, **kwargs) if flip is None else z * ((z > 0) ^ flip).to(z.dtype)
            self._magnitude[id(out)] = (out, a)
            return out
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            with torch.no_grad():
                self._magnitude[id(out)] = (out, self._propagate(func, args, kwargs, out))
        return out

    def _propagate(self, func, args, kwargs, out):
        m = self._m
        if func is F.conv2d:  # (input, weight, bias, stride, padding, dilation, groups), positional
            bias = args[2] if len(args) > 2 and args[2] is not None else None
            return F.conv2d(m(args[0]), args[1].abs(), None if bias is None else bias.abs(), *args[3:])
        if func is F.batch_norm:  # its torch-function call passes weight, bias, training, eps by keyword
            bound = inspect.signature(F.batch_norm).bind(*args, **kwargs)
            bound.apply_defaults()
            x, mean, var, weight, bias, training, _, eps = bound.arguments.values()
            if training:
                mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
            scale = (1.0 if weight is None else weight) / torch.sqrt(var + eps)
            a = scale.abs()[:, None, None] * (m(x) + mean.abs()[:, None, None])
            return a if bias is None else a + bias.abs()[:, None, None]
        if func in (torch.Tensor.__add__, torch.Tensor.__radd__, torch.add, torch.Tensor.add):
            return m(args[0]) + m(args[1])
        if func in (torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.mul, torch.Tensor.mul):
            return m(args[0]) * abs(args[1]) + abs(args[0]) * m(args[1])
        if func in (F.avg_pool2d, F.adaptive_avg_pool2d, torch.Tensor.mean, torch.mean):
            return func(m(args[0]), *args[1:])
        return out.detach().abs()


def _kinks(relus, dtype: torch.dtype) -> dict:
    """{ReLU call index: bool mask} of the positions whose float64 z lies within KINK_ULPS * u * A of 0."""
    u = torch.finfo(dtype).eps / 2
    found = {}
    for i, (z, a) in enumerate(relus):
        near = z.abs() < KINK_ULPS * u * a
        if near.any():
            found[i] = near
    return found


def _kink_envelope(ref64, x64, grad64, kinks: dict):
    """Elementwise (low, high) of every float64 gradient over the side choices at the k kink
    positions: all 2^k of them up to EXACT_KINKS; beyond, the hull g0 + sum_i min(0, d_i) ..
    g0 + sum_i max(0, d_i) of the k single flips' changes d_i (k + 1 runs), exact for kinks in one
    ReLU (the gradient is linear in one mask; a flip moves the forward by |z| only) and missing
    only products of flips that lie on one another's gradient path."""
    positions = [(i, flat) for i, mask in kinks.items() for flat in mask.flatten().nonzero().flatten().tolist()]

    def gradients(flipped):
        flips = {i: torch.zeros(mask.numel(), dtype=torch.bool) for i, mask in kinks.items()}
        for i, flat in flipped:
            flips[i][flat] = True
        flips = {i: flip.view(kinks[i].shape) for i, flip in flips.items()}  # flat = logical (row-major) order
        with _ReluKinks(flips):
            return forward_backward(copy.deepcopy(ref64), x64, grad64)[1]

    g0 = gradients(())
    if len(positions) <= EXACT_KINKS:
        choices = [
            [p for p, on in zip(positions, bits) if on] for bits in itertools.product((0, 1), repeat=len(positions))
        ]
        runs = [gradients(c) for c in choices[1:]]
        low = {k: torch.stack([g0[k]] + [r[k] for r in runs]).amin(0) for k in g0}
        high = {k: torch.stack([g0[k]] + [r[k] for r in runs]).amax(0) for k in g0}
        return low, high
    low, high = dict(g0), dict(g0)
    for position in positions:
        flipped = gradients([position])
        low = {k: low[k] + (flipped[k] - g0[k]).clamp(max=0) for k in g0}
        high = {k: high[k] + (flipped[k] - g0[k]).clamp(min=0) for k in g0}
    return low, high


def _outside(t: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Elementwise distance of t from the interval [low, high] (0 inside)."""
    return (t - high).clamp(min=0) + (low - t).clamp(min=0)


def _judge_gradient(actual, expected, low, high, eager, kinks: int, what: str) -> list[str]:
    """The fuzz's judgement of one float32 gradient (module docstring): distance from the float64
    answers [low, high] (low = high = expected without kinks) within max(1e-4 * max|expected|,
    2 * eager float32's own distance). Returns a note for each rule that decided the pass."""
    a, e = actual.detach().double(), expected.detach().double()
    lo, hi, ea = low.double(), high.double(), eager.detach().double()
    primary = tolerance(e, torch.float32)
    pattern = (a.isnan() != e.isnan()) | (a.isposinf() != e.isposinf()) | (a.isneginf() != e.isneginf())
    assert not pattern.any(), f"{what}: " + describe_difference(a, e, primary)
    finite = e.isfinite()
    plain = float((a - e).abs()[finite].max()) if finite.any() else 0.0
    err = float(_outside(a, lo, hi)[finite].max()) if finite.any() else 0.0
    eager_err = float(_outside(ea, lo, hi)[finite].max()) if finite.any() else 0.0
    limit = max(primary, 2.0 * eager_err)
    kink_elements = int((lo != hi).sum())
    state = (
        f"[{kinks} kink position(s), {kink_elements} element(s) of this gradient depend on them; "
        f"eager float32's error {eager_err:.3e}; limit max(1e-4 * max|ref| = {primary:.3e}, 2 x eager) = {limit:.3e}]"
    )
    assert err <= limit, (
        f"{what}: {describe_difference(a, e, limit)}; distance from the float64 answers {err:.3e} {state}"
    )
    notes = []
    if plain > primary and err < plain:
        notes.append(f"kink rule: error {plain:.3e} against the float64 answer, {err:.3e} against both sides {state}")
    if err > primary:
        notes.append(f"eager float32 rule: error {err:.3e} > 1e-4 * max|ref| {state}")
    return notes


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
        expected = forward_backward(copy.deepcopy(ref64), x.double(), None if grad is None else grad.double())
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
    if cfg.mode == "eval":
        # The second call of a signature replays the plan the first recorded (blocks.py, runners.Plan):
        # the same bound kernels on the same tensors, so the same output bit for bit.
        with resfused.use_backend(cfg.backend), torch.no_grad():
            again = fused(x)
        assert fused._derived is not None and fused._derived.plans, f"{cfg}: no plan was recorded"
        torch.testing.assert_close(again, actual[0], rtol=0, atol=0, equal_nan=True, msg=f"{cfg}: replayed output")
    # Gradients (float32 only, see the draw). The two rules only ever widen the harness's float32
    # limit, so a gradient within it passes as before; the rest go to _judge_gradient, with the
    # kinks, their float64 range and eager float32's gradients computed only then.
    beyond = []
    for key, value in expected[1].items():
        assert actual[1][key] is not None, f"{cfg}: no gradient for {key}"
        try:
            assert_matches_reference(actual[1][key], value, cfg.dtype, None, f"{cfg}: grad {key}")
        except AssertionError:
            beyond.append(key)
    if beyond:
        recorder = _ReluKinks()
        with recorder:
            forward_backward(copy.deepcopy(ref64), x.double(), grad.double())
        kinks = _kinks(recorder.relus, cfg.dtype)
        count = sum(int(mask.sum()) for mask in kinks.values())
        assert count <= MAX_KINKS, f"{cfg}: {count} ReLU inputs at a kink (> MAX_KINKS = {MAX_KINKS})"
        low, high = _kink_envelope(ref64, x.double(), grad.double(), kinks) if kinks else (expected[1], expected[1])
        eager_grads = forward_backward(copy.deepcopy(ref), x, grad)[1]
        for key in beyond:
            what = f"{cfg}: grad {key}"
            for note in _judge_gradient(
                actual[1][key], expected[1][key], low[key], high[key], eager_grads[key], count, what
            ):
                warnings.warn(FuzzRuleApplied(f"{what}: {note}"), stacklevel=1)
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


def test_the_kink_rule_judges_both_sides_and_nothing_else():
    """Synthetic: element 0 depends on a kink (float64 answers 0 or 1), element 1 on none."""
    e = torch.tensor([0.0, 1.0])
    low, high = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])
    for actual, passes in (([1.0, 1.0], True), ([0.0, 1.0], True), ([1.01, 1.0], False), ([1.0, 1.01], False)):
        judged = lambda: _judge_gradient(torch.tensor(actual), e, low, high, e, 1, "synthetic")  # noqa: E731
        if passes:
            notes = judged()
            assert [n.startswith("kink rule") for n in notes] == ([True] if actual[0] else [])
        else:
            with pytest.raises(AssertionError, match="1 kink position"):
                judged()


def test_the_eager_rule_allows_twice_eager_float32s_error():
    e = torch.tensor([1.0, -1.0])
    eager = e + torch.tensor([0.01, 0.0])  # float32 itself is off by 0.01 here (limit 2e-2 > 1e-4)
    notes = _judge_gradient(e + torch.tensor([0.0, 0.015]), e, e, e, eager, 0, "synthetic")
    assert len(notes) == 1 and notes[0].startswith("eager float32 rule")
    with pytest.raises(AssertionError, match="eager float32's error 1.000e-02"):
        _judge_gradient(e + torch.tensor([0.0, 0.021]), e, e, e, eager, 0, "synthetic")
    assert _judge_gradient(e + 5e-5, e, e, e, e, 0, "synthetic") == []  # the harness's float32 rule


@pytest.mark.parametrize(
    "index, tensors",
    [
        # BasicBlock(28, 19, 1), eval+grad: one conv1+bn1 output at -5.0e-8 in float64 (0.15 u * A,
        # A = 5.46), eager float32 -7.3e-8, the folded conv +3.0e-8: 168 input-gradient elements move.
        (4346, {"input", "conv1.weight", "bn1.weight", "bn1.bias"}),
        # Bottleneck(28, 7, 1), train: bn2's output -9.6e-9 (0.004 u * A, A = 42) before conv3 and a
        # train-mode bn3, which spread the flip over its channel; eager float32 takes the other
        # side as well (0.509 from float64, as the fused block).
        (7978, {"input", "conv1.weight", "bn1.weight", "bn1.bias", "conv2.weight", "bn2.weight", "bn2.bias"}),
    ],
)
def test_configurations_at_a_kink_pass_by_the_kink_rule(index, tensors):
    with pytest.warns(FuzzRuleApplied) as record:
        check(draw(index))
    noted = {str(w.message).split(": grad ")[1].split(":")[0] for w in record}
    assert noted == tensors and all("kink rule" in str(w.message) for w in record)
