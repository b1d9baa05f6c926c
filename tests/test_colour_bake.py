"""s2core.colour.bake on a hand-made atlas: two charts (a quad of two triangles, and one lone triangle) with
known vertex colours. Covered texels must equal the barycentric interpolation at their centres, solved here
independently as a 3×3 linear system per texel (tolerance 1e-5: float32 rounding of the two routes); texels
next to a chart take chart colours (dilation), far ones the mean chart colour."""

import pytest
import torch

from s2core.colour.bake import bake_texture

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

S = 32
# quad chart over u in [0.1, 0.5], v in [0.1, 0.9]; triangle chart at the right
UVS = torch.tensor(
    [[0.1, 0.1], [0.5, 0.1], [0.5, 0.9], [0.1, 0.9], [0.6, 0.2], [0.95, 0.2], [0.6, 0.7]], dtype=torch.float32
)
FACES = torch.tensor([[0, 1, 2], [0, 2, 3], [4, 5, 6]])
COLOURS = torch.tensor(
    [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0.2, 0.4, 0.6], [0.9, 0.1, 0.5], [0.3, 0.8, 0.1]],
    dtype=torch.float32,
)


def _expected(face, i, j):
    """Barycentric interpolation at texel (column i, row j)'s centre, by solving [a b c; 1 1 1] w = [q; 1]."""
    t = FACES[face]
    m = torch.cat([UVS[t].double().T, torch.ones(1, 3, dtype=torch.float64)])
    q = torch.tensor([(i + 0.5) / S, (j + 0.5) / S, 1.0], dtype=torch.float64)
    w = torch.linalg.solve(m, q)
    return (w[:, None] * COLOURS[t].double()).sum(0).float()


def _inside(face, i, j):
    t = FACES[face]
    m = torch.cat([UVS[t].double().T, torch.ones(1, 3, dtype=torch.float64)])
    w = torch.linalg.solve(m, torch.tensor([(i + 0.5) / S, (j + 0.5) / S, 1.0], dtype=torch.float64))
    return bool((w >= -1e-9).all())


def test_texel_centres_match_barycentric_interpolation():
    tex, covered = bake_texture(FACES, UVS, COLOURS, S)
    assert tex.shape == (S, S, 3) and tex.dtype == torch.float32 and covered.shape == (S, S)
    checked = 0
    for j in range(S):
        for i in range(S):
            owners = [k for k in range(3) if _inside(k, i, j)]
            assert bool(covered[j, i]) == bool(owners), (i, j)
            if owners:
                torch.testing.assert_close(tex[j, i], _expected(owners[0], i, j), atol=1e-5, rtol=0)
                checked += 1
    # the quad covers 0.4 x 0.8 of the texture, the triangle 0.35 x 0.5 / 2: about 0.32 + 0.0875 of 1024 texels
    assert 380 < checked < 460


def test_rows_follow_v_downwards():
    """v = 0 is the top row (glTF, core Unwrap Mesh): a chart at small v lands in the first rows."""
    uvs = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.25]])
    tex, covered = bake_texture(torch.tensor([[0, 1, 2]]), uvs, torch.eye(3), 16, dilate=0)
    assert covered[:4].any() and not covered[4:].any()
    assert tex[0, 0].argmax() == 0 and tex[0, 12].argmax() == 1


def test_charts_dilated_past_borders():
    tex, covered = bake_texture(FACES, UVS, COLOURS, S, dilate=2)
    # the column just left of the quad (u < 0.1) is empty but takes the quad's edge colour
    j = 16
    assert not covered[j, 2] and torch.allclose(tex[j, 2], tex[j, 3], atol=0.05)
    # far from every chart (beyond 2 texels): the mean chart colour
    mean = tex[covered].mean(0)
    assert torch.allclose(tex[S - 1, S - 1], mean, atol=0.05)
    # same bake without dilation: the border texel also takes the mean, so dilation changed it
    flat, _ = bake_texture(FACES, UVS, COLOURS, S, dilate=0)
    assert not torch.allclose(flat[j, 2], tex[j, 2], atol=0.05)
    assert torch.equal(flat[covered], tex[covered])


def test_per_corner_uvs_equal_per_vertex_uvs():
    tex, _ = bake_texture(FACES, UVS, COLOURS, S)
    corner, _ = bake_texture(FACES, UVS[FACES], COLOURS, S)
    torch.testing.assert_close(corner, tex)


def test_picture_replaces_colour_where_seen():
    """texture = c + confidence (rgb - c): the hook sees the quad's left half (x < 0.3) fully, the rest not."""
    vertices = torch.cat([UVS, torch.zeros(7, 1)], 1)  # surface = the UV layout itself, normals along z

    def picture(points, normals):
        assert torch.allclose(normals.abs(), torch.tensor([0.0, 0.0, 1.0]).expand_as(normals))
        return torch.tensor([0.5, 0.25, 1.0]).expand(points.shape[0], 3), (points[:, 0] < 0.3).float()

    plain, covered = bake_texture(FACES, UVS, COLOURS, S, dilate=0)
    tex, _ = bake_texture(FACES, UVS, COLOURS, S, dilate=0, vertices=vertices, picture=picture)
    u = (torch.arange(S) + 0.5) / S
    left = covered & (u < 0.3)[None, :]
    assert left.sum() > 50 and torch.allclose(tex[left], torch.tensor([0.5, 0.25, 1.0]).expand_as(tex[left]))
    torch.testing.assert_close(tex[covered & ~left], plain[covered & ~left])


def test_progress_and_cancel():
    seen = []
    bake_texture(FACES, UVS, COLOURS, S, callback=lambda d, t: seen.append((d, t)))
    assert seen and seen[-1][0] == seen[-1][1]
    from s2core import hooks

    with pytest.raises(hooks.Cancelled):
        bake_texture(FACES, UVS, COLOURS, S, should_stop=lambda: True)


@pytest.mark.parametrize(
    "faces, uvs, size, words",
    [
        (torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 2), 16, "no faces"),
        (FACES, UVS[:5], 16, "Unwrap Mesh"),
        (FACES, UVS, 0, "texture_size"),
        (FACES, torch.full_like(UVS, float("nan")), 16, "NaN"),
    ],
    ids=["empty", "uv-count", "size0", "nan"],
)
def test_errors_are_one_sentence(faces, uvs, size, words):
    with pytest.raises(ValueError) as e:
        bake_texture(faces, uvs, COLOURS, size)
    msg = str(e.value)
    assert words in msg and msg.count(". ") == 0 and msg.endswith(".")
