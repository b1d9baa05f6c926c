"""Fine-stage nodes: sparse sampler and sparse decode -> MESH."""

from __future__ import annotations

from ..s2core import loading, pipeline
from . import _comfy
from ._spec import COND, MESH_OUT, MODEL, SEED_MAX, SPARSE_LATENT, STRUCTURE, In, Node, Out


class SampleSparse(Node):
    node_id = "D3DS2SampleSparse"
    display_name = "Direct3D-S2 Sparse Sampler"
    description = (
        "Samples the sparse SDF latent on a structure with the Spatial-Sparse-Attention DiT: the 512 "
        "model for a structure from Dense Decode, the 1024 model for one from Mesh to 1024 Structure."
    )
    inputs = (
        In("model", MODEL, "The model from Load Direct3D-S2 Model."),
        In("conditioning", COND, "From Direct3D-S2 Encode Image (the same image as the structure)."),
        In("structure", STRUCTURE, "512 structure (Dense Decode) or 1024 structure (Mesh to 1024 Structure)."),
        In("seed", "INT", "Noise seed; batch item i uses seed + i.", default=0, min=0, max=SEED_MAX, seed=True),
        In(
            "steps",
            "INT",
            "More steps: finer detail, slower. 0 uses the original's count: 30 at 512, 15 at 1024.",
            default=0,
            min=0,
            max=200,
        ),
        In(
            "guidance",
            "FLOAT",
            "How strongly the detail follows the image. 7 matches the original.",
            default=7.0,
            min=0.0,
            max=30.0,
            step=0.1,
        ),
        In(
            "max_tokens",
            "INT",
            "Refuse structures with more sparse tokens than this (a memory budget; a 1024 "
            "shape has about 100k tokens, measured at 4.2 GiB peak GPU memory for 109k). 0: no limit.",
            default=0,
            min=0,
            max=10_000_000,
        ),
    )
    outputs = (Out(SPARSE_LATENT, "sparse_latent", "The sparse latent; decode it into a mesh."),)

    @classmethod
    def run(cls, model, conditioning, structure, seed=0, steps=0, guidance=7.0, max_tokens=0):
        steps = steps or loading.sparse_stage(structure.resolution).steps  # 0: the original's count
        latent = pipeline.sample_sparse(
            model,
            conditioning,
            structure,
            seed,
            steps,
            guidance,
            max_tokens,
            _comfy.progress(steps),
            _comfy.should_stop,
        )
        return (latent.to(_comfy.intermediate_device()),), None


class DecodeSparse(Node):
    node_id = "D3DS2DecodeSparse"
    display_name = "Direct3D-S2 Sparse Decode to Mesh"
    description = (
        "Decodes the sparse latent to a signed distance field and extracts the surface; the refiner "
        "removes the inner shell the raw field has (the original always refines at 512)."
    )
    inputs = (
        In("model", MODEL, "The model from Load Direct3D-S2 Model."),
        In("sparse_latent", SPARSE_LATENT, "From Direct3D-S2 Sparse Sampler."),
        In(
            "refine",
            "BOOLEAN",
            "Run the interior-removal refiner. Off: faster, but the mesh has a second, inner surface.",
            default=True,
        ),
        In(
            "threshold",
            "FLOAT",
            "Surface iso-level of the SDF. Higher: thicker thin parts. 0.2 matches the "
            "original (the 512 refiner uses twice this).",
            default=0.2,
            min=0.0,
            max=0.9,
            step=0.01,
        ),
    )
    outputs = (MESH_OUT,)

    @classmethod
    def run(cls, model, sparse_latent, refine=True, threshold=0.2):
        mesh = pipeline.decode_sparse(model, sparse_latent, refine, threshold, _comfy.progress(1), _comfy.should_stop)
        return (_comfy.to_comfy_mesh(mesh),), None
