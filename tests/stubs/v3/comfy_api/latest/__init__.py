"""Stand-in for comfy_api.latest: just enough of io/ui/ComfyExtension to build and run V3 nodes."""

from . import _io as io  # noqa: F401
from . import _ui as ui  # noqa: F401


class ComfyExtension:
    async def on_load(self):
        pass

    async def get_node_list(self):
        return []


from ._geometry import Types  # noqa: E402,F401  (Types.MESH of ComfyUI 0.38)
