"""The Colour From Image node with ComfyUI stubbed (tests/stubs): a core-style MESH and LoadImage's
1 - alpha MASK in, a MESH with `vertex_colors`, the camera text and a preview out; Save Mesh then writes
the colours as GLB COLOR_0, which trimesh reads back exactly (8-bit rounding of the node's colours)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from s2core.colour import Camera, render_preview
from s2core.colour.scene import bumpy_shape, shape_colours

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def test_colour_node_then_save(pack, tmp_path):
    import comfy.utils
    import trimesh

    v, f = bumpy_shape(20)
    cam = Camera(-40.0, 15.0, 0.0, (0.0, 0.0, 0.0), float(v.norm(dim=1).max()), 70.0, 80.0, 80.0, 160, 160)
    picture = render_preview(v, f, cam, shape_colours(v), shade=False)
    alpha = (picture < 0.999).any(-1).float()
    mesh = SimpleNamespace(vertices=v[None], faces=f[None])  # core MESH: no counts, no info
    node = pack.NODE_CLASS_MAPPINGS["D3DS2ColourFromImage"]
    comfy.utils.updates.clear()
    out = getattr(node(), node.FUNCTION)(
        mesh=mesh, image=picture[None], mask=1.0 - alpha[None], mask_is_background=True, mirror_symmetry=True
    )
    coloured, text, preview = out["result"] if isinstance(out, dict) else out
    assert coloured.vertex_colors.shape == (1, v.shape[0], 3) and "silhouette IoU" in text and "mesh 0" in text
    assert preview.shape == (1, 512, 512, 3) and preview.min() >= 0 and preview.max() <= 1
    assert comfy.utils.updates and comfy.utils.updates[-1][0] == comfy.utils.updates[-1][1]
    saved = pack.NODE_CLASS_MAPPINGS["D3DS2SaveMesh"]
    res = getattr(saved(), saved.FUNCTION)(mesh=coloured, filename_prefix="mesh/c", format="glb")
    path = tmp_path / "output" / res["result"][0]
    loaded = trimesh.load(path, process=False, force="mesh")
    expected = np.rint(coloured.vertex_colors[0].numpy() * 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(loaded.visual.vertex_colors)[:, :3], expected)


def test_loadimage_no_alpha_mask_counts_as_no_mask(pack):
    """Load Image's MASK for a picture without alpha (64x64 zeros) means "no mask", as for Encode Image: it
    was inverted into a 64x64 all-object mask and refused as the wrong size for the picture."""
    v, f = bumpy_shape(20)
    cam = Camera(-40.0, 15.0, 0.0, (0.0, 0.0, 0.0), float(v.norm(dim=1).max()), 70.0, 80.0, 80.0, 160, 160)
    picture = render_preview(v, f, cam, shape_colours(v), shade=False)
    picture = torch.nn.functional.pad(picture.permute(2, 0, 1), (16,) * 4, value=1.0).permute(1, 2, 0)[None]
    mesh = SimpleNamespace(vertices=v[None], faces=f[None])  # picture: on a white margin, keyed out without a mask
    node = pack.NODE_CLASS_MAPPINGS["D3DS2ColourFromImage"]

    def colour(**mask):
        out = getattr(node(), node.FUNCTION)(mesh=mesh, image=picture, mirror_symmetry=False, **mask)
        return (out["result"] if isinstance(out, dict) else out)[0].vertex_colors

    alone = colour()
    wired = colour(mask=torch.zeros(1, 64, 64), mask_is_background=True)
    assert torch.equal(wired, alone)


def _scene():
    v, f = bumpy_shape(20)
    cam = Camera(-40.0, 15.0, 0.0, (0.0, 0.0, 0.0), float(v.norm(dim=1).max()), 70.0, 80.0, 80.0, 160, 160)
    picture = render_preview(v, f, cam, shape_colours(v), shade=False)
    return v, f, picture[None], (picture < 0.999).any(-1).float()[None]


def test_colour_node_bakes_texture_on_core_uvs(pack):
    """A MESH with core Unwrap Mesh's layout (uvs [B, V, 2]) and texture_size > 0: the output keeps the UVs and
    gets a [B, S, S, 3] texture near the vertex colours' bake (the picture is sampled where seen)."""
    v, f, picture, alpha = _scene()
    uvs = torch.stack([torch.atan2(v[:, 0], v[:, 2]) / (2 * torch.pi) + 0.5, v[:, 1] / 2.5 + 0.5], 1).clamp(0, 1)
    mesh = SimpleNamespace(vertices=v[None], faces=f[None], uvs=uvs[None])
    node = pack.NODE_CLASS_MAPPINGS["D3DS2ColourFromImage"]
    out = getattr(node(), node.FUNCTION)(
        mesh=mesh, image=picture, mask=alpha, mask_is_background=False, texture_size=64
    )
    coloured, text = (out["result"] if isinstance(out, dict) else out)[:2]
    assert "texture 64x64 baked" in text
    assert coloured.texture.shape == (1, 64, 64, 3) and coloured.texture.device.type == "cpu"
    torch.testing.assert_close(coloured.uvs[0].cpu(), uvs)
    # seen texels come from the picture, the rest from the vertex colours: close to the vertex-only bake
    from s2core.colour import bake_texture
    from s2core.colour.space import linear_to_srgb

    # the MESH's vertex colours are linear (core's convention), the texture sRGB (glTF's baseColorTexture)
    plain, covered = bake_texture(f, uvs, linear_to_srgb(coloured.vertex_colors[0].cpu()), 64)
    tex = coloured.texture[0]
    assert tex.min() >= 0 and tex.max() <= 1 and (tex - plain)[covered].abs().mean() < 0.05


def test_colour_node_texture_without_uvs_is_one_sentence(pack):
    v, f, picture, alpha = _scene()
    node = pack.NODE_CLASS_MAPPINGS["D3DS2ColourFromImage"]
    with pytest.raises(ValueError, match="no UVs.*Unwrap Mesh UVs"):
        getattr(node(), node.FUNCTION)(
            mesh=SimpleNamespace(vertices=v[None], faces=f[None]), image=picture, mask=alpha, texture_size=64
        )


def test_save_mesh_writes_baked_texture(pack, tmp_path):
    """Colour From Image with texture_size, then Save Mesh (GLB): the file has the input's UVs and the texture."""
    import trimesh

    v, f, picture, alpha = _scene()
    uvs = torch.stack([torch.atan2(v[:, 0], v[:, 2]) / (2 * torch.pi) + 0.5, v[:, 1] / 2.5 + 0.5], 1).clamp(0, 1)
    node = pack.NODE_CLASS_MAPPINGS["D3DS2ColourFromImage"]
    out = getattr(node(), node.FUNCTION)(
        mesh=SimpleNamespace(vertices=v[None], faces=f[None], uvs=uvs[None]),
        image=picture,
        mask=alpha,
        mask_is_background=False,
        texture_size=32,
    )
    coloured = (out["result"] if isinstance(out, dict) else out)[0]
    saved = pack.NODE_CLASS_MAPPINGS["D3DS2SaveMesh"]
    res = getattr(saved(), saved.FUNCTION)(mesh=coloured, filename_prefix="mesh/t", format="glb")
    loaded = trimesh.load(tmp_path / "output" / res["result"][0], process=False, force="mesh")
    np.testing.assert_allclose(loaded.visual.uv[:, 0], uvs[:, 0].numpy(), atol=1e-6)
    np.testing.assert_allclose(loaded.visual.uv[:, 1], 1 - uvs[:, 1].numpy(), atol=1e-6)  # trimesh keeps v up
    image = np.asarray(loaded.visual.material.baseColorTexture.convert("RGB"))
    np.testing.assert_array_equal(image, np.rint(coloured.texture[0].numpy() * 255).astype(np.uint8))
