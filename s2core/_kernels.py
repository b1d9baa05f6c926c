"""The one place s2core imports the sibling `kernels/` package from; every other module does
`from ._kernels import ssa_window` (or `from .._kernels import raster`).

Inside ComfyUI the repository is one package (`<pack>.s2core`, `<pack>.kernels`) and the relative import
finds `<pack>.kernels`, never a pip package that happens to be called `kernels`. In the CLI and the tests
`s2core` and `kernels` are top-level packages: there `..kernels` reaches above the top-level package, which
raises ImportError, and the plain import is the right one.
"""

try:
    from ..kernels import (
        adaptive_filter,
        conv3d,
        group_norm,
        layer_norm,
        raster,
        sparse_conv,
        ssa_compressed,
        ssa_selection,
        ssa_window,
        tuning,
        voxelize,
    )
except ImportError:
    from kernels import (
        adaptive_filter,
        conv3d,
        group_norm,
        layer_norm,
        raster,
        sparse_conv,
        ssa_compressed,
        ssa_selection,
        ssa_window,
        tuning,
        voxelize,
    )

__all__ = [
    "adaptive_filter",
    "conv3d",
    "group_norm",
    "layer_norm",
    "raster",
    "sparse_conv",
    "ssa_compressed",
    "ssa_selection",
    "ssa_window",
    "tuning",
    "voxelize",
]
