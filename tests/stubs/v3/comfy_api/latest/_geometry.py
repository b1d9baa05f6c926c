"""Stand-in for `comfy_api.latest.Types.MESH` as of ComfyUI 0.38 (`comfy_api/latest/_util/geometry_types.py`):
the same constructor signature and attributes, written for these tests. Core's mesh helpers read every
optional attribute directly (`mesh.uvs`, `mesh.vertex_colors`, `mesh.normals`, `mesh.vertex_counts`, ...),
so a MESH must carry all of them, set or None."""


class MESH:
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
        assert (vertex_counts is None) == (face_counts is None), "counts come together"
        self.vertices, self.faces, self.uvs, self.vertex_colors = vertices, faces, uvs, vertex_colors
        self.normals, self.texture, self.metallic_roughness = normals, texture, metallic_roughness
        self.vertex_counts, self.face_counts, self.unlit = vertex_counts, face_counts, unlit
        self.tangents, self.normal_map, self.occlusion_in_mr = tangents, normal_map, occlusion_in_mr
        self.material, self.emissive = material, emissive


class Types:
    MESH = MESH
