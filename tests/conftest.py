"""Shared pytest setup: the `gpu` marker skips cleanly without CUDA, the `triton` marker without Triton (as
on Windows without triton-windows: the product then runs its PyTorch references), paths to the test data in the
repository, `golden()` (a missing fixture fails, naming its generator), and the node pack loaded with ComfyUI
stubbed (`stubs`, the `pack` and `pack_v3` fixtures)."""

import importlib.util
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The release's config.json / config_v1_0.json and the state-dict manifests (one TSV per checkpoint part, written
# from the original code's freshly built modules), kept in the repository so a plain clone tests itself.
UPSTREAM = REPO / "tests" / "data" / "upstream"
MANIFESTS = UPSTREAM / "manifests"
GOLDEN = REPO / "tests" / "golden"
# Every script that writes a fixture from the original code (docs/TESTING.md, "Where fixtures come from").
GENERATORS = REPO / "tools" / "golden"

# tests/stubs/pack.py by path: a top-level `stubs` package could shadow or be shadowed by an installed one.
_spec = importlib.util.spec_from_file_location("d3ds2_stub_loader", REPO / "tests" / "stubs" / "pack.py")
stubs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stubs)


def golden_path(name: str) -> Path:
    """tests/golden/<name>.safetensors, failing (not skipping) when it or its sidecar is missing: the fixtures
    are committed, so a missing one is a broken checkout or a renamed fixture, never something to pass over."""
    path = GOLDEN / f"{name}.safetensors"
    missing = [p.name for p in (path, path.with_suffix(".json")) if not p.exists()]
    if missing:
        pytest.fail(
            f"Golden fixture {', '.join(missing)} is missing from tests/golden; restore it from git "
            f"(it is regenerated only from the original code: tools/golden/make_golden.py).",
            pytrace=False,
        )
    return path


def golden(name: str):
    """(tensors, sidecar) of tests/golden/<name>; see `golden_path`."""
    from s2core.testing import load_golden

    return load_golden(golden_path(name))


def pytest_collection_modifyitems(config, items):
    from kernels._common import HAS_TRITON

    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none found); runs on the device machine")
    skip_triton = pytest.mark.skip(
        reason="runs a Triton kernel (the interpreter on a CPU) and Triton is not "
        "installed; the PyTorch references are tested without it"
    )
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


@pytest.fixture
def pack(tmp_path):
    """The node pack as ComfyUI imports it (V1 registration), with models/ and output/ under tmp_path."""
    mod = stubs.load_pack(v3=False)
    import folder_paths

    folder_paths.models_dir = str(tmp_path / "models")
    folder_paths.output_directory = str(tmp_path / "output")
    yield mod
    stubs.unload()


@pytest.fixture
def pack_v3():
    """The node pack with the `comfy_api` stub, so it registers through `comfy_entrypoint` (V3)."""
    mod = stubs.load_pack(v3=True)
    yield mod
    stubs.unload()
