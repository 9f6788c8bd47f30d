"""Each variant timed in a process of its own, its rounds still interleaved with the others'.

Why: glibc's malloc keeps or trims freed memory per process, so a variant timed in the same
process as another inherits the other's heap: eager NCHW resnet50 at batch 8 took ~650 ms per
forward in a process of its own but 435 ms in one that also ran the fused model, whose freed
buffers it reused (docs/measurements.md, Benchmark method). So every variant
lives in a spawned worker that builds its module from a picklable recipe and times calls on
request, and the parent interleaves the rounds (common.interleaved_rounds) as it does in-process.

    with WorkerPool(threads=2) as pool:
        info = pool["fused"].build(functools.partial(make_variant, "fused", case))
        timings = common.interleaved_rounds({n: pool[n] for n in names}, ...)

A recipe is a picklable zero-argument callable (a top-level function or a functools.partial of
one) returning (call, info): `call` is what gets timed, `info` a picklable dict sent back.
"""

from __future__ import annotations

import importlib
import multiprocessing
import traceback

import torch

from benchmarks.common import InProcessRunner


def _serve(conn, threads: int, preload: tuple[str, ...]) -> None:
    """The worker's loop: build a variant, warm it up, time it, until told to stop."""
    torch.set_num_threads(threads)
    for module in preload:  # the slow imports, while the other workers start too
        importlib.import_module(module)
    conn.send(("ok", "ready"))
    runner = None
    while True:
        op, arg = conn.recv()
        try:
            if op == "stop":
                conn.send(("ok", None))
                return
            if op == "build":
                runner = None  # the previous case's module is freed before the next is built
                call, info = arg()
                runner = InProcessRunner(call, threads)
                reply = info
            elif op == "warm_up":
                reply = runner.warm_up(arg)
            elif op == "time":
                reply = runner.time(arg)
            else:
                raise ValueError(f"unknown request {op!r}")
            conn.send(("ok", reply))
        except Exception:
            conn.send(("error", traceback.format_exc()))


class Worker:
    """A spawned process holding one variant; `warm_up` / `time` follow the runner protocol of
    common.interleaved_rounds."""

    def __init__(self, name: str, threads: int, preload: tuple[str, ...] = ()):
        ctx = multiprocessing.get_context("spawn")  # fork after OpenMP has started is unsafe
        self.name = name
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, threads, preload), daemon=True, name=f"bench-{name}")
        self._proc.start()
        self._ready = False

    def _reply(self, op: str):
        status, value = self._conn.recv()
        if status == "error":
            raise RuntimeError(f"benchmark worker {self.name!r} failed on {op!r}:\n{value}")
        return value

    def wait_ready(self) -> None:
        if not self._ready:
            self._reply("start")
            self._ready = True

    def send(self, op: str, arg=None) -> None:
        self.wait_ready()
        self._conn.send((op, arg))

    def _ask(self, op: str, arg=None):
        self.send(op, arg)
        return self._reply(op)

    def build(self, recipe) -> dict:
        return self._ask("build", recipe)

    def warm_up(self, seconds: float) -> float:
        return self._ask("warm_up", seconds)

    def time(self, number: int) -> float:
        return self._ask("time", number)

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._ask("stop")
            except (EOFError, BrokenPipeError, OSError):
                pass
            self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()


class WorkerPool:
    """Workers by variant name, kept for the whole run. `start(names)` starts several at once
    (their imports overlap); a name not started yet is started on first use."""

    def __init__(self, threads: int, preload: tuple[str, ...] = ()):
        self.threads, self.preload = threads, preload
        self._workers: dict[str, Worker] = {}

    def start(self, names) -> None:
        for name in names:
            if name not in self._workers:
                self._workers[name] = Worker(name, self.threads, self.preload)
        for name in names:
            self._workers[name].wait_ready()

    def build_all(self, recipes: dict) -> dict[str, dict]:
        """Build several variants at once, each in its worker; returns their infos by name."""
        for name, recipe in recipes.items():
            self[name].send("build", recipe)
        return {name: self[name]._reply("build") for name in recipes}

    def __getitem__(self, name: str) -> Worker:
        if name not in self._workers:
            self.start([name])
        return self._workers[name]

    def close(self) -> None:
        for w in self._workers.values():
            w.close()
        self._workers.clear()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
