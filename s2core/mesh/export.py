"""Write meshes as GLB, OBJ, PLY or STL: atomically, never over an existing file, with ComfyUI-style names.

Axis convention (`frame.py`): meshes are written in glTF's frame (+Y up, front towards +Z), converted
from the original's frame by `frame.to_gltf` (the identity for Direct3D-S2, see there); every format
gets the same frame (glTF requires Y-up; OBJ/PLY/STL readers mostly assume it). Units: glTF metres, so
the object spans ~2 m.

Files are written by `s2core.files.write_atomic`: a complete temp file in the destination folder takes
the final name by an exclusive hard link (never over an existing file, one winner among racing writers)
or, when overwriting is asked for, by `os.replace`; a crash never leaves half a file or loses the old one.
`check_filename_prefix` refuses a save node's prefix that would escape the output folder or make a file name
longer than file systems allow (ComfyUI's own helper then picks the `prefix_00001_.glb`-style name).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from ..colour.space import srgb_to_linear
from ..files import NAME_MAX, write_atomic
from .frame import to_gltf
from .voxelize import check_mesh

FORMATS = ("glb", "obj", "ply", "stl")
_DRIVE = re.compile(r"^[A-Za-z]:")
_COUNTER_ROOM = 16  # bytes kept free in a file name for `_<counter>_.<format>`


def _numpy_mesh(vertices, faces) -> tuple[np.ndarray, np.ndarray]:
    v = vertices.detach().cpu() if isinstance(vertices, torch.Tensor) else torch.as_tensor(np.asarray(vertices))
    f = faces.detach().cpu() if isinstance(faces, torch.Tensor) else torch.as_tensor(np.asarray(faces))
    check_mesh(v.double(), f.long())
    return v.double().numpy(), f.long().numpy()


def to_file_frame(vertices: np.ndarray) -> np.ndarray:
    """Original frame → file frame (glTF Y-up), see `frame.py`."""
    return to_gltf(vertices)


def _rgba8(colors, n: int) -> np.ndarray:
    """[V, 3|4] float in [0, 1] → [V, 4] uint8 (rounded, alpha 255 when absent); ValueError on a count mismatch."""
    c = colors.detach().cpu().float().numpy() if isinstance(colors, torch.Tensor) else np.asarray(colors, np.float32)
    if c.ndim != 2 or c.shape[0] != n or c.shape[1] not in (3, 4):
        raise ValueError(
            f"vertex colours have shape {c.shape} but the mesh has {n} vertices; pass one RGB row per vertex."
        )
    c = np.clip(np.rint(np.nan_to_num(c) * 255.0), 0, 255).astype(np.uint8)
    return c if c.shape[1] == 4 else np.concatenate([c, np.full((n, 1), 255, np.uint8)], 1)


def _textured(uvs, texture, n: int):
    """trimesh TextureVisuals for core MESH uvs [V, 2] (v = 0 the image's top row, glTF's convention; trimesh
    keeps v upwards and flips it back on export, so TEXCOORD_0 equals `uvs`) and texture [H, W, 3] in [0, 1]."""
    from PIL import Image
    from trimesh.visual import TextureVisuals
    from trimesh.visual.material import PBRMaterial

    uv = uvs.detach().cpu().double().numpy() if isinstance(uvs, torch.Tensor) else np.asarray(uvs, float)
    tex = texture.detach().cpu().float().numpy() if isinstance(texture, torch.Tensor) else np.asarray(texture)
    if uv.shape != (n, 2) or tex.ndim != 3 or tex.shape[2] != 3:
        raise ValueError(
            f"uvs {uv.shape} and texture {tex.shape} do not fit a mesh of {n} vertices; pass uvs [vertices, 2] "
            "and texture [height, width, 3]."
        )
    image = Image.fromarray(np.clip(np.rint(np.nan_to_num(tex) * 255.0), 0, 255).astype(np.uint8), "RGB")
    uv = np.stack([uv[:, 0], 1.0 - uv[:, 1]], 1)
    return TextureVisuals(uv=uv, material=PBRMaterial(baseColorTexture=image))


def mesh_bytes(
    vertices, faces, fmt: str, normals=None, extras: dict | None = None, colors=None, uvs=None, texture=None
) -> bytes:
    """Encode a mesh (original frame) as `fmt` ∈ glb/obj/ply/stl. extras (JSON-serialisable) go to GLB asset.extras.
    `colors` [V, 3|4] sRGB float in [0, 1]: GLB COLOR_0 (converted to linear, normalised unsigned bytes), PLY
    red/green/blue/alpha, OBJ
    `v x y z r g b`; STL has no colours. `uvs` [V, 2] and `texture` [H, W, 3] (both or neither; GLB only, the
    other formats ignore them): TEXCOORD_0 and the material's baseColorTexture (PNG); the colours are then
    left out, since glTF would multiply COLOR_0 into the texture."""
    import trimesh

    fmt = fmt.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"Unknown mesh format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    v, f = _numpy_mesh(vertices, faces)
    v = to_file_frame(v)
    kw = {}
    if normals is not None:
        n = normals.detach().cpu().double().numpy() if isinstance(normals, torch.Tensor) else np.asarray(normals, float)
        if n.shape != v.shape:
            raise ValueError(
                f"normals have shape {n.shape} but the mesh has {v.shape[0]} vertices; pass one normal per vertex."
            )
        kw["vertex_normals"] = to_file_frame(n)
    if colors is not None:
        if fmt == "glb":  # glTF's COLOR_0 is linear; ours are sRGB like the picture (colour/space.py)
            colors = srgb_to_linear(torch.as_tensor(colors, dtype=torch.float32))
        kw["vertex_colors"] = _rgba8(colors, v.shape[0])
    if fmt == "glb" and uvs is not None and texture is not None:
        kw.pop("vertex_colors", None)
        kw["visual"] = _textured(uvs, texture, v.shape[0])
    mesh = trimesh.Trimesh(v, f, process=False, **kw)
    if fmt == "glb":
        from trimesh.exchange.gltf import export_glb

        def add_extras(tree):
            if extras:
                tree.setdefault("asset", {})["extras"] = extras

        return export_glb(trimesh.Scene(mesh), include_normals=normals is not None, tree_postprocessor=add_extras)
    if fmt == "obj":
        return mesh.export(file_type="obj", include_normals=normals is not None).encode()
    if fmt == "ply":
        return mesh.export(file_type="ply", encoding="binary", vertex_normal=normals is not None)
    return mesh.export(file_type="stl")


def save_mesh(
    vertices,
    faces,
    path: str | os.PathLike,
    normals=None,
    extras: dict | None = None,
    overwrite: bool = False,
    colors=None,
    uvs=None,
    texture=None,
) -> Path:
    """Write one mesh to `path`; the format comes from its suffix (.glb/.obj/.ply/.stl); colors, uvs and texture
    as in mesh_bytes.
    An existing file is refused (FileExistsError) unless overwrite, which replaces it only with the complete new
    file."""
    fmt = Path(path).suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(
            f"Cannot tell the mesh format from {str(path)!r}; end the name with one of "
            f"{', '.join('.' + x for x in FORMATS)}."
        )
    return write_atomic(mesh_bytes(vertices, faces, fmt, normals, extras, colors, uvs, texture), path, overwrite)


def check_filename_prefix(filename_prefix: str) -> list[str]:
    """The prefix's folder/name parts, or ValueError if it could leave the output folder (absolute path,
    leading slash or backslash, drive letter, `..`), names no file, or has a part too long for a file name."""
    prefix = str(filename_prefix).strip()
    parts = re.split(r"[\\/]+", prefix)
    if (
        not prefix
        or prefix.startswith(("/", "\\"))
        or _DRIVE.match(prefix)
        or os.path.isabs(prefix)
        or any(p in ("..", ".") for p in parts)
        or not parts[-1]
    ):
        raise ValueError(
            f"filename_prefix {filename_prefix!r} must be a relative name inside the output folder "
            "(like 'mesh/D3DS2'), without '..', a leading slash or a drive letter."
        )
    for i, part in enumerate(parts):  # the last part gets `_00001_.glb` appended
        limit = NAME_MAX - (_COUNTER_ROOM if i == len(parts) - 1 else 0)
        if len(part.encode("utf-8")) > limit:
            raise ValueError(
                f"filename_prefix part {part[:30]!r}... is {len(part.encode('utf-8'))} bytes long; "
                f"file names can have at most {NAME_MAX} bytes, so shorten it to {limit} or fewer."
            )
    return parts
