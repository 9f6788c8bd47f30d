import os

# The Triton kernels are checked on the CPU by the interpreter (DESIGN.md §4); it must be chosen
# before triton is imported. On a GPU machine run with TRITON_INTERPRET=0 to launch for real.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


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
