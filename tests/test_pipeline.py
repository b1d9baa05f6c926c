"""Pipeline stage functions end to end on `tiny-random` (CPU, seconds): typed results, the official
defaults, progress/cancel hooks, out-of-memory messages, and clear errors for missing parts.

The tiny model's weights are random, so no test looks at mesh quality: they check shapes, ordering,
files and messages. Steps are cut to 2-3 per stage to keep the suite fast; the defaults themselves are
asserted on the function signatures.
"""

import inspect

import pytest
import torch

from s2core import config, hooks, loading, results
from s2core import pipeline as P
from s2core.structure import sort_block

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def models():
    return loading.load_models("tiny-random", loading.STAGES)


def picture(batch=1, size=64):
    """A red ellipse-ish block on white with its object mask (1 = object)."""
    img = torch.ones(batch, size, size, 3)
    mask = torch.zeros(batch, size, size)
    for b in range(batch):
        lo = 12 + 4 * b
        img[b, lo : size - 12, 18 : size - 18] = torch.tensor([0.8, 0.2, 0.1])
        mask[b, lo : size - 12, 18 : size - 18] = 1.0
    return img, mask


def test_official_defaults():
    sig = inspect.signature(P.image_to_mesh).parameters
    assert (sig["dense_steps"].default, sig["sparse_512_steps"].default, sig["sparse_1024_steps"].default) == (
        50,
        30,
        15,
    )
    assert sig["guidance"].default == 7.0 and sig["mc_threshold"].default == 0.2 and sig["resolution"].default == 1024
    assert sig["remove_interior"].default is True and sig["remesh"].default is False
    assert inspect.signature(P.decode_dense).parameters["threshold"].default == 0.1
    assert inspect.signature(P.sample_dense).parameters["steps"].default == 50
    assert config.SIMPLIFY_RATIO == 0.95


def test_make_structure_block_sorted_and_counts():
    g = torch.Generator().manual_seed(0)
    xyz = torch.unique(torch.randint(0, 16, (300, 3), generator=g), dim=0)
    coords = torch.cat(
        [torch.cat([torch.zeros(len(xyz), 1), xyz], 1), torch.cat([torch.ones(40, 1), xyz[:40]], 1)]
    ).int()
    st = results.make_structure(coords[torch.randperm(len(coords), generator=g)], 512, 16, 8)
    assert st.counts == (len(xyz), 40) and st.max_seqlen == len(xyz) and st.batch_size == 2
    assert st.cu_seqlens.tolist() == [0, len(xyz), len(xyz) + 40] and st.cu_seqlens.dtype == torch.int32
    assert torch.equal(st.coords, sort_block(coords, 8)[0])  # batch-major, then block order
    blocks = {tuple(r) for r in (xyz[:40] // 8).tolist()}
    assert st.num_blocks[1] == len(blocks) and st.block_cu.numel() == sum(st.num_blocks) + 1
    for k in range(len(st.block_cu) - 1):  # every block range holds one item's one 8³ block
        rows = st.coords[st.block_cu[k] : st.block_cu[k + 1]].long()
        assert len(torch.unique(torch.cat([rows[:, :1], rows[:, 1:] // 8], 1), dim=0)) == 1
    assert st.to("cpu") is st


def test_mesh_packing_roundtrip():
    a = (torch.rand(4, 3), torch.tensor([[0, 1, 2], [0, 2, 3]]))
    b = (torch.rand(3, 3), torch.tensor([[0, 1, 2]]))
    m = results.Mesh.from_list([a, b], 512, {"seed": 3})
    assert m.vertex_counts == (4, 3) and m.face_counts == (2, 1) and m.batch_size == 2
    assert torch.equal(m.item(1)[0], b[0]) and torch.equal(m.item(1)[1], b[1])  # faces stay local per item
    assert m.to("cpu").info == {"seed": 3}


def test_tiny_weights_deterministic_and_strict():
    a = loading.load_models("tiny-random", ("dense",))
    b = loading.load_models("tiny-random", ("dense",))
    for name, m in a.loaded_parts().items():
        for (k, v), (k2, v2) in zip(m.state_dict().items(), b.loaded_parts()[name].state_dict().items()):
            assert k == k2 and torch.equal(v, v2), f"{name}.{k} differs between two loads"
    sd = loading.tiny_state_dicts(a.config, ("dense_dit",))["dense_dit"]
    sd.pop(next(iter(sd)))
    with pytest.raises(ValueError, match="do not fit this network"):
        loading.load_models(
            "tiny-random",
            ("dense",),
            state_dicts={**loading.tiny_state_dicts(a.config, loading.STAGE_PARTS["dense"]), "dense_dit": sd},
        )


def test_chain_512_to_file(models, tmp_path):
    img, mask = picture()
    steps = []
    cond = P.encode_image(models, img, mask)
    assert cond.tokens.shape[:2] == (1, 1 + 4 + (models.config.dense_image_encoder.size // 14) ** 2)
    dense = P.sample_dense(models, cond, seed=5, steps=3, callback=lambda i, n: steps.append((i, n)))
    assert steps == [(1, 3), (2, 3), (3, 3)] and dense.latents.shape == (1, 8, 4, 4, 4)
    st = P.decode_dense(models, dense)
    assert st.resolution == 512 and st.grid == 16 and st.num_tokens == sum(st.counts) > 0
    lat = P.sample_sparse(models, cond, st, seed=5, steps=2)
    assert lat.feats.shape == (st.num_tokens, 16) and lat.structure is not None
    mesh = P.decode_sparse(models, lat, refine=False)
    assert mesh.batch_size == 1 and mesh.face_counts[0] > 0
    v, f = mesh.item(0)
    assert v.dtype == torch.float32 and f.dtype == torch.int64 and int(f.max()) < v.shape[0]
    assert float(v.abs().max()) <= 1.0
    assert mesh.info == {"variant": "tiny-random", "seed": 5, "resolution": 512, "refined": False}
    out = P.save(mesh, tmp_path / "m.glb", {"note": "x"})
    assert out == [tmp_path / "m.glb"] and out[0].read_bytes()[:4] == b"glTF"


def test_sparse_sampling_says_which_condition_is_zero(models, monkeypatch):
    """The sampler tells the sparse DiT which condition is the zeros it made, so no forward looks at its
    condition (a host sync: it would stop the loop from replaying as a CUDA graph, `cuda_graph.py`). Each
    step runs the image condition, then the zeros."""
    import s2core.sparse_dit as sd

    def looked(cond):
        raise AssertionError("the sparse DiT looked at its condition")

    monkeypatch.setattr(sd, "is_zero_condition", looked)
    seen, real = [], sd.SparseDiT.forward

    def forward(self, x, t, cond, backend="auto", zero_cond=None):
        seen.append((zero_cond, bool(cond.any())))
        return real(self, x, t, cond, backend, zero_cond)

    monkeypatch.setattr(sd.SparseDiT, "forward", forward)
    img, mask = picture()
    cond = P.encode_image(models, img, mask)
    st = P.decode_dense(models, P.sample_dense(models, cond, seed=5, steps=1))
    P.sample_sparse(models, cond, st, seed=5, steps=2)
    assert seen == [(False, True), (True, False)] * 2


def test_stage_1024_from_structure(models):
    """Sparse 1024 sampling + decode on a small hand-made structure (the 8³ blocks of the 16³ tiny grid)."""
    img, mask = picture()
    cond = P.encode_image(models, img, mask)
    x, y, z = torch.meshgrid(*[torch.arange(4, 12)] * 3, indexing="ij")
    xyz = torch.stack([x.flatten(), y.flatten(), z.flatten()], 1)
    xyz = xyz[((xyz - 7.5) ** 2).sum(1) < 12]  # a small ball of cells across the 8³ blocks
    coords = torch.cat([torch.zeros(len(xyz), 1, dtype=torch.long), xyz], 1)
    st = results.make_structure(coords, 1024, 16, 8)
    lat = P.sample_sparse(models, cond, st, seed=1, steps=1)
    mesh = P.decode_sparse(models, lat, refine=False)
    assert mesh.resolution == 1024 and mesh.face_counts[0] > 0


def test_mesh_to_structure_icosphere(models):
    import trimesh

    ico = trimesh.creation.icosphere(subdivisions=1)
    mesh = results.Mesh.from_list([(torch.tensor(ico.vertices, dtype=torch.float32), torch.tensor(ico.faces))])
    st = P.mesh_to_structure(models, mesh)
    assert st.resolution == 1024 and st.grid == 16 and st.num_tokens > 100
    assert int(st.coords[:, 1:].min()) >= 0 and int(st.coords[:, 1:].max()) < 16
    empty = results.Mesh.from_list([(torch.zeros(3, 3), torch.zeros(0, 3, dtype=torch.int64))])
    with pytest.raises(ValueError, match="no faces"):
        P.mesh_to_structure(models, empty)


def test_cancel_mid_sampling_raises_and_stops(models):
    img, mask = picture()
    cond = P.encode_image(models, img, mask)
    seen = []

    def stop():
        return len(seen) >= 2

    with pytest.raises(hooks.Cancelled):
        P.sample_dense(models, cond, steps=10, callback=lambda i, n: seen.append(i), should_stop=stop)
    assert seen == [1, 2]


def test_out_of_memory_names_what_to_lower(models, monkeypatch):
    img, mask = picture()
    cond = P.encode_image(models, img, mask)

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(models.dense_dit, "forward", oom)
    with pytest.raises(RuntimeError, match=r"^Out of GPU memory during dense sampling; use fewer images per batch"):
        P.sample_dense(models, cond, steps=2)


def test_bad_inputs_fail_before_any_model(models, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a network ran before the inputs were checked")

    monkeypatch.setattr(models.image_encoder, "forward", boom)
    img, _ = picture()
    with pytest.raises(ValueError, match="(?i)mask"):
        P.encode_image(models, img, torch.zeros(1, 64, 64))  # empty mask
    with pytest.raises(ValueError):
        P.encode_image(models, torch.full((1, 64, 64, 3), float("nan")), torch.ones(1, 64, 64))
    with pytest.raises(ValueError, match="steps"):
        P.sample_dense(
            models, results.Conditioning(torch.zeros(1, 21, 64), torch.zeros(1, 4, 4, dtype=torch.bool)), steps=0
        )


def test_token_budget_refuses_early(models):
    st = results.make_structure(torch.tensor([[0, 1, 1, 1], [0, 1, 1, 2], [0, 2, 1, 1]]), 1024, 32)
    cond = results.Conditioning(torch.zeros(1, 21, 64), torch.zeros(1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="3 sparse tokens at 1024, more than the token budget of 2"):
        P.sample_sparse(models, cond, st, max_tokens=2)


def test_image_to_mesh_progress_counts_all_stages(models):
    img, mask = picture()
    calls = []
    mesh = P.image_to_mesh(
        models,
        img,
        mask,
        seed=2,
        resolution=512,
        dense_steps=2,
        sparse_512_steps=2,
        refine_512=False,
        callback=lambda i, n: calls.append((i, n)),
    )
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert mesh.face_counts[0] > 0 and mesh.info["seed"] == 2


@pytest.mark.slow
def test_refiner_path_512(models):
    """The interior-removal path (27 cubes) runs, reports progress and gives a surface: tiny-random's refiner
    passes the SDF through (s2core/tiny_weights.py), so its refined mesh has faces like the unrefined one."""
    img, mask = picture()
    cond = P.encode_image(models, img, mask)
    st = P.decode_dense(models, P.sample_dense(models, cond, steps=1))
    lat = P.sample_sparse(models, cond, st, steps=1)
    cubes = []
    mesh = P.decode_sparse(models, lat, refine=True, callback=lambda i, n: cubes.append((i, n)))
    assert mesh.face_counts[0] > 0 and mesh.info["refined"] is True
    assert cubes[-1] == (27, 27)


def test_tiny_refiners_pass_the_sdf_through():
    """tiny-random's refiners are increasing in the SDF: the 512 field is 2 x mc_threshold where the SDF is
    mc_threshold (the level it is meshed at), the 1024 sign flips there; the latent features do not matter."""
    cfg = config.tiny_release()
    sds = loading.tiny_state_dicts(cfg, ("refiner_512", "refiner_1024"))
    r512, r1024 = loading.build_part("refiner_512", cfg), loading.build_part("refiner_1024", cfg)
    r512.load_state_dict(sds["refiner_512"])
    r1024.load_state_dict(sds["refiner_1024"])
    ramp = torch.linspace(-1, 1, 41, dtype=torch.float32)  # 0.2 is sample 24
    sdf = ramp.view(1, 1, 41, 1, 1).expand(1, 1, 41, 8, 8).contiguous()
    sdf = torch.nn.functional.pad(sdf, (0, 0, 0, 0, 0, 7), value=1.0)  # 48 deep, +1 fill as the pipeline's
    with torch.no_grad():
        out = r512.refine_cube(sdf, torch.randn(1, 8, 48, 8, 8))[0, 0, :41, 4, 4]
        sign = r1024(sdf)[0, 0, :41, 4, 4]
    assert bool((out[1:] > out[:-1]).all())
    assert abs(out[24].item() - 2 * config.MC_THRESHOLD) < 1e-3
    assert sign[:24].eq(-1).all() and sign[25:].eq(1).all()


def test_v1_0_sparse_conditions_run():
    """The v1.0 sparse DiTs take only the masked patch tokens (a SparseTensor); tiny weights, v1.0 layout."""
    from dataclasses import replace

    cfg = config.tiny_release()
    cfg = replace(
        cfg,
        sparse_dit_512=replace(
            cfg.sparse_dit_512, compression_block_size=4, topk=32, compression_version="v2", sparse_conditions=True
        ),
    )
    parts = loading.STAGE_PARTS["dense"] + loading.STAGE_PARTS["sparse_512"]
    m = loading.Models(cfg, "tiny-random", torch.float32, loading.Placement("cpu"))
    for name, sd in loading.tiny_state_dicts(cfg, tuple(dict.fromkeys(parts))).items():
        module = loading.build_part(name, cfg)
        loading._load_weights(name, module, sd)
        setattr(m, name, module)
    img, mask = picture()
    cond = P.encode_image(m, img, mask)
    st = P.decode_dense(m, P.sample_dense(m, cond, steps=1))
    lat = P.sample_sparse(m, cond, st, steps=2)
    assert lat.feats.shape == (st.num_tokens, 16) and torch.isfinite(lat.feats).all()
