"""Benchmark: 1024 sparse VAE decode (s2core/sparse_vae.py) on a realistic latent structure.

The structure: surfaces of trimesh primitives (sphere, torus, box) sampled densely, voxelized at the
latent grid (128 = 1024 / 8) and dilated until it has at least --tokens tokens (>= 150k by default,
the size of a detailed 1024 structure). Deterministic weights (s2core.testing, seed 0) in the
checkpoint's dtypes (fp16), latent feats seeded randn fp16. Reports decode time, peak GPU memory,
output voxels, and optionally marching cubes (--mesh). With --upstream PATH (a Direct3D-S2 checkout, or
the folder holding its `direct3d_s2` package) it also runs the original's decoder on the same inputs and
weights in the same process and compares outputs. Where torchsparse / flash_attn are not importable the
original runs on tools/golden/standins_gpu.py (adapters over OUR sparse conv and SDPA attention, listed in
the results): its numbers then measure the original's algorithm and memory behaviour (chunking, caches,
buffers), not torchsparse's or flash-attn's kernels. Before the original runs, our model and outputs are
moved to the CPU so its peak memory counts only its own weights, inputs and activations.

    python bench/bench_sparse_vae.py                      # GPU, writes bench/results/sparse_vae.md
    python bench/bench_sparse_vae.py --mesh --upstream .scratch
    python bench/bench_sparse_vae.py --tiny --upstream UPSTREAM/Direct3D-S2   # CPU smoke run, no file
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from s2core.config import SparseVAEConfig, tiny_release  # noqa: E402
from s2core.mesh import sparse_sdf_to_mesh  # noqa: E402
from s2core.sparse import SparseTensor  # noqa: E402
from s2core.sparse.conv import kernel_offsets  # noqa: E402
from s2core.sparse.coords import coords_to_keys  # noqa: E402
from s2core.sparse_vae import SparseSDFVAE  # noqa: E402
from s2core.testing import deterministic_state_dict  # noqa: E402


def latent_structure(resolution: int, min_tokens: int, device) -> torch.Tensor:
    """[N, 4] int32 (0, x, y, z): voxelized primitive surfaces, dilated to >= min_tokens."""
    import trimesh

    meshes = [
        trimesh.creation.icosphere(subdivisions=5, radius=0.8),
        trimesh.creation.torus(major_radius=0.5, minor_radius=0.15).apply_translation([0, 0, 0.1]),
        trimesh.creation.box(extents=[1.2, 0.9, 0.5]),
    ]
    pts = (
        torch.cat(
            [
                torch.from_numpy(trimesh.sample.sample_surface_even(m, 40 * resolution**2 // 64, seed=0)[0])
                for m in meshes
            ]
        )
        .float()
        .to(device)
    )
    xyz = ((pts + 1) / 2 * resolution).floor().clamp(0, resolution - 1).long()
    coords = torch.unique(torch.cat([torch.zeros(len(xyz), 1, dtype=torch.long, device=device), xyz], 1), dim=0)
    offs = torch.cat([torch.zeros(27, 1, dtype=torch.long), kernel_offsets()], 1).to(device)
    while coords.shape[0] < min_tokens:  # dilate by one voxel
        grown = (coords[:, None, :] + offs[None]).reshape(-1, 4)
        grown = grown[((grown[:, 1:] >= 0) & (grown[:, 1:] < resolution)).all(1)]
        coords = torch.unique(grown, dim=0)
    return coords[torch.argsort(coords_to_keys(coords))].int()


def _rel_rms(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).pow(2).mean().sqrt() / ref.double().pow(2).mean().sqrt()).item()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_ours(vae, latent, device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t = time.perf_counter()
    with torch.no_grad():
        sdf = vae.decode(latent)
    sync(device)
    ms = (time.perf_counter() - t) * 1e3
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return sdf, ms, peak


def run_upstream(path: str, cfg: SparseVAEConfig, state: dict, latent: SparseTensor, device):
    """The original's decoder on `latent`: ((feats, coords, ms, peak GiB) on the CPU, stand-ins) or (None, why)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "golden"))
    try:
        import standins_gpu

        used = standins_gpu.install_standins(path)  # only for packages that are not importable
        from direct3d_s2.modules import sparse as sp

        params = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
        model = standins_gpu.load_original_vae(params, state, device)
    except Exception as e:
        return None, f"original not importable ({type(e).__name__}: {e})"
    with torch.no_grad():  # warm-up on a small slice, as for ours
        model.decoder(sp.SparseTensor(latent.feats[:64], latent.coords[:64]), factor=1.0)
    x = sp.SparseTensor(latent.feats, latent.coords)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t = time.perf_counter()
    with torch.no_grad():
        out = model.decoder(x, factor=1.0)
    sync(device)
    ms = (time.perf_counter() - t) * 1e3
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return (out.feats.cpu(), out.coords.cpu(), ms, peak), used


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny config on CPU (smoke test)")
    ap.add_argument("--tokens", type=int, default=150_000, help="minimum latent tokens")
    ap.add_argument("--mesh", action="store_true", help="also time marching cubes on the decoded SDF")
    ap.add_argument("--threshold", type=float, default=0.2, help="mc threshold (pipeline default 0.2)")
    ap.add_argument(
        "--upstream",
        help="path to a DreamTechAI/Direct3D-S2 checkout (or the folder holding its "
        "direct3d_s2 package, e.g. .scratch) to compare against",
    )
    ap.add_argument(
        "--out",
        default=str(Path(__file__).resolve().parent / "results" / "sparse_vae.md"),
        help="results file (not written with --tiny)",
    )
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:
        cfg, tokens = tiny_release().sparse_vae_1024, min(args.tokens, 300)
        if args.upstream:  # the original's encoder (built, unused) needs model_channels_encoder // 16 % 32 == 0
            cfg = dataclasses.replace(cfg, model_channels_encoder=512)
    else:
        cfg, tokens = SparseVAEConfig(resolution=128, chunk_size=4), args.tokens
    coords = latent_structure(cfg.resolution, tokens, device)
    if args.tiny:
        coords = coords[:tokens]  # a slab of the structure keeps the smoke run to seconds
    vae = SparseSDFVAE(cfg)
    state = deterministic_state_dict(vae, seed=0)
    vae.load_state_dict(state, strict=True)
    vae = vae.to(device).eval()
    wdtype = vae.decoder.input_layer.weight.dtype
    g = torch.Generator().manual_seed(0)
    latent = SparseTensor(torch.randn(len(coords), cfg.embed_dim, generator=g).to(device, wdtype), coords, 1)

    lines = [
        f"# sparse VAE 1024 decode benchmark ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)",
        "",
        f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, weights {wdtype}, "
        f"torch {torch.__version__}",
        f"command: `python {' '.join(sys.argv)}`",
        f"structure: {len(coords)} latent tokens at {cfg.resolution}^3 (primitive surfaces, dilated)",
        "",
        "| run | decode ms | peak GiB | output voxels | notes |",
        "|---|---|---|---|---|",
    ]
    run_ours(vae, SparseTensor(latent.feats[:64], latent.coords[:64], 1), device)  # warm-up (kernels, tables)
    sdf, ms, peak = run_ours(vae, latent, device)
    n_unique = torch.unique(coords_to_keys(sdf.coords)).numel()
    lines.append(f"| ours | {ms:.0f} | {peak:.2f} | {len(sdf.coords)} | {len(sdf.coords) - n_unique} seam duplicates |")
    if args.mesh:
        sync(device)
        t = time.perf_counter()
        v, f = sparse_sdf_to_mesh(sdf.coords, sdf.feats, cfg.resolution * 8, args.threshold)
        sync(device)
        lines.append(
            f"| ours marching cubes | {(time.perf_counter() - t) * 1e3:.0f} | "
            f"{torch.cuda.max_memory_allocated() / 2**30 if device.type == 'cuda' else float('nan'):.2f} | "
            f"{len(v)} verts / {len(f)} faces | threshold {args.threshold} |"
        )
    if args.upstream:
        sdf_c, sdf_f = sdf.coords.cpu(), sdf.feats.cpu()
        del sdf
        v = f = None
        vae.cpu()  # the original's peak then counts only its own weights, inputs and activations ...
        latent.cache.clear()  # ... (our window plans and kernel maps were memoised on the latent)
        res, used = run_upstream(args.upstream, cfg, state, latent, device)
        if res is None:
            lines.append(f"| original | - | - | - | {used} |")
        else:
            feats, ucoords, ums, upeak = res
            same = torch.equal(ucoords.int(), sdf_c.int())
            err = _rel_rms(sdf_f, feats) if same else float("nan")
            backend = "on stand-ins (see below)" if used else "torchsparse + flash_attn"
            lines.append(
                f"| original ({backend}) | {ums:.0f} | {upeak:.2f} | {len(ucoords)} | coords identical "
                f"(same order): {same}, rel RMS ours vs original {err:.2e} |"
            )
            if used:
                lines += [
                    "",
                    "Stand-ins used for the original (its numbers measure the original's algorithm "
                    "and memory behaviour on our kernels, not torchsparse's or flash-attn's):",
                    "",
                ]
                lines += [f"* `{name}`: {why}" for name, why in used.items()]
    print("\n".join(lines))
    if not args.tiny:
        path = Path(args.out)
        path.write_text("\n".join(lines) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
