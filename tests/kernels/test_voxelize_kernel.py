"""Voxelization level 2 (kernels/voxelize.py) against its PyTorch reference, and mesh_to_latent_index's two paths.

Equality, not a tolerance, on CPU: both backends evaluate the same sequence of IEEE float32 operations (no
FMA, correctly rounded division and square root: div_rn/sqrt_rn in the kernel, numpy in the interpreter,
`_sqrt_rn` in the reference because torch's CPU sqrt is not correctly rounded on every CPU; one lattice
coordinate table), so every distance is bitwise the same on any CPU and the latent index must have exactly the
same rows. On CUDA distances were measured to differ from the CPU reference in
the last bits (H100, 2026-11-25), so the gpu tests allow a relative 1e-5 on distances and compare whole
latent indices at 1024, where no point sits that close to the threshold. `test_min_distance_is_bitwise` checks the distances themselves: with the
limit set to the reference's smallest distance of a pair, the kernel must not mark the cell; one float32
ulp above, it must.

On CPU these run the kernel in Triton's interpreter (TRITON_INTERPRET=1); the `gpu` tests repeat the
comparison at 1024 on CUDA.
"""

import zlib

import numpy as np
import pytest
import torch
import trimesh

from kernels import voxelize as K
from s2core.mesh.voxelize import mesh_to_latent_index
from tests.kernels.ssa_cases import poisoned_outputs

# degenerate segments divide 0 by 0 on purpose (NaN, then never selected), in masked lanes too
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.usefixtures("one_thread"),
]


def _seed(name: str) -> int:
    return zlib.crc32(f"voxelize-kernel/{name}".encode())


def _soup(F: int, size: float, seed: int, spread: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """F independent triangles: random centres in [-spread, spread]³, vertices within `size` of them."""
    g = np.random.default_rng(seed)
    centre = g.uniform(-spread, spread, (F, 1, 3))
    v = (centre + g.uniform(-size, size, (F, 3, 3))).reshape(-1, 3)
    return v, np.arange(3 * F).reshape(F, 3)


def _degenerate(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Repeated vertices (each pair, all three), exactly collinear (dyadic coordinates), near-collinear, normal."""
    g = np.random.default_rng(seed)
    a, b = g.uniform(-0.8, 0.8, 3), g.uniform(-0.8, 0.8, 3)
    col0, col1 = np.array([0.0, 0.0, 0.0]), np.array([0.25, 0.125, -0.0625])
    tris = [
        [a, a, b],
        [a, b, a],
        [b, a, a],
        [a, a, a],  # v0=v1, v0=v2, v1=v2, all equal
        [col0, col1, 2 * col1],  # collinear, exact in float32: zero normal, distance to v0
        [col1, col0, 3 * col1],
        [a, b, b + 1e-7 * (b - a) + np.array([0, 1e-7, 0])],  # a sliver
        [a, b, g.uniform(-0.8, 0.8, 3)],  # an ordinary triangle
    ]
    v = np.stack([np.stack(t) for t in tris]).reshape(-1, 3)
    return v, np.arange(len(v)).reshape(-1, 3)


def _border(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Triangles on the grid's faces and corners (±1 halves to ±0.5, the outermost lattice points) and beyond."""
    g = np.random.default_rng(seed)
    tris = [
        [[-1, -1, -1], [-0.7, -1, -1], [-1, -0.6, -1]],  # in the corner lattice point's cell
        [[1, 1, 1], [1, 0.5, 1], [0.6, 1, 0.9]],
        [[1, -0.3, 0.2], [1, 0.4, -0.5], [1, 0.1, 0.9]],  # flat on the x = max face
        [[-1.4, 0.2, 0.1], [-0.8, 0.3, 0.0], [-1.2, -0.2, 0.4]],  # partly outside the grid
        [[1.3, 1.2, 1.25], [1.5, 1.1, 1.3], [1.2, 1.4, 1.1]],  # wholly outside, box clamped to the border
    ]
    v = np.asarray(tris, float).reshape(-1, 3) + g.uniform(-1e-3, 1e-3, (15, 3))
    return v, np.arange(15).reshape(5, 3)


def _large(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A few triangles spanning the whole grid (thousands of (triangle, cell) pairs each), plus a small one."""
    g = np.random.default_rng(seed)
    v = np.concatenate([g.uniform(-1, 1, (9, 3)), [[0.1, 0.1, 0.1], [0.12, 0.1, 0.1], [0.1, 0.13, 0.1]]])
    return v, np.arange(12).reshape(4, 3)


def _icosphere():
    m = trimesh.creation.icosphere(subdivisions=1)
    return m.vertices, m.faces


# (name, mesh, resolution D, factor, normalize, a window of pairs smaller than one triangle's pairs):
# ragged D (not multiples of factor), factors 4 and 8
CASES = [
    ("soup-small-tris", lambda s: _soup(23, 0.03, s), 37, 4, True, 97),
    ("soup-mixed-sizes", lambda s: _soup(11, 0.3, s), 29, 8, True, 13),
    ("soup-one-triangle", lambda s: _soup(1, 0.5, s), 24, 4, True, 61),
    ("soup-seed-2", lambda s: _soup(17, 0.1, s + 1, spread=0.6), 33, 4, True, 97),
    ("icosphere", lambda s: _icosphere(), 40, 4, True, 1999),
    ("degenerate", _degenerate, 26, 4, False, 97),
    ("border", _border, 21, 4, False, 29),
    ("large", _large, 27, 4, False, 97),
    ("large-factor8", _large, 35, 8, False, 31),
]


@pytest.mark.triton
@pytest.mark.parametrize("name,make,D,factor,normalize,window", CASES, ids=[c[0] for c in CASES])
def test_latent_index_equals_reference(name, make, D, factor, normalize, window, monkeypatch):
    v, f = make(_seed(name))
    want = mesh_to_latent_index(v, f, D, factor, normalize=normalize, device="cpu", backend="reference")
    assert want.shape[0] > 0, "a case that marks no cell tests nothing"
    with poisoned_outputs(monkeypatch):  # anything the kernel path leaves unwritten reads NaN / -7
        got = mesh_to_latent_index(v, f, D, factor, normalize=normalize, device="cpu", backend="triton")
    assert got.dtype == torch.int32 and torch.equal(got, want), (
        f"{name}: {got.shape[0]} cells vs the reference's {want.shape[0]}"
    )
    # windows of (triangle, cell) pairs smaller than one triangle's pairs give the same set
    small = mesh_to_latent_index(
        v, f, D, factor, normalize=normalize, device="cpu", backend="triton", max_candidates=window
    )
    assert torch.equal(small, want)


def _pairs(name: str, D: int, factor: int, n_tris: int, size: float):
    """Inputs of mark_cells for every (triangle, cell) pair of random triangles' grown boxes, as the caller builds."""
    v, f = _soup(n_tris, size, _seed(name), spread=0.45)
    v[:3] = v[0]  # the first triangle collapses to a point, the second has v0 == v1
    v[4] = v[3]
    tris = torch.from_numpy(v[f] * 0.5).float().contiguous()
    lo = (torch.floor((tris.min(1).values.double() + 0.5) * (D - 1)).long() - 5).clamp(0, D - 1).contiguous()
    hi = (torch.floor((tris.max(1).values.double() + 0.5) * (D - 1)).long() + 5).clamp(0, D - 1).contiguous()
    clo, chi = lo // factor, hi // factor
    ((tri, cell),) = list(K.box_windows(clo, chi - clo + 1, 1 << 30))
    L = (D - 1) // factor + 1
    return tris, K.lattice_coordinates(D), lo, hi, tri, cell, L


def _min_distance(tris, coord, lo, hi, t, cell, factor):
    """The reference's smallest distance from triangle t to the lattice points of its box inside `cell`."""
    a = torch.maximum(lo[t], cell * factor)
    b = torch.minimum(hi[t], cell * factor + factor - 1)
    axes = [torch.arange(int(a[k]), int(b[k]) + 1) for k in range(3)]
    ijk = torch.cartesian_prod(*axes).view(-1, 3)
    tri = tris[t].expand(ijk.shape[0], 3, 3)
    return K.point_triangle_distance(coord[ijk], tri[:, 0], tri[:, 1], tri[:, 2]).min()


@pytest.mark.triton
@pytest.mark.parametrize("pairs,block", [(1, 128), (4, 16)], ids=["cuda-tile", "small-tile"])
def test_min_distance_is_bitwise(pairs, block):
    D, factor = 32, 8
    tris, coord, lo, hi, tri, cell, L = _pairs(f"bitwise-{pairs}-{block}", D, factor, n_tris=6, size=0.06)
    pick = torch.randperm(tri.shape[0], generator=torch.Generator().manual_seed(_seed("pick")))[:10]
    pick = torch.cat([torch.tensor([0, tri.tolist().index(1)]), pick])  # the collapsed and v0 == v1 triangles
    for i in pick.tolist():
        t, c = tri[i : i + 1], cell[i : i + 1]
        dmin = _min_distance(tris, coord, lo, hi, int(t), cell[i], factor).numpy()
        above = float(np.nextafter(dmin, np.float32(np.inf)))
        for limit, marked in ((float(dmin), False), (above, True)):
            occ = torch.zeros(L, L, L, dtype=torch.bool)
            K.mark_cells(occ, tris, coord, lo, hi, t, c, factor, limit, backend="triton", pairs=pairs, block=block)
            assert bool(occ.view(-1)[(c[0, 0] * L + c[0, 1]) * L + c[0, 2]]) == marked, (
                f"pair {i}: limit {limit!r} (reference min distance {float(dmin)!r}) should "
                f"{'' if marked else 'not '}mark the cell"
            )
            assert int(occ.sum()) == int(marked), "a pair marked a cell other than its own"


@pytest.mark.triton
@pytest.mark.parametrize("pairs,block", [(1, 128), (8, 32), (1024, 16)])
def test_mark_cells_tiles_and_premarked_cells(pairs, block):
    """Every tile shape gives the reference's marks; cells marked beforehand stay marked (and may be skipped)."""
    D, factor = 30, 4
    tris, coord, lo, hi, tri, cell, L = _pairs(f"tiles-{pairs}-{block}", D, factor, n_tris=5, size=0.08)
    keep = torch.randperm(tri.shape[0], generator=torch.Generator().manual_seed(_seed("keep")))[:123]
    tri, cell = tri[keep].contiguous(), cell[keep].contiguous()  # a ragged count, pairs in random order
    pre = torch.rand(L, L, L, generator=torch.Generator().manual_seed(_seed("pre"))) < 0.2
    limit = 2.5 / D
    want = K.mark_cells(pre.clone(), tris, coord, lo, hi, tri, cell, factor, limit, backend="reference")
    got = K.mark_cells(
        pre.clone(), tris, coord, lo, hi, tri, cell, factor, limit, backend="triton", pairs=pairs, block=block
    )
    assert torch.equal(got, want)
    assert bool(got[pre].all()) and int(want.sum()) > int(pre.sum()), "the case marks nothing new"


def test_reference_sqrt_is_correctly_rounded():
    """`_sqrt_rn` equals the IEEE float32 root (numpy's, which is the hardware instruction) bit for bit,
    including exact squares, subnormals, zero, inf and NaN; torch's own CPU sqrt is not on every CPU."""
    g = torch.Generator().manual_seed(_seed("sqrt"))
    x = torch.cat(
        [
            torch.rand(1 << 18, generator=g) * 0.1,
            torch.rand(1 << 14, generator=g) * 1e-40,
            torch.tensor([0.0, 1e-45, 0.25, 4.0, 2.0, 3.4e38, float("inf"), float("nan")]),
        ]
    )
    got = K._sqrt_rn(x).numpy()
    want = np.sqrt(x.numpy())
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))


def test_backend_names():
    v, f = _soup(2, 0.2, 1)
    with pytest.raises(ValueError, match="backend"):
        mesh_to_latent_index(v, f, 16, 4, device="cpu", backend="cuda")


# ---------------------------------------------------------------- GPU (the device machine)


def _bumpy_sphere(subdivisions: int):
    m = trimesh.creation.icosphere(subdivisions=subdivisions)
    v = m.vertices
    r = 1 + 0.08 * np.sin(7 * v[:, 0]) * np.cos(5 * v[:, 1]) + 0.05 * np.sin(11 * v[:, 2])
    return v * r[:, None], m.faces


@pytest.mark.triton
@pytest.mark.gpu
@pytest.mark.parametrize("subdivisions", [6, 7])
def test_cuda_icosphere_1024(subdivisions):
    v, f = _bumpy_sphere(subdivisions)
    want = mesh_to_latent_index(v, f, 1024, device="cuda", backend="reference")
    got = mesh_to_latent_index(v, f, 1024, device="cuda", backend="triton")
    assert torch.equal(got, want), f"{got.shape[0]} cells vs the reference's {want.shape[0]}"


@pytest.mark.triton
@pytest.mark.gpu
def test_cuda_huge_triangles_1024():
    """Three triangles spanning ~60% of the grid (~400k (triangle, cell) pairs each) around a small sphere."""
    v, f = _large(_seed("gpu-large"))
    sv, sf = _bumpy_sphere(4)
    v, f = np.concatenate([v * 0.6, sv * 0.3]), np.concatenate([f, sf + len(v)])
    want = mesh_to_latent_index(v, f, 1024, normalize=False, device="cuda", backend="reference")
    got = mesh_to_latent_index(v, f, 1024, normalize=False, device="cuda", backend="triton")
    assert torch.equal(got, want), f"{got.shape[0]} cells vs the reference's {want.shape[0]}"


@pytest.mark.gpu
def test_cuda_distances_match_cpu():
    """The reference's distances on CUDA match the CPU's to a relative 1e-5 (bitwise was measured not to hold)."""
    g = torch.Generator().manual_seed(_seed("gpu-dist"))
    p, a, b, c = (torch.rand(1 << 20, 3, generator=g) - 0.5 for _ in range(4))
    b[:1000] = a[:1000]  # some degenerate triangles
    cpu = K.point_triangle_distance(p, a, b, c)
    gpu = K.point_triangle_distance(p.cuda(), a.cuda(), b.cuda(), c.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=1e-9)


@pytest.mark.triton
@pytest.mark.gpu
def test_cuda_min_distance_matches_reference():
    D, factor = 256, 8
    tris, coord, lo, hi, tri, cell, L = _pairs("gpu-bitwise", D, factor, n_tris=40, size=0.02)
    pick = torch.randperm(tri.shape[0], generator=torch.Generator().manual_seed(_seed("gpu-pick")))[:200]
    args = [x.cuda() for x in (tris, coord, lo, hi)]
    for i in pick.tolist():
        dmin = _min_distance(tris, coord, lo, hi, int(tri[i]), cell[i], factor).numpy()
        for limit, marked in ((float(dmin) * (1 - 1e-5), False), (float(dmin) * (1 + 1e-5), True)):
            occ = torch.zeros(L, L, L, dtype=torch.bool, device="cuda")
            K.mark_cells(occ, *args, tri[i : i + 1].cuda(), cell[i : i + 1].cuda(), factor, limit, backend="triton")
            assert int(occ.sum()) == int(marked), f"pair {i}: limit {limit!r}"
