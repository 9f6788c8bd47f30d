import os

# The Triton kernels are checked on the CPU by the interpreter (docs/design.md, "Checking GPU code
# without a GPU"); it must be chosen before triton is imported. On a GPU machine run with
# TRITON_INTERPRET=0 to launch for real.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


# The compiled CPU kernels every suite run must have. Without them most test modules would skip,
# so under `make test` and CI (RESFUSED_REQUIRE_NATIVE=1) a missing or broken _C stops the run.
REQUIRED_CPU_OPS = (
    "add_relu",
    "scale_shift_act",
    "bn_train_act",
    "grouped_conv3x3",
    "winograd_f43_input",
    "all_finite",
)


def pytest_sessionstart(session):
    if os.environ.get("RESFUSED_REQUIRE_NATIVE", "0") in ("", "0"):
        return
    from resfused import _native

    if not _native.loaded:
        pytest.exit(f"RESFUSED_REQUIRE_NATIVE=1 but resfused._C did not load: {_native.load_error}", returncode=1)
    missing = [op for op in REQUIRED_CPU_OPS if not _native.has_kernel(op, "cpu")]
    if missing:
        pytest.exit(
            f"RESFUSED_REQUIRE_NATIVE=1 but resfused._C has no CPU kernel for {missing} (a stale build?)", returncode=1
        )


@pytest.fixture(autouse=True)
def _seed_and_backend():
    torch.manual_seed(0)
    import resfused

    previous = resfused.get_backend()
    yield
    resfused.backend._current = previous  # a test that forced a backend does not leak it


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (and TRITON_INTERPRET=0)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
