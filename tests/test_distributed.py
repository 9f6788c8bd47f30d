"""A fused model under DistributedDataParallel (gloo, 2 processes on the loopback address, started by
the test) trains like the unfused model under DDP: the same loss, gradients and running statistics.

fp32 training of a whole network is sensitive by itself (train-mode BatchNorm over few values
amplifies rounding, and the optimizer feeds differences back), so the fused run is judged against
the spread between two eager runs that differ only in memory format (NCHW vs channels_last): no
loss, first-step gradient, parameter or running statistic of the fused run may be further from
the eager NCHW run than twice that spread plus a float32 rounding step of the tensor's scale.
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
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(variant: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = randomize_bn(tv.models.resnet18(weights=None, num_classes=10)).train()
    if variant == "fused":
        model = resfused.fuse(model)
    elif variant == "eager_cl":
        model = model.to(memory_format=torch.channels_last)
    return model


def _train(rank: int, port: int, variant: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        ddp = torch.nn.parallel.DistributedDataParallel(_model(variant), find_unused_parameters=False)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        losses, first_grads = [], None
        for step in range(STEPS):
            x = torch.randn(4, 3, 32, 32, generator=g)
            if variant != "eager_nchw":
                x = x.contiguous(memory_format=torch.channels_last)
            target = torch.randint(0, 10, (4,), generator=g)
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(ddp(x), target)
            loss.backward()
            if step == 0:
                first_grads = {n: p.grad.detach().clone() for n, p in ddp.module.named_parameters()}
            opt.step()
            losses.append(loss.item())
        if rank == 0:
            state = {k: v.detach().clone() for k, v in ddp.module.state_dict().items()}
            out[variant] = {"losses": losses, "grads": first_grads, "state": state}
    finally:
        dist.destroy_process_group()


def _run(variant: str) -> dict:
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_train, args=(_free_port(), variant, out), nprocs=WORLD, join=True)
        return dict(out[variant])


def _distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


@pytest.mark.slow
def test_ddp_training_steps_match_the_unfused_model():
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    eager, eager_cl, fused = _run("eager_nchw"), _run("eager_cl"), _run("fused")

    for i in range(STEPS):
        spread = abs(eager["losses"][i] - eager_cl["losses"][i])
        assert abs(fused["losses"][i] - eager["losses"][i]) <= 2 * spread + 1e-6, (i, fused["losses"], eager["losses"])

    # Parameter names of the fused stem differ (conv1 and bn1 move under one ConvBNAct); its
    # state_dict keeps the original keys.
    stem = {"conv1.weight": "conv1.conv.weight"}
    stem |= {
        f"bn1.{k}": f"conv1.bn.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    }
    compared = 0
    for what in ("grads", "state"):
        for key, expected in eager[what].items():
            actual = fused[what][stem.get(key, key) if what == "grads" else key]
            if not expected.is_floating_point():
                assert torch.equal(actual, expected), (what, key)
                continue
            spread = _distance(eager_cl[what][key], expected)
            limit = 2 * spread + FP32_RTOL * float(expected.abs().max())
            assert _distance(actual, expected) <= limit, (what, key, _distance(actual, expected), spread)
            compared += 1
    assert compared == len(eager["grads"]) + sum(t.is_floating_point() for t in eager["state"].values())
