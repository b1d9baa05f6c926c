"""Direct3D-S2 as plain stage functions over small typed results (SPEC.md §3).

```
image ─► encode_image ─► Conditioning ─► sample_dense ─► DenseLatent ─► decode_dense ─► Structure (64³ index)
Structure ─► sample_sparse(512) ─► SparseLatent ─► decode_sparse (+refiner) ─► Mesh (512³)
Mesh ─► mesh_to_structure(1024) ─► Structure (128³) ─► sample_sparse(1024) ─► decode_sparse ─► Mesh (1024³)
Mesh ─► postprocess ─► save
```

`image_to_mesh` chains them with the official defaults (dense 50 steps, sparse-512 30 steps, sparse-1024
15 steps, guidance 7, thresholds 0.1 / 0.2). The ComfyUI nodes and the CLI call these same functions.
The results are in `s2core.results`, `Models` and its loading in `s2core.loading`, progress, cancellation
and out-of-memory handling in `s2core.hooks`.

Seeds: batch item `i` of a stage run with `seed` draws its noise from a `torch.Generator` seeded `seed + i`
(on the CPU, or on the GPU the stage runs on), so a batch equals single runs with seeds `seed, seed+1, ...`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from . import checks, refiner
from .config import (
    DENSE_STEPS,
    DENSE_THRESHOLD,
    GUIDANCE,
    MC_THRESHOLD,
    SIMPLIFY_RATIO,
    SPARSE_512_STEPS,
    SPARSE_1024_STEPS,
)
from .cuda_graph import GraphedModel
from .flow_sampler import make_noise, sample_flow, seeded_generator
from .hooks import Callback, ShouldStop, poll, stage_guard, step_hooks
from .image import preprocess_image
from .loading import Models, activation_bytes, sparse_stage
from .mesh.export import save_mesh
from .mesh.marching_cubes import meshes_from_sparse_sdf
from .mesh.postprocess import postprocess_mesh
from .mesh.voxelize import mesh_to_latent_index
from .results import Conditioning, DenseLatent, Mesh, SparseLatent, Structure, make_structure
from .sparse.tensor import SparseTensor
from .structure import decode_occupancy, encode_pixels, extract_tokens_and_coords

log = logging.getLogger(__name__)


def _noise(shapes: list[tuple[int, ...]], seed: int, device, dtype) -> torch.Tensor:
    """Item i's noise from a generator seeded `seed + i` on `device` (the original's draw for B = 1), stacked."""
    gen_device = device if torch.device(device).type == "cuda" else "cpu"
    # host loop over batch items: once per stage, so a batch equals single runs with seeds seed, seed+1, ...
    return torch.cat(
        [make_noise(s, seeded_generator((seed + i) % 2**64, gen_device), dtype, device) for i, s in enumerate(shapes)]
    )


def _check_sampling(steps: int, guidance: float) -> None:
    checks.count("steps", steps, 1)
    checks.number("guidance", guidance, 0, hint=" (7 matches the original)")


def check_chain_settings(
    resolution: int = 1024,
    dense_steps: int = DENSE_STEPS,
    sparse_512_steps: int = SPARSE_512_STEPS,
    sparse_1024_steps: int = SPARSE_1024_STEPS,
    guidance: float = GUIDANCE,
    mc_threshold: float = MC_THRESHOLD,
    max_tokens: int = 0,
    simplify_ratio: float = SIMPLIFY_RATIO,
) -> None:
    """ValueError (one sentence) for any bad setting of `image_to_mesh`, before any model loads or runs."""
    if resolution not in (512, 1024):
        raise ValueError(f"resolution must be 512 or 1024, got {resolution!r}.")
    for name, steps in (("dense_steps", dense_steps), ("sparse_512_steps", sparse_512_steps)) + (
        (("sparse_1024_steps", sparse_1024_steps),) if resolution == 1024 else ()
    ):
        checks.count(name, steps, 1)
    checks.number("guidance", guidance, 0, hint=" (7 matches the original)")
    checks.number("mc_threshold", mc_threshold, hint=" (0.2 matches the original)")
    checks.count("max_tokens", max_tokens, 0, hint=" (0: no limit)")
    checks.number("simplify_ratio", simplify_ratio, 0, 1, high_open=True)


# ---------------------------------------------------------------------------------------------
# Stages


def encode_image(
    models: Models, image: torch.Tensor, mask: torch.Tensor | None = None, should_stop: ShouldStop | None = None
) -> Conditioning:
    """IMAGE `[B, H, W, 3|4]` float in 0..1 (+ object MASK `[B, H, W]`, 1 = object) -> Conditioning.

    `s2core.image.preprocess_image` validates the inputs (one clear sentence for an empty mask, wrong
    shapes, NaNs...) before any network runs, then crops, centres and pads on white as the original.
    """
    enc = models.part("image_encoder")
    pixels = preprocess_image(image, mask, size=enc.cfg.size)  # [B, 4, S, S]: RGB on white + mask
    poll(should_stop)
    with (
        stage_guard("image encoding", "use fewer images per batch"),
        models.placement.use([enc], activation_bytes("image encoding", pixels.shape[0])),
    ):
        tokens, patch_mask = encode_pixels(enc, pixels)
    return Conditioning(tokens, patch_mask)


def sample_dense(
    models: Models,
    cond: Conditioning,
    seed: int = 0,
    steps: int = DENSE_STEPS,
    guidance: float = GUIDANCE,
    callback: Callback | None = None,
    should_stop: ShouldStop | None = None,
) -> DenseLatent:
    """Sample the coarse latent `[B, 8, 16, 16, 16]` (SPEC.md §3.3 dense mode)."""
    _check_sampling(steps, guidance)
    dit = models.part("dense_dit")
    cfg = models.config.dense_dit
    shape = (1, cfg.in_channels, *[cfg.resolution] * 3)
    with (
        stage_guard("dense sampling", "use fewer images per batch"),
        models.placement.use([dit], activation_bytes("dense sampling", cond.batch_size)) as dev,
        GraphedModel(dit) as graphed,  # fixed shapes: each of the 2·steps forwards replays one captured graph
    ):
        noise = _noise([shape] * cond.batch_size, seed, dev, models.dtype)
        c = cond.tokens.to(dev)
        cb, check = step_hooks(callback, should_stop)
        latents = sample_flow(
            graphed,
            noise,
            c,
            torch.zeros_like(c),
            num_steps=steps,
            guidance=guidance,
            shift=models.config.dense_scheduler.shift,
            callback=cb,
            check_cancel=check,
        )
    return DenseLatent(latents, seed)


def decode_dense(
    models: Models, latent: DenseLatent, threshold: float = DENSE_THRESHOLD, should_stop: ShouldStop | None = None
) -> Structure:
    """Dense VAE decode -> cells of the 64³ grid with occupancy >= threshold -> the 512 Structure."""
    checks.number("The occupancy threshold", threshold, 0, 1, low_open=True, high_open=True)
    vae = models.part("dense_vae")
    bs = models.config.sparse_dit_512.selection_block_size
    poll(should_stop)
    with (
        stage_guard("dense decoding", "use fewer images per batch"),
        models.placement.use([vae], activation_bytes("dense decoding", latent.batch_size)) as dev,
    ):
        coords = decode_occupancy(
            vae, latent.latents.to(dev), threshold=threshold, block_size=bs
        )  # [N, 4], block-sorted
    return make_structure(coords.cpu(), 512, models.config.sparse_dit_512.resolution, bs, sort=False)


def sample_sparse(
    models: Models,
    cond: Conditioning,
    structure: Structure,
    seed: int = 0,
    steps: int | None = None,
    guidance: float = GUIDANCE,
    max_tokens: int = 0,
    callback: Callback | None = None,
    should_stop: ShouldStop | None = None,
) -> SparseLatent:
    """Sample the `[N, 16]` latent on `structure` with the 512 or 1024 sparse DiT (SPEC.md §3.3).

    `steps=None` uses the original's count (30 at 512, 15 at 1024). `max_tokens > 0` refuses a structure
    with more tokens per item before anything runs (a memory budget).
    """
    stage = sparse_stage(structure.resolution)
    steps = stage.steps if steps is None else steps
    _check_sampling(steps, guidance)
    checks.count("max_tokens", max_tokens, 0, hint=" (0: no limit)")
    if max_tokens and structure.max_seqlen > max_tokens:
        raise ValueError(
            f"This shape has {structure.max_seqlen} sparse tokens at {stage.resolution}, more than the token "
            f"budget of {max_tokens}; raise the budget if the GPU has the memory, or stop at 512."
        )
    if cond.batch_size != structure.batch_size:
        raise ValueError(
            f"The conditioning holds {cond.batch_size} image(s) but the structure {structure.batch_size} "
            f"shape(s); use the same batch for both."
        )
    dit = models.part(stage.dit)
    cfg = dit.cfg
    sched = stage.scheduler(models.config)
    hint = "stop at 512, or lower the max token budget so large shapes are refused early"
    need = activation_bytes("sparse sampling", tokens=structure.num_tokens)
    with stage_guard(f"sparse {stage.resolution} sampling", hint), models.placement.use([dit], need) as dev:
        st = structure.to(dev)
        noise = _noise([(n, cfg.in_channels) for n in st.counts], seed, dev, models.dtype)
        c, u = cond.tokens.to(dev), None
        if cfg.sparse_conditions:  # v1.0: only the tokens of patches under the mask, as a SparseTensor (SPEC.md §9.2)
            tokens, tcoords = extract_tokens_and_coords(c, cond.patch_mask.to(dev))
            c = SparseTensor(tokens, tcoords, cond.batch_size)
            u = c.replace(torch.zeros_like(tokens))
        if hasattr(dit, "plan"):
            dit.plan(st.sparse(noise))  # SSA block plan once, before the loop; memoised in the structure's cache
        zeros = torch.zeros_like(c) if u is None else None

        def velocity(x, t, context):  # every step's SparseTensor shares the structure's cache
            # which condition is the zeros made here is known, so the DiT need not look (a host sync)
            zero = None if zeros is None else context is zeros
            out = dit(st.sparse(x), t.expand(st.batch_size), context, zero_cond=zero)  # the sparse DiT takes t [B]
            return out.feats if hasattr(out, "feats") else out

        cb, check = step_hooks(callback, should_stop)
        # fixed token set: with a dense condition, each of the 2·steps forwards can replay one captured graph
        with GraphedModel(velocity, "sparse" if u is None else None) as graphed:
            feats = sample_flow(
                graphed,
                noise,
                c,
                zeros if u is None else u,
                num_steps=steps,
                guidance=guidance,
                shift=sched.shift,
                callback=cb,
                check_cancel=check,
            )
    return SparseLatent(feats, st, seed)


def decode_sparse(
    models: Models,
    latent: SparseLatent,
    refine: bool = True,
    threshold: float = MC_THRESHOLD,
    callback: Callback | None = None,
    should_stop: ShouldStop | None = None,
) -> Mesh:
    """Sparse SDF VAE decode, then the refiner (interior removal) or plain sparse marching cubes.

    Iso-levels follow the original: the 512 refiner meshes at 2 x threshold, the 1024 one at threshold.
    """
    checks.number("threshold", threshold, hint=" (0.2 matches the original)")
    stage = sparse_stage(latent.resolution)
    res = stage.resolution
    vae = models.part(stage.vae)
    hint = "turn the refiner off or stop at 512"
    poll(should_stop)
    need = activation_bytes(stage.decoding, latent.structure.batch_size, latent.structure.num_tokens)
    with stage_guard(stage.decoding, hint), models.placement.use([vae], need) as dev:
        x = latent.structure.to(dev).sparse(latent.feats.to(dev, torch.float16 if vae.cfg.use_fp16 else torch.float32))
        out = vae.decode(x, return_feat=refine, check_cancel=lambda: poll(should_stop))
    sdf, feat = out if isinstance(out, tuple) else (out, None)
    del out, x  # the refiner below consumes (empties) sdf and feat: no other reference may keep them alive
    poll(should_stop)
    sdf_res = latent.structure.grid * 8  # 512 / 1024 official
    if refine:
        net = models.part(stage.refiner)
        grid = refiner.cube_grid(net.cfg, sdf_res)  # RefinerConfig.patch_size over this grid

        def progress(i, n):
            poll(should_stop)
            if callback is not None:
                callback(i, n)

        with stage_guard(f"{res} refinement", hint), models.placement.use([net], need) as dev:
            sdf, feat = sdf.to(dev), None if feat is None else feat.to(dev)
            field_ = refiner.remove_interior(
                net, sdf, feat, stage.refine_level * threshold, progress=progress, grid=grid, consume=True
            )
        # meshing after the refiner's weights have left the GPU, on a field it frees before welding: at 1024 the
        # welded faces set the stage's peak (under a 5 GiB cap they ran out of memory beside both)
        with stage_guard(f"{res} surface extraction", hint):
            items = refiner.mesh_refined_field(field_, check_cancel=lambda: poll(should_stop), consume=True)
    else:
        with stage_guard(f"{res} surface extraction", hint):
            items = meshes_from_sparse_sdf(sdf, sdf_res, threshold, check_cancel=lambda: poll(should_stop))
    items = list(items)
    level = stage.refine_level * threshold if refine else threshold
    fix = ("turn refine off, " if refine else "") + "try another seed or threshold"
    _check_surfaces(
        items, f"the {res} stage's {'refined ' if refine else ''}field has no surface at level {level:g}", fix
    )
    info = {"variant": models.variant, "seed": latent.seed, "resolution": res, "refined": bool(refine)}
    return Mesh.from_list(items, res, info)


def _check_surfaces(items: list[tuple[torch.Tensor, torch.Tensor]], why: str, fix: str) -> None:
    """Stop where an empty mesh appears, in one sentence (downstream it only surfaces as an obscure error,
    e.g. core SaveGLB's "zero-size array to reduction operation")."""
    empty = [b for b, (_, f) in enumerate(items) if f.shape[0] == 0]
    if empty:
        which = f"Mesh {empty[0]}" if len(items) > 1 else "The mesh"
        raise ValueError(f"{which} is empty because {why}; {fix}.")


def mesh_to_structure(models: Models, mesh: Mesh, should_stop: ShouldStop | None = None) -> Structure:
    """Normalise each mesh (longest side to [-0.95, 0.95]) and voxelize it into the 1024 stage's latent index
    (SPEC.md §10.1-2: cells within 8/1024 of the surface, on the 128³ grid)."""
    cfg = models.config.sparse_dit_1024
    parts = []
    for b, (v, f) in enumerate(mesh.items()):  # host loop over batch items: one voxelization call each
        if f.shape[0] == 0:
            raise ValueError(
                f"Mesh {b} has no faces, so there is nothing to refine at 1024; check the 512 "
                f"stage's output (another seed or threshold)."
            )
        idx = mesh_to_latent_index(
            v,
            f,
            resolution=cfg.resolution * 8,
            normalize=True,
            device=models.placement.device,
            check_cancel=lambda: poll(should_stop),
        )
        idx = idx.to(torch.int32).cpu()  # [N_b, 4] (0, x, y, z) on the latent grid
        idx[:, 0] = b
        parts.append(idx)
    return make_structure(torch.cat(parts), 1024, cfg.resolution, cfg.selection_block_size)


def postprocess(
    mesh: Mesh,
    simplify: bool = True,
    simplify_ratio: float = SIMPLIFY_RATIO,
    fill_holes: bool = False,
    remove_debris: bool = False,
    should_stop: ShouldStop | None = None,
) -> Mesh:
    """Debris removal, hole filling and simplification per item (`simplify_ratio` = fraction of faces
    removed; the original's `remesh=True` is simplify with 0.95 and nothing else, SPEC.md §10.4)."""
    if not 0.0 <= simplify_ratio < 1.0:
        raise ValueError(
            f"simplify_ratio is the fraction of faces to remove and must be in [0, 1), got {simplify_ratio}."
        )
    if mesh.vertex_colors is not None:
        log.warning("Post-processing drops the vertex colours (the vertices change); colour the mesh afterwards.")
    items = []
    _check_surfaces(mesh.items(), "the mesh given to post-processing has no faces", "connect a mesh with triangles")
    for v, f in mesh.items():  # host loop over batch items: mesh ops run per mesh
        poll(should_stop)
        v, f, _ = postprocess_mesh(
            v,
            f,
            remove_debris=remove_debris,
            close_holes=fill_holes,
            simplify_ratio=simplify_ratio if simplify else None,
            check_cancel=lambda: poll(should_stop),
        )
        items.append((v, f))
    _check_surfaces(items, "post-processing removed every face", "lower simplify_ratio or turn remove_debris off")
    return Mesh.from_list(items, mesh.resolution, mesh.info)


def save(
    mesh: Mesh,
    path: str | Path,
    metadata: dict | None = None,
    overwrite: bool = False,
    uvs: list[torch.Tensor] | None = None,
    texture: torch.Tensor | None = None,
) -> list[Path]:
    """Write each item atomically (complete temp file, then an exclusive link, or a rename over the old
    file with overwrite=True: the old file is never lost); the suffix picks the format (.glb .obj .ply .stl).

    B = 1 writes `path`; B > 1 writes `<stem>_0<suffix>`, `<stem>_1<suffix>`, ... GLB files carry
    `mesh.info` (variant, seed, resolution) and `metadata` in asset.extras, and with per-item `uvs` [V_i, 2]
    and `texture` [B, H, W, 3] a base-colour texture (`export.mesh_bytes`).
    """
    _check_surfaces(mesh.items(), "it has no faces, so there is nothing to save", "check the stage that made it")
    path = Path(path)
    extras = {**mesh.info, **(metadata or {})}
    out = []
    for i, (v, f) in enumerate(mesh.items()):
        p = path if mesh.batch_size == 1 else path.with_name(f"{path.stem}_{i}{path.suffix}")
        tex = {} if uvs is None or texture is None else {"uvs": uvs[i], "texture": texture[i]}
        out.append(Path(save_mesh(v, f, p, extras=extras, overwrite=overwrite, colors=mesh.item_colors(i), **tex)))
    return out


def image_to_mesh(
    models: Models,
    image: torch.Tensor,
    mask: torch.Tensor | None = None,
    seed: int = 0,
    resolution: int = 1024,
    dense_steps: int = DENSE_STEPS,
    sparse_512_steps: int = SPARSE_512_STEPS,
    sparse_1024_steps: int = SPARSE_1024_STEPS,
    guidance: float = GUIDANCE,
    mc_threshold: float = MC_THRESHOLD,
    remove_interior: bool = True,
    remesh: bool = False,
    simplify_ratio: float = SIMPLIFY_RATIO,
    max_tokens: int = 0,
    refine_512: bool = True,
    callback: Callback | None = None,
    should_stop: ShouldStop | None = None,
) -> Mesh:
    """The official chain (SPEC.md §3.2). `callback(step, total)` counts the sampling steps of all stages.

    `refine_512=False` skips the 512 refiner (the original always runs it): much faster on a CPU, but the
    512 mesh keeps its inner shell, which the 1024 structure then also covers.
    """
    check_chain_settings(
        resolution, dense_steps, sparse_512_steps, sparse_1024_steps, guidance, mc_threshold, max_tokens, simplify_ratio
    )
    total = dense_steps + sparse_512_steps + (sparse_1024_steps if resolution == 1024 else 0)

    def offset(k: int) -> Callback:
        return lambda i, n: callback(k + i, total) if callback is not None else None

    cond = encode_image(models, image, mask, should_stop)
    dense = sample_dense(models, cond, seed, dense_steps, guidance, offset(0), should_stop)
    structure = decode_dense(models, dense, DENSE_THRESHOLD, should_stop)
    latent = sample_sparse(
        models, cond, structure, seed, sparse_512_steps, guidance, 0, offset(dense_steps), should_stop
    )
    mesh = decode_sparse(models, latent, refine_512, mc_threshold, None, should_stop)
    if resolution == 1024:
        structure = mesh_to_structure(models, mesh, should_stop)
        latent = sample_sparse(
            models,
            cond,
            structure,
            seed,
            sparse_1024_steps,
            guidance,
            max_tokens,
            offset(dense_steps + sparse_512_steps),
            should_stop,
        )
        mesh = decode_sparse(models, latent, remove_interior, mc_threshold, None, should_stop)
    if remesh:
        mesh = postprocess(mesh, True, simplify_ratio, should_stop=should_stop)
    return mesh
