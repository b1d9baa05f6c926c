"""ComfyUI's MESH type: our packed `results.Mesh` <-> core's batched mesh object.

Output: `comfy_api.latest.Types.MESH` where it exists (ComfyUI 0.38+), else `LocalMesh`, a class with the
same attributes, so core helpers that read `mesh.uvs`, `mesh.vertex_colors`, `mesh.normals`,
`mesh.vertex_counts`, ... directly find every field (set or None). Vertices [B, N, 3] float32 and faces
[B, M, 3] int64, zero-padded to the largest item, with `vertex_counts`/`face_counts` (B,) giving each
item's real size; `info` (seed, resolution, variant) rides along as an extra attribute for provenance.

Input: any MESH-like object: ours, core's (with or without UVs, colours, counts), a list of per-item
tensors (what older core post-processing nodes leave behind) or a single unbatched [N, 3] mesh. Normals and
textures are not read; UVs only by Colour From Image (`item_uvs`, to bake a texture onto them).

Coordinates: MESH vertices are in glTF's frame (Y up, front +Z); s2core works in the original's frame,
and `s2core.mesh.frame` converts (exactly) on the way out and back in.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch

from ..s2core import results
from ..s2core.colour.space import linear_to_srgb, srgb_to_linear
from ..s2core.mesh import frame

# Types.MESH's optional fields (ComfyUI 0.38) and their defaults; we set each of them on every mesh
FIELDS: dict[str, object] = {
    "uvs": None,
    "vertex_colors": None,
    "texture": None,
    "metallic_roughness": None,
    "vertex_counts": None,
    "face_counts": None,
    "unlit": False,
    "normals": None,
    "tangents": None,
    "normal_map": None,
    "occlusion_in_mr": False,
    "material": None,
    "emissive": None,
}


class LocalMesh:
    """A look-alike of `Types.MESH` for ComfyUI without it (0.3.x): the same constructor and attributes."""

    def __init__(
        self,
        vertices,
        faces,
        uvs=None,
        vertex_colors=None,
        texture=None,
        metallic_roughness=None,
        vertex_counts=None,
        face_counts=None,
        unlit=False,
        normals=None,
        tangents=None,
        normal_map=None,
        occlusion_in_mr=False,
        material=None,
        emissive=None,
    ):
        if (vertex_counts is None) != (face_counts is None):
            raise ValueError("vertex_counts and face_counts go together: pass both or neither.")
        self.vertices, self.faces = vertices, faces
        self.uvs, self.vertex_colors, self.texture = uvs, vertex_colors, texture
        self.metallic_roughness, self.vertex_counts, self.face_counts = metallic_roughness, vertex_counts, face_counts
        self.unlit, self.normals, self.tangents, self.normal_map = unlit, normals, tangents, normal_map
        self.occlusion_in_mr, self.material, self.emissive = occlusion_in_mr, material, emissive

    def _comfy_cache_tensors(self):  # what ComfyUI's cache inspects on its own MESH
        return tuple(getattr(self, k) for k in ("vertices", "faces", *FIELDS) if k not in ("unlit", "occlusion_in_mr"))


def core_mesh_class():
    """`comfy_api.latest.Types.MESH`, or None where this ComfyUI has no such class (or no comfy_api)."""
    try:
        from comfy_api.latest import Types
    except ImportError:
        return None
    return getattr(Types, "MESH", None)


def make_mesh(vertices: torch.Tensor, faces: torch.Tensor, **fields):
    """A core MESH (or LocalMesh) with every field of FIELDS set: given ones, the rest at their defaults.

    Only the keyword arguments the installed class accepts are passed to it (older core versions take
    fewer); the others are set as attributes, so readers of any version find them.
    """
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise TypeError(f"Unknown MESH fields {sorted(unknown)}.")
    cls = core_mesh_class() or LocalMesh
    try:
        accepted = set(inspect.signature(cls).parameters)
    except (TypeError, ValueError):
        accepted = set()
    mesh = cls(vertices, faces, **{k: v for k, v in fields.items() if k in accepted})
    for name, default in FIELDS.items():
        if name in fields or not hasattr(mesh, name):
            setattr(mesh, name, fields.get(name, default))
    return mesh


def _pad(items: list[torch.Tensor], width: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.zeros(len(items), max((x.shape[0] for x in items), default=0), width, dtype=dtype)
    for b, x in enumerate(items):  # host loop over batch items: padding for ComfyUI's batched layout
        out[b, : x.shape[0]] = x
    return out


def _colors_of(mesh) -> torch.Tensor | None:
    """Packed per-vertex colours [V, C] of a results.Mesh, if the record has them."""
    c = getattr(mesh, "vertex_colors", None)
    return c if isinstance(c, torch.Tensor) else None


def to_comfy_mesh(mesh: results.Mesh, uvs: list[torch.Tensor] | None = None, texture: torch.Tensor | None = None):
    """Our packed Mesh (original frame, any device) -> a MESH in glTF's frame on `mesh`'s device; optional
    per-item uvs [V_i, 2] (padded like the vertices) and texture [B, H, W, 3] (kept where it is)."""
    items = mesh.items()
    verts = _pad([frame.to_gltf(v.float()) for v, _ in items], 3, torch.float32).to(mesh.vertices.device)
    faces = _pad([f for _, f in items], 3, torch.int64).to(mesh.vertices.device)
    fields = {
        "vertex_counts": torch.tensor(mesh.vertex_counts, dtype=torch.int64),
        "face_counts": torch.tensor(mesh.face_counts, dtype=torch.int64),
    }
    colors = _colors_of(mesh)
    if colors is not None:
        parts = torch.split(srgb_to_linear(colors.float()), list(mesh.vertex_counts))  # core's are linear
        fields["vertex_colors"] = _pad(list(parts), colors.shape[1], torch.float32).to(mesh.vertices.device)
    if uvs is not None:
        fields["uvs"] = _pad([u.float().cpu() for u in uvs], 2, torch.float32).to(mesh.vertices.device)
    if texture is not None:
        fields["texture"] = texture
    out = make_mesh(verts, faces, **fields)
    out.info = dict(mesh.info)
    return out


def _batched(x, name: str) -> list[torch.Tensor]:
    """A MESH attribute as a list of per-item tensors ([B, N, C] tensor, [N, C] tensor, or a list)."""
    if isinstance(x, (list, tuple)):
        return [torch.as_tensor(t) for t in x]
    x = torch.as_tensor(x)
    if x.ndim == 2:
        return [x]
    if x.ndim != 3:
        raise ValueError(
            f"The mesh's {name} have shape {tuple(x.shape)}; connect a MESH whose {name} are [batch, count, 3]."
        )
    return list(x.unbind(0))


def from_comfy_mesh(mesh) -> results.Mesh:
    """Any ComfyUI MESH (glTF frame) -> our packed Mesh in the original frame, on the CPU, padding removed."""
    if not hasattr(mesh, "vertices") or not hasattr(mesh, "faces"):
        raise ValueError(f"The mesh input is a {type(mesh).__name__}, not a MESH; connect a node that outputs MESH.")
    verts, faces = _batched(mesh.vertices, "vertices"), _batched(mesh.faces, "faces")
    if len(verts) != len(faces) or any(v.shape[-1] != 3 for v in verts) or any(f.shape[-1] != 3 for f in faces):
        raise ValueError(
            "The mesh's vertices and faces do not match (need [batch, N, 3] and [batch, M, 3] with the "
            "same batch); connect a triangle MESH."
        )
    vc, fc = getattr(mesh, "vertex_counts", None), getattr(mesh, "face_counts", None)
    vc = [int(x) for x in vc] if vc is not None else [v.shape[0] for v in verts]
    fc = [int(x) for x in fc] if fc is not None else [f.shape[0] for f in faces]
    items = [
        (frame.from_gltf(verts[i][: vc[i]].detach().float().cpu()), faces[i][: fc[i]].detach().long().cpu())
        for i in range(len(verts))
    ]
    out = results.Mesh.from_list(items, info=dict(getattr(mesh, "info", None) or {}))
    colors = getattr(mesh, "vertex_colors", None)
    if colors is not None and any(f.name == "vertex_colors" for f in dataclasses.fields(results.Mesh)):
        parts = [c[: vc[i]].detach().float().cpu() for i, c in enumerate(_batched(colors, "vertex_colors"))]
        out = dataclasses.replace(out, vertex_colors=linear_to_srgb(torch.cat(parts)))  # ours are sRGB
    return out


def item_uvs(mesh) -> list[torch.Tensor] | None:
    """Per-item UVs [V_i, 2] float32 on the CPU of any MESH (padding removed, vertex order kept), or None."""
    uvs = getattr(mesh, "uvs", None)
    if uvs is None:
        return None
    verts = _batched(mesh.vertices, "vertices")
    parts = [torch.as_tensor(u) for u in uvs] if isinstance(uvs, (list, tuple)) else torch.as_tensor(uvs)
    if isinstance(parts, torch.Tensor):
        parts = [parts] if parts.ndim == 2 else list(parts.unbind(0))
    vc = getattr(mesh, "vertex_counts", None)
    vc = [int(x) for x in vc] if vc is not None else [v.shape[0] for v in verts]
    if len(parts) != len(verts) or any(
        p.ndim != 2 or p.shape[-1] != 2 or p.shape[0] < vc[i] for i, p in enumerate(parts)
    ):
        raise ValueError(
            "The mesh's uvs do not match its vertices (need [batch, vertices, 2]); connect the mesh straight "
            "from core Unwrap Mesh UVs."
        )
    return [p[: vc[i]].detach().float().cpu() for i, p in enumerate(parts)]
