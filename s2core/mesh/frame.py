"""The one axis convention between our meshes and the outside world (files, ComfyUI MESH).

Inside s2core a mesh is in the original's frame: marching cubes of a grid indexed [x, y, z] gives
vertex = grid index / R * 2 - 1 with columns (x, y, z), the frame of the meshes the model was trained
on; `mesh_to_structure` voxelizes in that frame too. Outside (GLB/OBJ/PLY/STL files, ComfyUI's MESH
type) meshes are in glTF's frame: +Y up, right-handed, the object's front towards +Z, which is where
ComfyUI's Preview 3D and glTF viewers look from (core's TRELLIS.2 decoder rotates its Z-up frame into
exactly this before building a MESH).

For Direct3D-S2 the two frames coincide, so `ORIGINAL_TO_GLTF` is the identity:
* the original's demo writes its mesh untransformed to an OBJ and shows it in a Y-up viewer whose camera
  sits on +Z (gradio Model3D, camera alpha = beta = 90 degrees): upright and facing the viewer;
* glTF meshes from Y-up generators are refined by the original's 1024 stage without any rotation
  (`mesh2index` voxelizes the raw vertex columns), which only works if its frame is glTF's.

The matrix is still written down and applied at both boundaries (the exporter and the ComfyUI MESH
adapter, `nodes/_mesh.py`), so the convention is one named constant, and `from_gltf` inverts
`to_gltf` exactly (a signed axis permutation: no rounding), which keeps Mesh to Structure's round trip
exact whatever the constant is.
"""

from __future__ import annotations

import numpy as np
import torch

# rows: glTF axes in terms of the original's (x, y, z); a signed permutation with det +1, so face
# windings (outward normals) survive and the inverse is the transpose
ORIGINAL_TO_GLTF = np.eye(3)


def _perm(matrix: np.ndarray) -> tuple[list[int], list[float]]:
    """(source column, sign) of each output column of a signed permutation matrix."""
    m = np.asarray(matrix)
    if not (np.abs(m).sum(0) == 1).all() or not (np.abs(m).sum(1) == 1).all() or not np.isin(m, (-1, 0, 1)).all():
        raise ValueError("The frame matrix must be a signed axis permutation.")
    cols = [int(np.abs(row).argmax()) for row in m]
    return cols, [float(m[i, c]) for i, c in enumerate(cols)]


def _apply(matrix: np.ndarray, v):
    cols, signs = _perm(matrix)
    if isinstance(v, torch.Tensor):
        return v[..., cols] * v.new_tensor(signs)
    return np.asarray(v)[..., cols] * np.asarray(signs, dtype=np.asarray(v).dtype)


def to_gltf(v):
    """Original frame -> glTF frame, for positions or normals [..., 3] (torch or numpy), exact."""
    return _apply(ORIGINAL_TO_GLTF, v)


def from_gltf(v):
    """glTF frame -> original frame; `from_gltf(to_gltf(v)) == v` bit for bit."""
    return _apply(np.asarray(ORIGINAL_TO_GLTF).T, v)
