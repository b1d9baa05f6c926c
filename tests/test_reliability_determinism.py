"""Issue 11 item 6, deterministic mode: under `torch.use_deterministic_algorithms(True)` (ComfyUI's
--deterministic) the atomics-based "per_offset" sparse conv runs as the atomics-free "gather" path, the
whole tiny chain runs without an op refusing, and it gives the same mesh as the default mode on CPU.
On CUDA (gpu marker) two runs in deterministic mode, in fresh processes, give the same mesh bit for bit."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from s2core import loading
from s2core import pipeline as P
from s2core.sparse import SparseTensor
from s2core.sparse.conv import sparse_conv3d
from tiny_chain import STEPS, mesh_hash, picture

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def deterministic():
    was, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was, warn_only=warn)


def _sparse(n=300, c=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    xyz = torch.unique(torch.randint(0, 12, (n, 3), generator=g), dim=0)
    coords = torch.cat([torch.zeros(len(xyz), 1, dtype=torch.long), xyz], 1).int()
    feats = torch.randn(len(xyz), c, generator=g)
    return SparseTensor(feats, coords, 1), torch.randn(27, c, 24, generator=g)


def test_per_offset_runs_as_gather_in_deterministic_mode(deterministic):
    x, w = _sparse()
    assert torch.equal(sparse_conv3d(x, w, algo="per_offset"), sparse_conv3d(x, w, algo="gather"))


def test_per_offset_is_its_own_path_otherwise():
    """Without the flag per_offset sums 27 partial GEMMs (different rounding from gather's one GEMM): the
    switch above is what made the results equal, not a coincidence of this input."""
    x, w = _sparse()
    a, b = sparse_conv3d(x, w, algo="per_offset"), sparse_conv3d(x, w, algo="gather")
    assert torch.allclose(a, b, atol=1e-4) and not torch.equal(a, b)


def test_whole_chain_runs_in_deterministic_mode_and_matches_default():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        models = loading.load_models("tiny-random", ("dense", "sparse_512"))
        img, mask = picture()
        default = mesh_hash(P.image_to_mesh(models, img, mask, seed=5, **STEPS))
        torch.use_deterministic_algorithms(True)
        try:
            strict = mesh_hash(P.image_to_mesh(models, img, mask, seed=5, **STEPS))
        finally:
            torch.use_deterministic_algorithms(False)
    finally:
        torch.set_num_threads(n)
    assert strict == default  # CPU: every op is already deterministic; the mode only refuses or reroutes


GPU_SNIPPET = """
import sys, torch
torch.use_deterministic_algorithms(True)
sys.path.insert(0, {tests!r})
import test_reliability_determinism as t
m = t.loading.load_models("tiny-random", ("dense", "sparse_512"), device="cuda")
img, mask = t.picture()
print(t.mesh_hash(t.P.image_to_mesh(m, img.cuda(), mask.cuda(), seed=5, **t.STEPS)))
"""


@pytest.mark.gpu
def test_gpu_deterministic_mode_same_mesh_across_processes():
    env = dict(os.environ, PYTHONPATH=str(REPO), CUBLAS_WORKSPACE_CONFIG=":4096:8")
    code = GPU_SNIPPET.format(tests=str(REPO / "tests"))
    runs = [subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=600) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    assert runs[0].stdout.split()[-1] == runs[1].stdout.split()[-1]
