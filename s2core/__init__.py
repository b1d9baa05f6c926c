"""Direct3D-S2 without ComfyUI: configs, checkpoint I/O, models, sampler, mesh ops, pipeline, CLI.

Where things are: `pipeline` (the stage functions and `image_to_mesh`), `results` (the typed results that
pass between stages), `loading` (which networks a stage needs, `load_models`, `Models`, weight placement),
`hooks` (progress, cancellation, out-of-memory), `config` (hyperparameters and the original's sampling
defaults), `structure` (the sparse index helpers), one file per network (`dinov2`, `dense_*`, `sparse_*`,
`refiner`), `mesh/`, `sparse/`, `colour/`, and `_kernels` (the one import of the `kernels/` package).

Never imports ComfyUI. Imports inside the package are relative so it works both as the top-level
package `s2core` (tests, `python -m s2core`) and as a subpackage of the ComfyUI node pack.
"""
