"""The runtimes a CPU deployer would pick instead of resfused: ONNX Runtime and OpenVINO.

    python -m benchmarks --models-only --onnx        (needs the `bench` extra: onnx, onnxruntime, openvino)

Each model case is exported once with `torch.onnx.export` (to a file per case under the system's
temporary folder, reused by the second runtime's worker) and run with every graph optimization
and the benchmark's thread count: ONNX Runtime with `intra_op_num_threads` (one inter-op thread),
OpenVINO with `INFERENCE_NUM_THREADS`, the latency hint and f32 inference precision. The output
is checked against eager PyTorch like every other variant. float32 only: the export of a bf16
model is not what a deployer of these runtimes would run.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import time

import torch

RUNTIMES = ("onnxruntime", "openvino")


def missing_packages() -> list[str]:
    """The packages of the `bench` extra that --onnx needs and this environment lacks."""
    return [name for name in ("onnx", "onnxruntime", "openvino") if importlib.util.find_spec(name) is None]


def _export(model: torch.nn.Module, x: torch.Tensor, key: str) -> tuple[str, float]:
    """The model exported for input shape x (once per `key`); returns (path, seconds it took, 0 if reused)."""
    path = os.path.join(tempfile.gettempdir(), f"resfused-bench-{key}.onnx")
    if os.path.exists(path):
        return path, 0.0
    t0 = time.perf_counter()
    partial = f"{path}.{os.getpid()}.part"
    with torch.no_grad():
        torch.onnx.export(model, (x,), partial, dynamo=False, opset_version=17, input_names=["x"])
    os.replace(partial, path)  # the other runtime's worker never sees a half-written file
    return path, time.perf_counter() - t0


def build(runtime: str, model: torch.nn.Module, x: torch.Tensor, key: str, threads: int):
    """(call, info) for isolation.Worker.build: `call` runs the exported model in `runtime`;
    info holds the output (as a torch tensor, for the sanity check) and the export time."""
    if runtime not in RUNTIMES:
        raise ValueError(f"onnx_baselines.build: 'runtime' must be one of {RUNTIMES}, got {runtime!r}")
    if x.dtype != torch.float32:
        raise ValueError(f"onnx_baselines.build: float32 only, got {x.dtype}")
    path, export_s = _export(model, x, key)
    feed = x.contiguous().numpy()
    if runtime == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

        def call():
            return session.run(None, {"x": feed})[0]

    else:
        import openvino as ov

        compiled = ov.Core().compile_model(
            path,
            "CPU",
            {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"},
        )
        request = compiled.create_infer_request()

        def call():
            return request.infer({0: feed})[compiled.output(0)]

    output = torch.from_numpy(call().copy()).float()
    return call, {"output": output, "export_time_s": export_s}
