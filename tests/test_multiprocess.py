"""A fused model shared with worker processes (torch.multiprocessing, fork and spawn) gives each
worker the original model's result. With fork the workers inherit the parent's folded and packed
weights, built by a forward before the pool starts; with spawn the model is pickled, which drops
those caches, and each worker rebuilds them."""

import copy

import pytest
import torch
import torch.multiprocessing as mp

import resfused
from tests.harness import assert_matches_reference, randomize_bn

tv = pytest.importorskip("torchvision")
_INHERITED = None  # the model fork workers use: set in the parent before the pool starts


def _run_inherited(x):
    torch.set_num_threads(1)
    with torch.inference_mode():
        return _INHERITED(x)


def _run_pickled(args):
    model, x = args
    torch.set_num_threads(1)
    with torch.inference_mode():
        return model(x)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_workers_get_the_original_models_results(method):
    global _INHERITED
    torch.manual_seed(0)
    model = randomize_bn(tv.models.resnet18(weights=None, num_classes=10)).eval()
    fused = resfused.fuse(model)
    xs = [torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last) for _ in range(4)]
    with torch.inference_mode():
        fused(xs[0])  # the caches are populated before the workers start
    _INHERITED = fused if method == "fork" else None  # before the pool forks its workers
    try:
        with mp.get_context(method).Pool(2) as pool:
            if method == "fork":
                outputs = pool.map_async(_run_inherited, xs).get(timeout=300)
            else:
                outputs = pool.map_async(_run_pickled, [(fused, x) for x in xs]).get(timeout=300)
    finally:
        _INHERITED = None
    reference64 = copy.deepcopy(model).double()
    with torch.no_grad():
        for i, (x, y) in enumerate(zip(xs, outputs)):
            assert_matches_reference(y, reference64(x.double()), torch.float32, what=f"{method} worker, input {i}")
