"""Coarse-stage nodes: dense sampler and dense decode -> structure."""

from __future__ import annotations

from ..s2core import pipeline
from . import _comfy
from ._spec import COND, DENSE_LATENT, MODEL, SEED_MAX, STRUCTURE, In, Node, Out


class SampleDense(Node):
    node_id = "D3DS2SampleDense"
    display_name = "Direct3D-S2 Dense Sampler"
    description = "Samples the coarse 16³ shape latent from the image conditioning (flow matching, Euler)."
    inputs = (
        In("model", MODEL, "The model from Load Direct3D-S2 Model."),
        In("conditioning", COND, "From Direct3D-S2 Encode Image."),
        In(
            "seed",
            "INT",
            "Noise seed; batch item i uses seed + i. Same seed, same shape.",
            default=0,
            min=0,
            max=SEED_MAX,
            seed=True,
        ),
        In(
            "steps",
            "INT",
            "More steps: cleaner coarse shape, slower. 50 matches the original.",
            default=50,
            min=1,
            max=200,
        ),
        In(
            "guidance",
            "FLOAT",
            "How strongly the shape follows the image. 7 matches the original; 0 ignores the image.",
            default=7.0,
            min=0.0,
            max=30.0,
            step=0.1,
        ),
    )
    outputs = (Out(DENSE_LATENT, "dense_latent", "The coarse latent; decode it into a structure."),)

    @classmethod
    def run(cls, model, conditioning, seed=0, steps=50, guidance=7.0):
        latent = pipeline.sample_dense(
            model, conditioning, seed, steps, guidance, _comfy.progress(steps), _comfy.should_stop
        )
        return (latent.to(_comfy.intermediate_device()),), None


class DecodeDense(Node):
    node_id = "D3DS2DecodeDense"
    display_name = "Direct3D-S2 Dense Decode to Structure"
    description = "Decodes the coarse latent to a 64³ occupancy and keeps the occupied cells as the 512 structure."
    inputs = (
        In("model", MODEL, "The model from Load Direct3D-S2 Model."),
        In("dense_latent", DENSE_LATENT, "From Direct3D-S2 Dense Sampler."),
        In(
            "threshold",
            "FLOAT",
            "Occupancy probability above which a cell is kept. Lower: a fatter structure "
            "(more tokens, slower). 0.1 matches the original.",
            default=0.1,
            min=0.01,
            max=0.99,
            step=0.01,
        ),
    )
    outputs = (Out(STRUCTURE, "structure", "Sparse cells for the 512 sparse sampler."),)

    @classmethod
    def run(cls, model, dense_latent, threshold=0.1):
        structure = pipeline.decode_dense(model, dense_latent, threshold, _comfy.should_stop)
        return (structure.to(_comfy.intermediate_device()),), None
