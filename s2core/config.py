"""Typed hyperparameters of every Direct3D-S2 component.

Defaults are the official v1.1 release (its config.json, kept as `tests/data/upstream/config.json`; docs/ORIGINAL.md); the same classes
describe the tiny smoke-test configs (`tiny_release()`). Field names follow the original's
constructor arguments so a config entry maps one to one (`tests/test_manifests.py` reads both official
config files into these classes and compares); `use_checkpoint` (gradient checkpointing) is dropped because
it has no effect at inference.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

# How the original samples and meshes (SPEC.md §3.1, §3.2, SPARSE.md §8): the defaults of s2core.pipeline.
DENSE_STEPS, SPARSE_512_STEPS, SPARSE_1024_STEPS = 50, 30, 15
GUIDANCE = 7.0
DENSE_THRESHOLD = 0.1  # occupancy probability of the dense decode
MC_THRESHOLD = 0.2  # sparse SDF iso-level; the 512 refiner meshes at 2x this (SPEC.md §11)
SIMPLIFY_RATIO = 0.95  # fraction of faces removed by `postprocess(simplify=True)`


@dataclass(frozen=True)
class DenseVAEConfig:
    embed_dim: int = 8
    in_channels: int = 1
    out_channels: int = 1
    model_channels_encoder: tuple[int, ...] = (32, 128, 512)
    num_res_blocks_encoder: int = 2
    num_res_blocks_middle_encoder: int = 2
    model_channels_decoder: tuple[int, ...] = (512, 128, 64)
    num_res_blocks_decoder: int = 4
    num_res_blocks_middle_decoder: int = 4
    use_fp16: bool = True
    latents_scale: float = 1.0
    latents_shift: float = 0.0


@dataclass(frozen=True)
class DenseDiTConfig:
    resolution: int = 16
    in_channels: int = 8
    out_channels: int = 8
    model_channels: int = 1024
    cond_channels: int = 1024
    num_blocks: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: int = 1
    pe_mode: str = "ape"
    qk_rms_norm: bool = True
    qk_rms_norm_cross: bool = False  # constructor default, not in config.json
    share_mod: bool = False  # constructor default, not in config.json
    use_fp16: bool = True
    latent_shape: tuple[int, ...] = (8, 16, 16, 16)


@dataclass(frozen=True)
class ImageEncoderConfig:
    """DINOv2 ViT-L/14 with 4 registers (`dinov2_vitl14_reg`), run at 518x518."""

    model: str = "facebookresearch/dinov2"
    version: str = "dinov2_vitl14_reg"
    size: int = 518
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    patch_size: int = 14
    num_register_tokens: int = 4
    mlp_ratio: float = 4.0
    layerscale_init: float = 1e-5
    pretrain_img_size: int = 518  # pos_embed holds 37x37 patches + cls


@dataclass(frozen=True)
class SchedulerConfig:
    """Flow-matching Euler (diffusers FlowMatchEulerDiscreteScheduler semantics)."""

    num_train_timesteps: int = 1000
    shift: float = 6.0


@dataclass(frozen=True)
class SparseVAEConfig:
    embed_dim: int = 16
    num_head_channels_encoder: int = 64
    model_channels_encoder: int = 512
    num_heads_encoder: int = 8
    num_blocks_encoder: int = 4
    num_head_channels_decoder: int = 64
    model_channels_decoder: int = 512
    num_heads_decoder: int = 8
    num_blocks_decoder: int = 4
    resolution: int = 64  # latent grid; output grid is resolution * 8
    out_channels: int = 1
    use_fp16: bool = True
    latents_scale: float = 1.0
    latents_shift: float = 0.0
    chunk_size: int = 1  # 1024 VAE decodes in chunk_size^3 spatial chunks


@dataclass(frozen=True)
class SparseDiTConfig:
    resolution: int = 64
    in_channels: int = 16
    out_channels: int = 16
    model_channels: int = 1024
    cond_channels: int = 1024
    num_blocks: int = 24
    num_heads: int = 32
    num_kv_heads: int = 2
    mlp_ratio: float = 4.0  # constructor default
    window_size: int = 8  # constructor default
    compression_block_size: int = 8
    selection_block_size: int = 8
    topk: int = 8
    compression_version: str = "v1"
    pe_mode: str = "ape"
    factor: float = 1.0
    sparse_conditions: bool = False
    qk_rms_norm: bool = True
    qk_rms_norm_cross: bool = False  # constructor default
    share_mod: bool = False  # constructor default
    use_shift: bool = True
    use_fp16: bool = True


@dataclass(frozen=True)
class RefinerConfig:
    in_channels: int = 1
    out_channels: int = 1
    layers_per_block: int = 2
    layers_mid_block: int = 2
    patch_size: int = 192  # cube edge; the UNet runs on 3 overlapping cubes per axis (refiner.cube_grid)
    use_fp16: bool = True
    sign: bool = False  # True for `refiner_1024` (Voxel_RefinerXL_sign)


@dataclass(frozen=True)
class ReleaseConfig:
    """Every component of one released model (v1.1 by default)."""

    name: str = "v1.1"
    dense_vae: DenseVAEConfig = field(default_factory=DenseVAEConfig)
    dense_dit: DenseDiTConfig = field(default_factory=DenseDiTConfig)
    dense_image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    dense_scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    sparse_vae_512: SparseVAEConfig = field(default_factory=SparseVAEConfig)
    sparse_dit_512: SparseDiTConfig = field(default_factory=SparseDiTConfig)
    sparse_scheduler_512: SchedulerConfig = field(default_factory=SchedulerConfig)
    sparse_vae_1024: SparseVAEConfig = field(default_factory=lambda: SparseVAEConfig(resolution=128, chunk_size=4))
    sparse_dit_1024: SparseDiTConfig = field(default_factory=lambda: SparseDiTConfig(resolution=128, factor=0.5))
    sparse_scheduler_1024: SchedulerConfig = field(default_factory=lambda: SchedulerConfig(shift=8.0))
    sparse_image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    refiner: RefinerConfig = field(default_factory=RefinerConfig)
    refiner_1024: RefinerConfig = field(default_factory=lambda: RefinerConfig(patch_size=256, sign=True))


def official_v1_1() -> ReleaseConfig:
    return ReleaseConfig()


def official_v1_0() -> ReleaseConfig:
    """v1.0 differs from v1.1 only in the sparse DiTs (SPEC.md §2)."""
    base = ReleaseConfig(name="v1.0")
    return replace(
        base,
        sparse_dit_512=replace(
            base.sparse_dit_512, compression_block_size=4, topk=32, compression_version="v2", sparse_conditions=True
        ),
        sparse_dit_1024=replace(
            base.sparse_dit_1024, compression_block_size=4, topk=8, compression_version="v2", sparse_conditions=True
        ),
    )


def tiny_release() -> ReleaseConfig:
    """A smoke-test release: same code paths (SSA, refiner, chunked decode), tiny widths and depths.

    Its meshes are meaningless (random weights); it exists so the whole chain runs on a CPU in seconds.
    """
    enc = ImageEncoderConfig(embed_dim=64, depth=2, num_heads=2, size=56, pretrain_img_size=56)
    return ReleaseConfig(
        name="tiny-random",
        dense_vae=DenseVAEConfig(
            model_channels_encoder=(8, 16, 32),
            num_res_blocks_encoder=1,
            num_res_blocks_middle_encoder=1,
            model_channels_decoder=(32, 16, 8),
            num_res_blocks_decoder=1,
            num_res_blocks_middle_decoder=1,
            use_fp16=False,
        ),
        dense_dit=DenseDiTConfig(
            resolution=4,
            latent_shape=(8, 4, 4, 4),
            model_channels=64,
            cond_channels=64,
            num_blocks=2,
            num_heads=2,
            use_fp16=False,
        ),  # 4³ latent -> 16³ index = sparse_dit_512 grid
        dense_image_encoder=enc,
        sparse_vae_512=SparseVAEConfig(
            model_channels_encoder=64,
            num_heads_encoder=2,
            num_head_channels_encoder=32,
            num_blocks_encoder=1,
            model_channels_decoder=512,
            num_heads_decoder=2,
            num_head_channels_decoder=32,
            num_blocks_decoder=1,
            resolution=16,
            use_fp16=False,
        ),  # decoder 512 wide: its 512/16 = 32-ch features feed the 512 refiner
        sparse_dit_512=SparseDiTConfig(
            resolution=16,
            model_channels=64,
            cond_channels=64,
            num_blocks=2,
            num_heads=4,
            num_kv_heads=2,
            use_fp16=False,
        ),
        sparse_vae_1024=SparseVAEConfig(
            model_channels_encoder=64,
            num_heads_encoder=2,
            num_head_channels_encoder=32,
            num_blocks_encoder=1,
            model_channels_decoder=64,
            num_heads_decoder=2,
            num_head_channels_decoder=32,
            num_blocks_decoder=1,
            resolution=16,
            chunk_size=2,
            use_fp16=False,
        ),  # 1024 stage on a 16³ grid: the mesh fills it
        sparse_dit_1024=SparseDiTConfig(
            resolution=16,
            model_channels=64,
            cond_channels=64,
            num_blocks=2,
            num_heads=4,
            num_kv_heads=2,
            factor=0.5,
            use_fp16=False,
        ),
        sparse_image_encoder=enc,
        # one-level refiner UNets (2 channels, loading.TINY_REFINER_CHANNELS) without per-level resnets: 27 cubes
        # of 48³ (512) and of 32³ (1024 sign), an eighth of the official 256³, as its 128³ SDF grid is of 1024³
        refiner=RefinerConfig(layers_per_block=0, layers_mid_block=0, patch_size=48, use_fp16=False),
        refiner_1024=RefinerConfig(layers_per_block=0, layers_mid_block=0, patch_size=32, sign=True, use_fp16=False),
    )
