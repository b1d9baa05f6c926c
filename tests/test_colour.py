"""s2core.colour on synthetic scenes made with our own rasterizer: a coloured shape (s2core/colour/scene.py)
is rendered flat (albedo only) from a known camera, the camera is forgotten, and `colour_mesh` must find it
again from the mask and paint the mesh.

Tolerances and why: the camera within 5° (the issue's bound; the search's last step is 0.5°, the rest is
silhouette quantisation at 128 px); seen colours (confidence > 0.5 under the true camera) within 0.04 on
average and 0.12 at worst (bilinear sampling of a 512 px frame of a smooth field, plus the camera error);
hidden colours continuous: no edge jump larger than twice the true field's largest, and inside the range of
the seen colours (a harmonic fill cannot leave it).
"""

import math

import numpy as np
import pytest
import torch

from kernels.raster import rasterize
from s2core import hooks, pipeline, results
from s2core.colour import Camera, colour_mesh, fill_colours, mirror_seeds, project_colours, render_preview
from s2core.colour.paint import symmetry_plane
from s2core.colour.scene import bumpy_shape, shape_colours
from s2core.colour.space import linear_to_srgb, srgb_to_linear

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

SYMMETRIC_BUMPS = ((0.6, 0.3, 0.7, 0.4), (-0.6, 0.3, 0.7, 0.4), (0.0, -0.5, -0.6, 0.3))  # mirror x -> -x


def _picture(v, f, colours, camera):
    """(IMAGE [1, H, W, 3], MASK [1, H, W] with 1 = object) of the flat-coloured mesh."""
    img = render_preview(v, f, camera, colours, shade=False)
    _, face = rasterize(camera.project(v)[0], f, camera.height, camera.width)
    return img[None], (face >= 0).float()[None]


def _angle(a, b):
    return abs((a - b + 180) % 360 - 180)


@pytest.fixture(scope="module")
def shape():
    v, f = bumpy_shape(32)
    return v, f, shape_colours(v)


@pytest.mark.parametrize(
    "az,el,fov", [(35.0, 20.0, 30.0), (200.0, -10.0, 0.0)], ids=["persp-az35-el20", "ortho-az200-el-10"]
)
def test_recovers_camera_and_colours(shape, az, el, fov):
    v, f, truth = shape
    radius = float(v.norm(dim=1).max())
    camera = Camera(az, el, fov, (0.0, 0.0, 0.0), radius, 110.0, 150.0, 135.0, 290, 270)
    image, mask = _picture(v, f, truth, camera)
    steps = []
    out, (report,) = colour_mesh(
        results.Mesh.from_list([(v, f)]), image, mask, frame=512, callback=lambda i, n: steps.append((i, n))
    )
    found = report.camera
    assert _angle(found.azimuth, az) <= 5 and abs(found.elevation - el) <= 5, report.describe()
    assert report.iou > 0.97 and "IoU" in report.describe()
    assert steps and steps[-1][0] == steps[-1][1] and all(b[0] >= a[0] for a, b in zip(steps, steps[1:]))
    colours = out.vertex_colors
    assert colours.shape == v.shape and colours.dtype == torch.float32
    _, conf = project_colours(v, f, camera, image[0].permute(2, 0, 1), mask[0])
    err = (colours - truth).abs().amax(1)
    seen, hidden = conf > 0.5, conf == 0
    assert seen.sum() > 0.2 * len(v) and hidden.sum() > 0.2 * len(v)
    assert err[seen].mean() < 0.04 and err[seen].max() < 0.12, (float(err[seen].mean()), float(err[seen].max()))
    a, b = f[:, 0], f[:, 1]
    jump = (colours[a] - colours[b]).abs().amax(1)
    true_jump = (truth[a] - truth[b]).abs().amax(1)
    assert jump.max() <= 2 * true_jump.max()
    lo, hi = colours[conf > 0].amin(0), colours[conf > 0].amax(0)
    assert ((colours[hidden] >= lo - 1e-4) & (colours[hidden] <= hi + 1e-4)).all()


def test_mirror_plane_found_only_for_symmetric_shapes():
    v, _ = bumpy_shape(32, bumps=SYMMETRIC_BUMPS)
    _, normal, fit = symmetry_plane(v)
    assert fit > 0.99 and abs(float(normal[0])) > 0.99
    v2, _ = bumpy_shape(32)
    assert symmetry_plane(v2)[2] < 0.8


def test_mirroring_improves_the_hidden_side():
    v, f = bumpy_shape(32, bumps=SYMMETRIC_BUMPS)
    x, y, z = v.unbind(1)
    truth = torch.stack([0.5 + 0.4 * torch.cos(3 * x), 0.5 + 0.4 * torch.sin(2 * y), 0.5 + 0.3 * z], 1)  # even in x
    camera = Camera(70.0, 10.0, 0.0, (0.0, 0.0, 0.0), float(v.norm(dim=1).max()), 120.0, 128.0, 128.0, 256, 256)
    image, mask = _picture(v, f, truth, camera)
    rgb, conf = project_colours(v, f, camera, image[0].permute(2, 0, 1), mask[0])
    plain = fill_colours(v, f, rgb, conf)
    rgb2, conf2, fit = mirror_seeds(v, f, rgb, conf)
    assert fit > 0.99 and (conf2 > 0).sum() > (conf > 0).sum()
    mirrored = fill_colours(v, f, rgb2, conf2)
    hidden = conf == 0
    e_plain = (plain - truth).abs()[hidden].mean()
    e_mirror = (mirrored - truth).abs()[hidden].mean()
    assert e_mirror < 0.6 * e_plain, (float(e_mirror), float(e_plain))


def test_clear_errors_and_cancel(shape):
    v, f, truth = shape
    camera = Camera(0.0, 0.0, 0.0, (0.0, 0.0, 0.0), 1.0, 100.0, 64.0, 64.0, 128, 128)
    image, mask = _picture(v, f, truth, camera)
    mesh = results.Mesh.from_list([(v, f)])
    with pytest.raises(ValueError, match="The mask is empty"):
        colour_mesh(mesh, image, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="no faces"):
        colour_mesh(results.Mesh.from_list([(v, f[:0])]), image, mask)
    with pytest.raises(ValueError, match="no mask and no alpha"):  # a busy background and nothing to key on
        colour_mesh(mesh, torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="2 pictures for 1 meshes"):
        colour_mesh(mesh, image.expand(2, -1, -1, -1), mask.expand(2, -1, -1))
    with pytest.raises(hooks.Cancelled):
        colour_mesh(mesh, image, mask, should_stop=lambda: True)


def test_glb_and_ply_carry_the_colours(tmp_path):
    import trimesh

    v = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    f = torch.tensor([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    c = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.25, 0.75]])
    mesh = results.Mesh.from_list([(v, f)], colors=[c])

    def rgba8(x):
        return np.concatenate([np.rint(x.numpy() * 255), np.full((4, 1), 255)], 1).astype(np.uint8)

    # glTF's COLOR_0 is linear, PLY colours are the sRGB values themselves (colour/space.py)
    for suffix, expected in (("glb", rgba8(srgb_to_linear(c))), ("ply", rgba8(c))):
        (path,) = pipeline.save(mesh, tmp_path / f"m.{suffix}")
        loaded = trimesh.load(path, process=False, force="mesh")
        np.testing.assert_allclose(loaded.vertices, v.numpy(), atol=1e-6)
        np.testing.assert_array_equal(np.asarray(loaded.visual.vertex_colors), expected)
    assert rgba8(srgb_to_linear(c))[3, 0] == 55  # 0.5 sRGB is 0.214 linear: the conversion happened
    with pytest.raises(ValueError, match="one RGB row per vertex"):
        results.Mesh.from_list([(v, f)], colors=[c[:3]])
    assert results.Mesh.from_list([(v, f)]).to("cpu").vertex_colors is None


def test_camera_projection_conventions():
    cam = Camera(0.0, 0.0, 0.0, (0.0, 0.0, 0.0), 1.0, 10.0, 50.0, 50.0, 100, 100)
    screen, depth = cam.project(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1]]))
    # front view from +Z: +X goes right, +Y goes up (smaller row), +Z is nearer
    assert screen[0, :2].tolist() == [60.0, 50.0] and screen[1, :2].tolist() == [50.0, 40.0]
    assert depth[2] < depth[0]
    side = Camera(90.0, 0.0, 40.0, (0.0, 0.0, 0.0), 1.0, 10.0, 50.0, 50.0, 100, 100)
    s, d = side.project(torch.tensor([[1.0, 0, 0], [0, 0, -1.0]]))
    assert d[0] < d[1] and math.isclose(side.distance, 1 / math.sin(math.radians(20)), rel_tol=1e-6)
    assert float(s[1, 0]) > 50  # from +X, -Z is on the right


def test_clustered_stand_in_keeps_the_silhouette():
    from s2core.colour.camera import cluster_mesh, silhouette

    v, f = bumpy_shape(96)  # 37k faces; the search uses the stand-in above 200k
    pv, pf = cluster_mesh(v, f, 128)
    assert pf.shape[0] < f.shape[0]
    cam = Camera(120.0, 30.0, 30.0, (0.0, 0.0, 0.0), float(v.norm(dim=1).max()), 28.0, 32.0, 32.0, 64, 64)
    a, b = silhouette(v, f, cam), silhouette(pv, pf, cam)
    assert (a & b).sum() / (a | b).sum() > 0.97


def test_cli_colour_flag_writes_coloured_glb(tmp_path, monkeypatch):
    """`--colour` colours what the chain made (here a stand-in mesh, to keep the test about the flag) from the
    same picture, and the GLB carries the colours."""
    import trimesh
    from PIL import Image

    from s2core import cli

    v, f = bumpy_shape(16)
    cam = Camera(10.0, 10.0, 0.0, (0.0, 0.0, 0.0), float(v.norm(dim=1).max()), 60.0, 64.0, 64.0, 128, 128)
    truth = shape_colours(v)
    picture, alpha = _picture(v, f, truth, cam)
    rgba = torch.cat([picture[0], alpha[0][..., None]], -1)
    png = tmp_path / "object.png"
    Image.fromarray((rgba.numpy() * 255).round().astype(np.uint8), "RGBA").save(png)
    monkeypatch.setattr(cli.pipeline, "image_to_mesh", lambda *a, **k: results.Mesh.from_list([(v, f)]))
    out = tmp_path / "out.glb"
    assert cli.main([str(png), "--demo", "--colour", "-q", "-o", str(out)]) == 0
    linear = np.asarray(trimesh.load(out, process=False, force="mesh").visual.vertex_colors)[:, :3] / 255.0
    got = linear_to_srgb(torch.from_numpy(linear)).numpy()  # GLB colours are linear, the picture's sRGB
    _, conf = project_colours(v, f, cam, picture[0].permute(2, 0, 1), alpha[0])
    seen = (conf > 0.5).numpy()
    assert seen.sum() > 50 and np.abs(got[seen] - truth.numpy()[seen]).mean() < 0.06


def test_fill_crosses_uv_seams():
    """Core Unwrap Mesh duplicates the vertices along its seams. Split the shape along x = 0 into two
    unconnected halves whose seam vertices are copies, and see only the x < 0 half: the fill must join
    the copies (each pair gets one colour) and carry the seen colour across the seam."""
    from s2core.colour import _fill_welded

    v, f = bumpy_shape(12)
    right = v[f].mean(1)[:, 0] > 0  # faces of the x > 0 half get their own copies of their vertices
    used = torch.unique(f[right])
    copy_of = torch.full((v.shape[0],), -1, dtype=torch.long)
    copy_of[used] = v.shape[0] + torch.arange(used.numel())
    v2, f2 = torch.cat([v, v[used]]), torch.where(right[:, None], copy_of[f], f)
    seam = used[torch.isin(used, f[~right])]  # vertices both halves use: now two copies each
    assert seam.numel() > 10
    conf = (v2[:, 0] < -0.05).float() * (torch.arange(v2.shape[0]) < v.shape[0]).float()
    rgb = torch.tensor([0.9, 0.1, 0.1]).expand(v2.shape[0], 3).clone()
    out = _fill_welded(v2, f2, rgb, conf, None)
    assert torch.equal(out[seam], out[copy_of[seam]])
    far_right = torch.nonzero(v2[v.shape[0] :, 0] > 0.5).squeeze(1) + v.shape[0]
    assert torch.allclose(out[far_right], rgb[0].expand(far_right.numel(), 3), atol=0.05)
