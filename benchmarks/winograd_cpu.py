"""Micro-benchmark of the CPU Winograd F(4x4, 3x3) conv at the ResNet stage shapes (3x3, stride 1).

    python -m benchmarks.winograd_cpu [--batch 1 8] [--train] [--rounds 7] [--tune]

Inference (default): act(conv3x3(x) + bias) through resfused's Winograd path (kernels/winograd_f43.py)
against oneDNN's direct conv with packed weights and its ReLU post-op, float32, channels_last.
--train: forward + backward (input and weight gradients) through the Winograd autograd function
against ATen's conv (the other training kernel, kernels/conv_train.py). Variants are timed interleaved in one process at
2 threads (median of rounds, benchmarks.common.measure_side_by_side); before timing, each
Winograd result is checked against the direct conv (a wrong fast kernel must not post a number).

"used" (inference): whether the conv op runs Winograd for the case: by the shipped rule
(kernels/conv_winograd.py), or with --tune by measured selection (resfused.set_tuning) done in
this run on the same tensors with a fresh cache, so "used" shows where Winograd was the fastest
candidate here; "tuned" names the tuner's pick (oneDNN's direct conv, Winograd, or ATen's conv
+ tail), with a "*" where it is not the faster of this table's two medians (a near tie in noise).
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from benchmarks.common import measure_side_by_side, relative_difference
from resfused.kernels import winograd_f43
from resfused.kernels.base import ConvParams
from resfused.kernels.conv_onednn import OneDNNConv
from resfused.kernels.conv_train import ScopedConv2d
from resfused.kernels.conv_winograd import WinogradConv
from resfused.ops import conv_bias_act, trace_kernels
from resfused.ops.selection import conv_tuning_key
from resfused.runtime import buffer_cache, tuning_cache

THREADS = 2

SHAPES = [(64, 56), (128, 28), (256, 14), (512, 7)]  # (channels, H = W): ResNet-18/50 3x3 convs


def _check(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    diff = relative_difference(ours, ref)
    if diff > 1e-4:
        raise RuntimeError(f"winograd_cpu: {what} differs from the direct conv by {diff:.2e} (relative)")


def _scoped(fn):
    """fn inside a buffer-cache scope, as fused modules run their convs (runtime/buffer_cache.py):
    without one, whichever case runs first in the process pays a page fault per 4 KiB of every
    fresh buffer (measured: 64 ch @56x56 batch 1 took 1.5 ms instead of 0.55;
    docs/measurements.md, Benchmark method)."""

    def run():
        with buffer_cache.scope():
            return fn()

    return run


def _inference_tensors(c: int, hw: int, batch: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c, hw, hw, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(c, c, 3, 3, generator=g) / (3 * c**0.5), torch.randn(c, generator=g)
    return x, w, b


def _selection(c: int, hw: int, batch: int, tune: bool) -> dict:
    """Whether the conv op picks Winograd for this case: by the shipped rule, or (tune) by measured
    selection in this run with a fresh cache, with the tuner's pick and medians."""
    x, w, b = _inference_tensors(c, hw, batch)
    p = ConvParams(w, b, (1, 1), (1, 1), (1, 1), 1)
    if not tune:
        return {"selection": "table", "used": WinogradConv().supports(x, p, None, None)}
    with tempfile.TemporaryDirectory(prefix="resfused-bench-tuning-") as directory:
        tuning_cache.set_cache_dir(directory)
        try:
            with tuning_cache.enabled_as(True), torch.no_grad(), buffer_cache.scope(), trace_kernels() as ran:
                conv_bias_act(x, p, relu=True, inputs_finite=True)
            entry = tuning_cache.lookup(conv_tuning_key(x, p, None, None, True))
        finally:
            tuning_cache.set_cache_dir(None)
            tuning_cache.forget()
    (choice,) = ran
    if choice.source != "measured":
        raise RuntimeError(f"winograd_cpu: the choice for {c}@{hw} was not measured: {choice}")
    return {"selection": "measured", "used": choice.kernel == "winograd_f43", "tuned_kernel": choice.kernel,
            "tuned_ms": dict(entry["ms"])}  # fmt: skip


def _inference_variants(c: int, hw: int, batch: int) -> dict:
    x, w, b = _inference_tensors(c, hw, batch)
    p, onednn = ConvParams(w, b, (1, 1), (1, 1), (1, 1), 1), OneDNNConv()
    u = winograd_f43.TransformedWeight(w, torch.float64)
    fns = {
        "direct": _scoped(lambda: onednn.run(x, p, None, True, None)),
        "winograd": _scoped(lambda: winograd_f43.conv3x3(x, u, b, None, True)),
    }
    _check(fns["winograd"](), fns["direct"](), f"inference {c}@{hw}")
    return fns


def _training_variants(c: int, hw: int, batch: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c, hw, hw, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
    grad = torch.randn(batch, c, hw, hw, generator=g).contiguous(memory_format=torch.channels_last)

    def step(forward):
        def run():
            x.grad = conv.weight.grad = None
            with buffer_cache.scope():
                y = forward()
            y.backward(grad)
            return x.grad, conv.weight.grad

        return run

    fns = {
        "direct": step(lambda: ScopedConv2d.apply(x, conv.weight, None, [1, 1], [1, 1], [1, 1], 1)),
        "winograd": step(lambda: winograd_f43.conv3x3_train(x, conv.weight)),
    }
    for ours, ref, what in zip(fns["winograd"](), fns["direct"](), ("grad input", "grad weight")):
        _check(ours, ref, f"{what} {c}@{hw}")
    return fns


def run(
    batch_sizes=(1, 8), train: bool = False, rounds: int = 7, verbose: bool = False, tune: bool = False
) -> list[dict]:
    """One dict per (shape, batch). Inference rows also say whether the conv op uses Winograd there
    ("used"; tune: by measured selection in this run, see the module docstring)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        rows = []
        for c, hw in SHAPES:
            for batch in batch_sizes:
                fns = (_training_variants if train else _inference_variants)(c, hw, batch)
                med = {k: t.median_s for k, t in measure_side_by_side(fns, threads=THREADS, min_rounds=rounds).items()}
                row = {
                    "shape": f"{c}->{c} @{hw}x{hw}",
                    "batch": batch,
                    "mode": "train" if train else "inference",
                    "direct_ms": med["direct"] * 1e3,
                    "winograd_ms": med["winograd"] * 1e3,
                    "speedup": med["direct"] / med["winograd"],
                }
                used = ""
                if not train:
                    row.update(_selection(c, hw, batch, tune))
                    used = f"  used: {'yes' if row['used'] else 'no'}"
                    if tune:
                        here = "winograd_f43" if row["speedup"] > 1 else "onednn"
                        used += f" (tuned: {row['tuned_kernel']}{'' if row['tuned_kernel'] == here else '*'})"
                rows.append(row)
                if verbose:
                    print(
                        f"{row['shape']:16s} b{batch:<2d} {row['mode']:9s} direct {row['direct_ms']:7.2f} ms  "
                        f"winograd {row['winograd_ms']:7.2f} ms  {row['speedup']:.2f}x{used}",
                        flush=True,
                    )
        return rows
    finally:
        torch.set_num_threads(previous)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--train", action="store_true", help="forward + backward against ATen's conv")
    ap.add_argument("--rounds", type=int, default=7, help="at least this many interleaved rounds")
    ap.add_argument(
        "--tune", action="store_true", help="'used' from measured kernel selection in this run, not the shipped rule"
    )
    args = ap.parse_args(argv)
    used = "measured selection in this run (fresh cache)" if args.tune else "the shipped rule"
    print(
        f"Winograd F(4x4, 3x3) vs direct conv, float32, {THREADS} threads, "
        f"median of >= {args.rounds} interleaved rounds; 'used': the conv op runs Winograd, by {used}"
    )
    run(args.batch, args.train, args.rounds, verbose=True, tune=args.tune)


if __name__ == "__main__":
    main()
