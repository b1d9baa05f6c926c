"""kernels/raster.py: the chunked, pair-bounded z-buffer against a per-pixel loop written from the definition.

The loop (`_naive`) tests every triangle at every pixel centre with float64 barycentrics; the reference must
give the same triangle ids wherever the nearest triangle is unambiguous (the depth gap to the runner-up is
more than 1e-4, and the pixel is not within 1e-4 of a covering triangle's edge, where float32 and float64 may
disagree), and depths within 1e-5 (float32 interpolation of values of order 1). Chunking (tiny `tris` and
`max_pairs`) must not change a single bit. No Triton kernel exists yet, so there is no kernel-vs-reference
test; `rasterize` is the reference.
"""

import pytest
import torch

from kernels.raster import depth_key, rasterize, rasterize_reference

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _naive(screen, faces, h, w):
    s = screen.double()
    depth = torch.full((h, w), float("inf"), dtype=torch.float64)
    face = torch.full((h, w), -1, dtype=torch.int64)
    second = torch.full((h, w), float("inf"), dtype=torch.float64)
    edge = torch.zeros((h, w), dtype=torch.bool)
    for j in range(h):
        for i in range(w):
            p = torch.tensor([i + 0.5, j + 0.5], dtype=torch.float64)
            for t, (a, b, c) in enumerate(faces.tolist()):
                A, B, C = s[a], s[b], s[c]
                area = (B[0] - A[0]) * (C[1] - A[1]) - (C[0] - A[0]) * (B[1] - A[1])
                if area == 0:
                    continue
                b1 = ((p[0] - A[0]) * (C[1] - A[1]) - (C[0] - A[0]) * (p[1] - A[1])) / area
                b2 = ((B[0] - A[0]) * (p[1] - A[1]) - (p[0] - A[0]) * (B[1] - A[1])) / area
                b0 = 1 - b1 - b2
                if min(b0, b1, b2) < -1e-6:
                    continue
                edge[j, i] |= bool(min(b0, b1, b2) < 1e-4)
                z = float(b0 * A[2] + b1 * B[2] + b2 * C[2])
                if z < depth[j, i]:
                    second[j, i], depth[j, i], face[j, i] = depth[j, i], z, t
                elif z < second[j, i]:
                    second[j, i] = z
    return depth, face, (second - depth > 1e-4) & ~edge


def _scene(seed, n_tris, h, w):
    g = torch.Generator().manual_seed(seed)
    screen = torch.rand(n_tris * 3, 3, generator=g) * torch.tensor([w * 1.4, h * 1.4, 2.0]) - torch.tensor(
        [w * 0.2, h * 0.2, 1.0]
    )  # some vertices off screen, depths of both signs
    faces = torch.arange(n_tris * 3).view(n_tris, 3)
    return screen, faces


@pytest.mark.parametrize(
    "seed,n_tris,h,w", [(0, 7, 9, 13), (1, 12, 16, 5), (2, 1, 8, 8), (3, 25, 11, 17)], ids=lambda x: str(x)
)
def test_matches_per_pixel_loop(seed, n_tris, h, w):
    screen, faces = _scene(seed, n_tris, h, w)
    depth, face = rasterize_reference(screen, faces, h, w)
    nd, nf, clear = _naive(screen, faces, h, w)
    assert (face >= 0).sum() > 0
    assert torch.equal(face[clear], nf[clear])
    hit = nf >= 0
    assert torch.equal(face >= 0, hit) or ((face >= 0) != hit).sum() <= (~clear).sum()
    both = hit & (face >= 0) & clear
    assert torch.allclose(depth[both].double(), nd[both], atol=1e-5)
    assert torch.isinf(depth[face < 0]).all()


def test_chunking_changes_nothing():
    screen, faces = _scene(4, 40, 24, 31)
    whole = rasterize_reference(screen, faces, 24, 31)
    pieces = rasterize_reference(screen, faces, 24, 31, max_pairs=1, tris=3)  # max_pairs is raised to H*W
    assert torch.equal(whole[1], pieces[1]) and torch.equal(whole[0], pieces[0])


def test_empty_degenerate_and_offscreen():
    d, f = rasterize(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.int64), 5, 6)
    assert f.shape == (5, 6) and (f == -1).all() and torch.isinf(d).all()
    line = torch.tensor([[0.0, 0.0, 0.0], [5.0, 5.0, 0.0], [2.0, 2.0, 0.0]])  # zero area
    far = torch.tensor([[100.0, 100.0, 0.0], [120.0, 100.0, 0.0], [100.0, 130.0, 0.0]])
    nan = torch.tensor([[0.0, 0.0, 0.0], [float("nan"), 5.0, 0.0], [0.0, 5.0, 0.0]])
    for tri in (line, far, nan):
        d, f = rasterize(tri, torch.tensor([[0, 1, 2]]), 6, 6)
        assert (f == -1).all()


def test_single_triangle_both_windings_and_ties():
    tri = torch.tensor([[0.0, 0.0, 0.5], [4.0, 0.0, 0.5], [0.0, 4.0, 0.5]])
    for faces in (torch.tensor([[0, 1, 2]]), torch.tensor([[0, 2, 1]])):
        d, f = rasterize(tri, faces, 4, 4)
        covered = torch.tensor([[i + j <= 3 for i in range(4)] for j in range(4)])  # centres with x + y <= 4
        assert torch.equal(f >= 0, covered)
        assert torch.allclose(d[covered], torch.tensor(0.5))
    d, f = rasterize(tri, torch.tensor([[0, 1, 2], [0, 1, 2]]), 4, 4)  # equal depth: the lower id wins
    assert set(f[f >= 0].tolist()) == {0}


def test_depth_key_preserves_order():
    z = torch.tensor([-float("inf"), -3.5, -1.0, -1e-30, -0.0, 0.0, 1e-30, 0.25, 7.0, float("inf")])
    k = depth_key(z)
    assert (k[1:] > k[:-1]).all()
    assert torch.equal(depth_key(k.view(torch.float32)).view(torch.float32), z)


@pytest.mark.gpu
def test_cuda_matches_cpu_on_a_large_mesh():
    """Same triangle ids on CUDA as on the CPU wherever the nearest triangle is clear (depth gap > 1e-4),
    on 1.6 M faces at 1024² with small `max_pairs` (many groups)."""
    from s2core.colour import Camera
    from s2core.colour.scene import bumpy_shape

    v, f = bumpy_shape(640)
    cam = Camera(30.0, 20.0, 30.0, (0.0, 0.0, 0.0), float(v.norm(dim=1).max()), 480.0, 512.0, 512.0, 1024, 1024)
    screen = cam.project(v)[0]
    d_cpu, f_cpu = rasterize(screen, f, 1024, 1024, max_pairs=1 << 20)
    d_gpu, f_gpu = rasterize(screen.cuda(), f.cuda(), 1024, 1024, max_pairs=1 << 20)
    assert ((f_cpu >= 0) != (f_gpu.cpu() >= 0)).float().mean() < 1e-4  # edge pixels may round either way
    same = (f_cpu == f_gpu.cpu()).float().mean()
    assert same > 0.999 and torch.allclose(d_cpu[f_cpu >= 0], d_gpu.cpu()[f_cpu >= 0], atol=1e-4)
