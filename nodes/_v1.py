"""Classic (V1) ComfyUI classes built from the node descriptions, for ComfyUI without `comfy_api`."""

from __future__ import annotations

from ._spec import CATEGORY, In, Node


def _v1_input(i: In) -> tuple:
    opts = {"tooltip": i.tooltip}
    if i.default is not None:
        opts["default"] = i.default
    for k in ("min", "max", "step"):
        if getattr(i, k) is not None:
            opts[k] = getattr(i, k)
    if i.seed:
        opts["control_after_generate"] = True
    if i.type == "COMBO":
        return (list(i.options), opts)
    return (i.type, opts)


def make_v1(node: type[Node]) -> type:
    """A V1 class: INPUT_TYPES / RETURN_TYPES / FUNCTION, calling `node.run`."""

    def input_types(cls):
        req = {i.name: _v1_input(i) for i in node.inputs if not i.optional}
        opt = {i.name: _v1_input(i) for i in node.inputs if i.optional}
        out = {"required": req}
        if opt:
            out["optional"] = opt
        if node.hidden_prompt:
            out["hidden"] = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
        return out

    def execute(self, **kwargs):
        result, ui = node.run(**kwargs)
        return {"ui": ui, "result": result} if ui is not None else result

    return type(
        node.node_id,
        (),
        {
            "INPUT_TYPES": classmethod(input_types),
            "RETURN_TYPES": tuple(o.type for o in node.outputs),
            "RETURN_NAMES": tuple(o.name for o in node.outputs),
            "OUTPUT_TOOLTIPS": tuple(o.tooltip for o in node.outputs),
            "FUNCTION": "execute",
            "CATEGORY": CATEGORY,
            "DESCRIPTION": node.description,
            "OUTPUT_NODE": node.output_node,
            "execute": execute,
            "NODE": node,
        },
    )
