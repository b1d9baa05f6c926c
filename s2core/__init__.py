"""Direct3D-S2 without ComfyUI: configs, checkpoint I/O, models, sampler, mesh ops, pipeline, CLI.

Never imports ComfyUI. Imports inside the package are relative so it works both as the top-level
package `s2core` (tests, `python -m s2core`) and as a subpackage of the ComfyUI node pack.
"""
