"""Stand-in for comfy_api.latest._io: records what a schema declares (type, options) for the tests."""

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class _Input:
    def __init__(self, id, **options):
        self.id = id
        self.options = {k: v for k, v in options.items() if v is not None}
        self.optional = options.get("optional", False)
        self.tooltip = options.get("tooltip")


class _Output:
    def __init__(self, id=None, display_name=None, tooltip=None, **kwargs):
        self.id, self.display_name, self.tooltip = id, display_name, tooltip


def _type(io_type):
    inp = type("Input", (_Input,), {"io_type": io_type})
    out = type("Output", (_Output,), {"io_type": io_type})
    return type(io_type, (), {"io_type": io_type, "Input": inp, "Output": out})


Int, Float, Boolean, String, Combo = (_type(t) for t in ("INT", "FLOAT", "BOOLEAN", "STRING", "COMBO"))
Image, Mask, Mesh = _type("IMAGE"), _type("MASK"), _type("MESH")


def Custom(io_type):
    return _type(io_type)


class Hidden(str, Enum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"


@dataclass
class Schema:
    node_id: str
    display_name: str = None
    category: str = "sd"
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    hidden: list = field(default_factory=list)
    description: str = ""
    is_output_node: bool = False


class NodeOutput:
    def __init__(self, *args: Any, ui=None, **kwargs):
        self.args, self.ui = args, ui

    @property
    def result(self):
        return self.args if self.args else None


class ComfyNode:
    hidden = None

    @classmethod
    def GET_SCHEMA(cls):
        return cls.define_schema()
