"""nn.SyncBatchNorm in training mode inside fused blocks, across 2 processes (NCCL, one GPU each).

A fused module holding a SyncBatchNorm in training mode runs its reference forward, so torch's
SyncBatchNorm computes the batch statistics over every process's batch. Checked here with unequal
local batches: the fused model's output, gradients and running statistics match the unfused model
under the same process group, and the running statistics are the ones of the whole global batch
(a single-process float64 BatchNorm over the concatenated batch).

torch accepts SyncBatchNorm's synchronized training only on GPU-like devices (it raises for CPU
tensors once a process group exists), so this needs two CUDA devices: `multi_gpu`.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import resfused

from harness import FP32_RTOL, randomize_bn

tv = pytest.importorskip("torchvision")
WORLD = 2
LOCAL_BATCH = (3, 5)  # unequal on purpose: the global statistics weight each process by its count


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(fused: bool, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = randomize_bn(tv.models.resnet18(weights=None, num_classes=10))
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model).to(device).train()
    return resfused.fuse(model) if fused else model


def _inputs(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(LOCAL_BATCH[rank], 3, 32, 32, generator=g)


def _step(rank: int, port: int, out: dict) -> None:
    os.environ.setdefault("NCCL_DEBUG", "WARN")
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        device = f"cuda:{rank}"
        torch.cuda.set_device(device)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        results = {}
        for fused in (False, True):
            model = _model(fused, device)
            x = _inputs(rank).to(device)
            y = model(x)
            y.square().mean().backward()
            results[fused] = {
                "y": y.detach().cpu(),
                "grads": {n: p.grad.detach().cpu() for n, p in model.named_parameters()},
                "state": {k: v.detach().cpu() for k, v in model.state_dict().items()},  # the original's keys
            }
        out[rank] = results
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.multi_gpu
def test_fused_sync_batchnorm_trains_with_global_statistics():
    if torch.cuda.device_count() < WORLD:
        pytest.skip(f"needs {WORLD} GPUs")
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_step, args=(_free_port(), out), nprocs=WORLD, join=True)
        out = dict(out)
    for rank in range(WORLD):
        eager, fused = out[rank][False], out[rank][True]
        torch.testing.assert_close(fused["y"], eager["y"], rtol=FP32_RTOL, atol=FP32_RTOL)
        for name, grad in eager["grads"].items():
            torch.testing.assert_close(fused["grads"][name], grad, rtol=FP32_RTOL, atol=FP32_RTOL, msg=name)
        for key, value in eager["state"].items():
            torch.testing.assert_close(fused["state"][key], value, rtol=FP32_RTOL, atol=FP32_RTOL, msg=key)
    # Synchronized: both processes hold the statistics of the whole batch of 8.
    state0, state1 = out[0][True]["state"], out[1][True]["state"]
    torch.testing.assert_close(state0["bn1.running_mean"], state1["bn1.running_mean"], rtol=0, atol=0)
    expected = _global_stem_statistics()
    for stat in ("running_mean", "running_var"):
        torch.testing.assert_close(state0[f"bn1.{stat}"].double(), expected[stat], rtol=1e-4, atol=1e-5, msg=stat)


def _global_stem_statistics() -> dict:
    """The stem BN's running statistics after one training step over the concatenated global
    batch, in float64 and one process."""
    model64 = _model(False, "cpu").double()
    stem = torch.nn.BatchNorm2d(64, momentum=model64.bn1.momentum).double()
    stem.load_state_dict(model64.bn1.state_dict())
    with torch.no_grad():
        stem(model64.conv1(torch.cat([_inputs(r) for r in range(WORLD)]).double()))
    return {"running_mean": stem.running_mean, "running_var": stem.running_var}
