"""Memory bounds of the 1024 decode → refiner → marching cubes path, and the weight-placement policy.

(a) A reduced 1024 stage (a small chunked sparse VAE, the sign refiner's cube glue, `mesh_refined_field`) runs
    under a TorchDispatchMode that records every tensor an op allocates (tests/allocations.py). Nothing may
    scale with the volume of the grid: the bound for any one tensor is the largest of (i) one streamed slab
    of the field in fp32, (ii) a few words per active voxel / output face, (iii) one refiner cube; all far
    below a dense fp32 grid R³.
(b) `loading.Placement`: which networks are on the compute device during each stage and what goes back to the
    CPU afterwards (recorded by wrapping `Module.to`, so no GPU is needed).
"""

from __future__ import annotations

import pytest
import torch
from allocations import Allocations

from s2core import loading
from s2core import pipeline as P
from s2core.config import RefinerConfig, SparseVAEConfig
from s2core.refiner import CubeGrid, VoxelRefinerSign, mesh_refined_field, remove_interior_1024
from s2core.sparse.tensor import SparseTensor
from s2core.sparse_vae import SparseSDFVAE
from s2core.testing import deterministic_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _shell_tokens(res: int, radius: float) -> torch.Tensor:
    """[N, 4] int32 latent cells of a one-cell-thick spherical shell on a res³ grid (a surface, like real data)."""
    g = torch.arange(res, dtype=torch.float32)
    xyz = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1)
    shell = ((xyz - res / 2 + 0.3).norm(dim=-1) - radius).abs() < 0.6
    idx = shell.nonzero().int()
    return torch.cat([torch.zeros_like(idx[:, :1]), idx], 1)


def test_1024_stage_allocates_nothing_grid_sized():
    # reduced 1024 stage: latent 32³ → SDF 256³ (official: 128³ → 1024³), VAE chunked 4×4×4 as the official one
    latent_res, R2, slab_rows = 32, 256, 16
    cfg = SparseVAEConfig(
        model_channels_decoder=32,
        num_heads_decoder=1,
        num_blocks_decoder=1,
        model_channels_encoder=32,
        num_heads_encoder=1,
        num_blocks_encoder=1,
        resolution=latent_res,
        use_fp16=False,
        chunk_size=4,
    )
    vae = SparseSDFVAE(cfg).eval()
    vae.load_state_dict(deterministic_state_dict(vae, 0))
    tokens = _shell_tokens(latent_res, 11.0)
    latent = SparseTensor(torch.randn(len(tokens), 16, generator=torch.Generator().manual_seed(0)), tokens, 1)
    # the refiner's UNet is dense per cube by design; its cost is not what is measured here, so the sign
    # network is replaced by the sign of its input (inside where the downsampled SDF is negative)
    refiner = VoxelRefinerSign(
        RefinerConfig(patch_size=64, sign=True, use_fp16=False, layers_per_block=1, layers_mid_block=0),
        block_out_channels=(4, 4),
    ).eval()
    refiner.forward = lambda sdf: torch.where(sdf < 0, -1.0, 1.0).to(sdf.dtype)
    grid = CubeGrid(R2 // 2, 64, 32)

    rec_vae, rec_ref, rec_mc = Allocations(), Allocations(), Allocations()
    with torch.no_grad():
        with rec_vae:
            sdf = vae.decode(latent)
        n_out = sdf.coords.shape[0]
        with rec_ref:
            field = remove_interior_1024(refiner, sdf, level=0.2, grid=grid, slab_rows=slab_rows)
        with rec_mc:
            ((verts, faces),) = mesh_refined_field(field, max_cells=1 << 16)
    n_field, n_faces = field.keys.numel(), faces.shape[0]
    assert n_faces > 1000 and n_field > 1000 and n_out > 100_000  # a real surface was decoded and meshed

    dense_fp32 = 4 * R2**3  # the original's CPU marching-cubes grid at this size (64 MiB)
    # (a) VAE: per fine voxel at most the [N, 27] int32 kernel map of the voxels being upsampled, plus
    #     the decoded [N, 4] int32 coordinates (16 B a voxel); both scale with active voxels
    b, op, shape, dtype = rec_vae.largest()
    assert b <= 108 * n_out, f"VAE decode allocated {b} B ({op} {shape} {dtype}) for {n_out} voxels"
    # (b) refiner glue: one slab (+1 carried row) in fp32, or one sort key + index per decoded voxel (8 B
    #     each), or one refiner cube input (B·P³ in the model dtype)
    slab = 4 * (slab_rows + 1) * R2 * R2
    b, op, shape, dtype = rec_ref.largest()
    assert b <= max(slab, 8 * n_out, 8 * grid.patch**3), f"refiner allocated {b} B ({op} {shape} {dtype})"
    # (c) meshing: the [cells, 8] int64 corner lookups of one chunk, or the output faces [F, 3] int64
    b, op, shape, dtype = rec_mc.largest()
    assert b <= max(64 * (1 << 16), 24 * n_faces, 8 * n_field), f"meshing allocated {b} B ({op} {shape} {dtype})"
    # none of the three is anywhere near a dense grid: refiner and meshing stay below 1/4 of a dense fp32
    # 256³ grid, and at the official 1024³ the ratio improves 4x (surfaces grow as R², grids as R³)
    assert max(rec_ref.largest()[0], rec_mc.largest()[0]) < dense_fp32 / 4
    assert all(s[0] < dense_fp32 for s in rec_vae.seen)


# ---------------------------------------------------------------------------------------------
# (b) placement policy


def test_placement_defaults():
    # the pipeline's own default (outside ComfyUI): one stage's weights on an accelerator at a time
    assert loading.Placement("cuda").offload is True and loading.Placement("cuda:1").offload is True
    assert loading.Placement("cuda", offload=False).offload is False  # the CLI's --keep-weights-on-gpu
    assert loading.Placement("cpu").offload is False and loading.Placement("cpu", offload=True).offload is False


@pytest.mark.parametrize("offload", [True, False])
def test_offloading_stage_returns_cached_memory(offload, monkeypatch):
    # after an offloading stage on a GPU the caching allocator's blocks go back (what other apps, and
    # ComfyUI's next model, can then use); a resident placement keeps them for the next stage
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    placement = loading.Placement("cuda", offload=offload)
    with placement.use([]):
        assert not calls
    assert len(calls) == (1 if offload else 0)
    with pytest.raises(RuntimeError, match="boom"), placement.use([]):
        raise RuntimeError("boom")
    assert len(calls) == (2 if offload else 0)


def test_activation_estimates_cover_the_measured_peaks():
    # bench/results/e2e.md (H100, fp16, default placement, 2026-12-07 afternoon): peak allocated minus the
    # stage's weights
    GiB = 2**30
    sampling_1024 = (3.51 - 0.96) * GiB  # 108,862 tokens, 1024 DiT weights ~0.96 GiB
    decode_1024 = (4.21 - 0.5) * GiB  # VAE + sign refiner weights ~0.5 GiB
    decode_512 = (4.09 - 0.5) * GiB  # 27,126 tokens
    for need, est in [
        (sampling_1024, loading.activation_bytes("sparse sampling", tokens=108862)),
        (decode_1024, loading.activation_bytes("sparse 1024 decoding", 1, 108862)),
        (decode_512, loading.activation_bytes("sparse 512 decoding", 1, 27126)),
    ]:
        assert need <= est <= 2 * need, (need / GiB, est / GiB)
    # linear in tokens and samples: twice the work asks twice the room
    assert loading.activation_bytes("sparse sampling", tokens=2000) == 2 * loading.activation_bytes(
        "sparse sampling", tokens=1000
    )
    assert loading.activation_bytes("dense sampling", 4) == 4 * loading.activation_bytes("dense sampling", 1)


class _RecordingPlacement(loading.Placement):
    """Placement on the CPU that behaves as an offloading GPU placement and logs every move."""

    def __init__(self, offload: bool):
        super().__init__("cpu")
        self.offload = offload
        self.log: list[tuple[str, str]] = []
        self.on_device: set[str] = set()
        self.max_on_device: list[set[str]] = []


def _record_moves(models: loading.Models, placement: _RecordingPlacement, monkeypatch) -> None:
    for name, module in models.loaded_parts().items():
        real_to = module.to

        def to(target, *args, _name=name, _real=real_to, **kwargs):
            # Placement.use moves to its torch.device and back with the string "cpu"
            where = "cpu" if isinstance(target, str) else "device"
            placement.log.append((_name, where))
            (placement.on_device.discard if where == "cpu" else placement.on_device.add)(_name)
            placement.max_on_device.append(set(placement.on_device))
            return _real(target, *args, **kwargs)

        monkeypatch.setattr(module, "to", to)


@pytest.fixture(scope="module")
def dense_models():
    return loading.load_models("tiny-random", ("dense",))


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "resident"])
def test_one_stage_on_the_device_at_a_time(dense_models, monkeypatch, offload):
    from test_pipeline import picture

    placement = _RecordingPlacement(offload)
    monkeypatch.setattr(dense_models, "placement", placement)
    _record_moves(dense_models, placement, monkeypatch)
    img, mask = picture()
    cond = P.encode_image(dense_models, img, mask)
    latent = P.sample_dense(dense_models, cond, seed=0, steps=1)
    P.decode_dense(dense_models, latent)
    stages = [("image_encoder", "device"), ("dense_dit", "device"), ("dense_vae", "device")]
    if offload:  # each network goes to the device for its stage and back to the CPU right after
        assert placement.log == [
            stages[0],
            ("image_encoder", "cpu"),
            stages[1],
            ("dense_dit", "cpu"),
            stages[2],
            ("dense_vae", "cpu"),
        ]
        assert max(len(s) for s in placement.max_on_device) == 1 and not placement.on_device
    else:  # resident: moved once per stage, never back
        assert placement.log == stages
        assert placement.on_device == {"image_encoder", "dense_dit", "dense_vae"}


def test_offload_moves_back_after_a_failed_stage(dense_models, monkeypatch):
    placement = _RecordingPlacement(True)
    monkeypatch.setattr(dense_models, "placement", placement)
    _record_moves(dense_models, placement, monkeypatch)
    with pytest.raises(RuntimeError, match="boom"):
        with placement.use([dense_models.dense_dit]):
            raise RuntimeError("boom")
    assert placement.log == [("dense_dit", "device"), ("dense_dit", "cpu")] and not placement.on_device


def test_cli_keeps_weights_only_when_asked(tmp_path, monkeypatch):
    from PIL import Image

    from s2core import cli

    Image.new("RGBA", (32, 32), (200, 50, 50, 255)).save(tmp_path / "in.png")
    seen = []

    def fake_load_models(*args, placement=None, **kwargs):
        seen.append(placement)
        raise ValueError("stop here")

    monkeypatch.setattr(loading, "load_models", fake_load_models)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the CLI checks --device before loading
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    base = [str(tmp_path / "in.png"), "-o", str(tmp_path / "out.glb"), "--demo", "-q", "--device", "cuda"]
    assert cli.main(base) == 1 and cli.main(base + ["--keep-weights-on-gpu"]) == 1
    assert [p.offload for p in seen] == [True, False] and all(p.device.type == "cuda" for p in seen)


def test_max_vram_budget_evicts_least_recently_used(monkeypatch):
    """Placement(max_vram_gb): networks stay on the device while their weights fit; before a stage runs,
    the least recently used networks of other stages go back to the CPU until it fits."""
    moves: list[tuple[str, str]] = []
    nets = {n: torch.nn.Linear(256, 256, bias=False) for n in ("a", "b", "c")}  # 256 KiB of fp32 each
    for name, m in nets.items():
        monkeypatch.setattr(m, "to", lambda target, _n=name, _m=m: (moves.append((_n, str(target))), _m)[1])
    kib = 2**10 / 2**30
    pl = loading.Placement("cuda", max_vram_gb=600 * kib)  # room for two of them
    assert pl.budget == 600 * 2**10 and not pl.offload
    with pl.use([nets["a"]]):
        pass
    with pl.use([nets["b"]]):
        pass
    assert moves == [("a", "cuda"), ("b", "cuda")]  # both fit: nothing went back
    moves.clear()
    with pl.use([nets["a"]]):  # a becomes the most recently used
        pass
    with pl.use([nets["c"]]):  # needs room: b (least recently used) goes back, a stays
        pass
    assert moves == [("a", "cuda"), ("b", "cpu"), ("c", "cuda")]
    moves.clear()
    with pl.use([nets["a"], nets["b"], nets["c"]]):  # larger than the budget alone: still runs
        pass
    assert ("a", "cpu") not in moves and ("c", "cpu") not in moves and moves.count(("b", "cuda")) == 1
    with pytest.raises(ValueError, match=r"max_vram_gb must be a finite number above 0 \(GiB\)"):
        loading.Placement("cuda", max_vram_gb=0)
    assert loading.Placement("cpu", max_vram_gb=1).budget is None  # no budget on the CPU
