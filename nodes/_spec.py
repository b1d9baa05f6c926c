"""Framework-neutral node declarations: one description, turned into a V3 or a V1 ComfyUI class.

A node is a subclass of `Node` with a schema (class attributes) and a `run` classmethod that calls one
s2core function. `nodes/_v3.py` builds `io.ComfyNode` classes from it (ComfyUI with `comfy_api`),
`nodes/_v1.py` builds classic classes (older ComfyUI); both call the same `run`. Keeping the schema as
plain data also lets the tests snapshot it without ComfyUI (tests/test_node_schema.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

CATEGORY = "Direct3D-S2"

# Our socket types (pipeline objects); MESH, IMAGE, MASK, STRING are ComfyUI's own.
MODEL = "D3DS2_MODEL"
COND = "D3DS2_COND"
DENSE_LATENT = "D3DS2_DENSE_LATENT"
STRUCTURE = "D3DS2_STRUCTURE"
SPARSE_LATENT = "D3DS2_SPARSE_LATENT"
MESH = "MESH"
IMAGE = "IMAGE"
MASK = "MASK"
WIDGETS = ("INT", "FLOAT", "BOOLEAN", "STRING", "COMBO")
SEED_MAX = 0xFFFFFFFFFFFFFFFF


@dataclass(frozen=True)
class In:
    """One input: a socket (`type` a socket type) or a widget (`INT`, `FLOAT`, `BOOLEAN`, `STRING`, `COMBO`)."""

    name: str
    type: str
    tooltip: str
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    options: tuple = ()
    optional: bool = False
    seed: bool = False  # adds ComfyUI's "control after generate" widget


@dataclass(frozen=True)
class Out:
    type: str
    name: str
    tooltip: str


# the mesh output of every node that makes one (Decode Sparse, Image To Mesh)
MESH_OUT = Out(
    MESH,
    "mesh",
    "Triangle mesh in [-1, 1], glTF axes (Y up, front +Z); works with core mesh nodes, Save GLB and Preview 3D.",
)


class Node:
    """Base of every node description. Subclasses set the schema and implement `run`."""

    node_id: ClassVar[str]
    display_name: ClassVar[str]
    description: ClassVar[str]
    inputs: ClassVar[tuple[In, ...]]
    outputs: ClassVar[tuple[Out, ...]] = ()
    output_node: ClassVar[bool] = False
    hidden_prompt: ClassVar[bool] = False  # receives `prompt` and `extra_pnginfo` (save nodes only)

    @classmethod
    def run(cls, **inputs) -> tuple[tuple, dict | None]:
        """Return (outputs, ui dict or None)."""
        raise NotImplementedError
