"""Find the sibling `kernels/` package whether s2core is top-level or inside the node pack."""
import importlib

_PACK = (__package__ or "").rpartition(".")[0]  # "" when s2core is imported as a top-level package


def kernel_module(name: str):
    """Import `kernels.<name>`: `<pack>.kernels.<name>` inside ComfyUI, `kernels.<name>` otherwise."""
    return importlib.import_module(f"{_PACK}.kernels.{name}" if _PACK else f"kernels.{name}")
