"""Shared pytest setup: the `gpu` marker skips cleanly without CUDA, the `triton` marker without Triton (as
on Windows without triton-windows: the product then runs its PyTorch references), paths to the test data in the
repository."""
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The release's config.json / config_v1_0.json and the state-dict manifests (one TSV per checkpoint part, written
# from the original code's freshly built modules), kept in the repository so a plain clone tests itself.
UPSTREAM = REPO / "tests" / "data" / "upstream"
MANIFESTS = UPSTREAM / "manifests"
GOLDEN = REPO / "tests" / "golden"


def pytest_collection_modifyitems(config, items):
    from kernels._common import HAS_TRITON

    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none found); runs on the device machine")
    skip_triton = pytest.mark.skip(reason="runs a Triton kernel (the interpreter on a CPU) and Triton is not "
                                          "installed; the PyTorch references are tested without it")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if item.get_closest_marker("triton") is not None and not HAS_TRITON:
            item.add_marker(skip_triton)


@pytest.fixture(scope="session")
def upstream_dir() -> Path:
    return UPSTREAM


@pytest.fixture(scope="session")
def manifests_dir() -> Path:
    return MANIFESTS


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`):
    small CPU ops are dominated by thread start-up on the shared 2-core CI box, and one thread gives
    bit-identical results across runs and processes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
