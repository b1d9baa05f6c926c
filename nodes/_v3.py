"""V3 (`comfy_api`) ComfyUI classes built from the node descriptions."""

from __future__ import annotations

from ._spec import CATEGORY, In, Node


def _v3_input(io, i: In):
    common = dict(optional=i.optional, tooltip=i.tooltip)
    if i.type == "INT":
        return io.Int.Input(
            i.name,
            default=i.default,
            min=i.min,
            max=i.max,
            step=i.step,
            control_after_generate=True if i.seed else None,
            **common,
        )
    if i.type == "FLOAT":
        return io.Float.Input(i.name, default=i.default, min=i.min, max=i.max, step=i.step, **common)
    if i.type == "BOOLEAN":
        return io.Boolean.Input(i.name, default=i.default, **common)
    if i.type == "STRING":
        return io.String.Input(i.name, default=i.default, **common)
    if i.type == "COMBO":
        return io.Combo.Input(i.name, options=list(i.options), default=i.default, **common)
    return _socket(io, i.type).Input(i.name, **common)


def _socket(io, type_name: str):
    return {"IMAGE": io.Image, "MASK": io.Mask, "MESH": io.Mesh}.get(type_name) or io.Custom(type_name)


def make_v3(node: type[Node]) -> type:
    """An `io.ComfyNode` subclass whose `execute` calls `node.run` (hidden prompt data for save nodes)."""
    from comfy_api.latest import io

    def define_schema(cls):
        return io.Schema(
            node_id=node.node_id,
            display_name=node.display_name,
            category=CATEGORY,
            description=node.description,
            inputs=[_v3_input(io, i) for i in node.inputs],
            outputs=[_socket(io, o.type).Output(display_name=o.name, tooltip=o.tooltip) for o in node.outputs],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo] if node.hidden_prompt else [],
            is_output_node=node.output_node,
        )

    def execute(cls, **kwargs):
        if node.hidden_prompt:
            hidden = getattr(cls, "hidden", None)
            kwargs.update(prompt=getattr(hidden, "prompt", None), extra_pnginfo=getattr(hidden, "extra_pnginfo", None))
        result, ui = node.run(**kwargs)
        return io.NodeOutput(*result, ui=ui)

    return type(
        node.node_id,
        (io.ComfyNode,),
        {"define_schema": classmethod(define_schema), "execute": classmethod(execute), "NODE": node},
    )


def make_extension(nodes: list[type[Node]]):
    from comfy_api.latest import ComfyExtension

    classes = [make_v3(n) for n in nodes]

    class Direct3DS2Extension(ComfyExtension):
        async def get_node_list(self):
            return classes

    return Direct3DS2Extension()
