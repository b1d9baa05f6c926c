"""Mesh operations on sparse data: marching cubes of a sparse SDF (this package's marching_cubes.py),
voxelization, postprocessing and export (see the sibling modules)."""

from .marching_cubes import marching_cubes_sparse, meshes_from_sparse_sdf, sparse_sdf_to_mesh

__all__ = ["sparse_sdf_to_mesh", "meshes_from_sparse_sdf", "marching_cubes_sparse"]
