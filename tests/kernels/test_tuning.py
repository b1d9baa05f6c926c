"""kernels/tuning.py: autotune configs are pruned by the running GPU's own shared-memory limit (faked here; no
GPU needed), tuned per size class (a small first launch must not pick the tile of the 1024 stage), benchmarked
briefly, and compiled ahead inside `compile_ahead` (a stand-in autotuner records what would compile or launch).

Per-block opt-in limits: sm_86/89/120 (RTX 30/40/50) 101376 B, sm_80 (A100) 166912 B, sm_90 (H100) 232448 B.
The estimates themselves are checked against the compiled kernels for every architecture by bench/archs.py.
"""

from types import SimpleNamespace

import pytest
import torch

from kernels import _common, tuning
from kernels import ssa_compressed as CMP
from kernels import ssa_selection as SEL
from kernels import ssa_window as WIN

RTX, A100, H100 = 101376, 166912, 232448


def _cfg(warps=4, stages=2, **meta):
    return _common.triton.Config(meta, num_warps=warps, num_stages=stages)


def _kept(module, configs, limit, monkeypatch, **sizes):
    monkeypatch.setattr(module, "_smem_limit", lambda device: limit)
    q = torch.empty(0)
    return module._prune(configs, {"q": q}, **sizes)


def test_released_model_configs_all_fit_a_consumer_gpu(monkeypatch):
    # D = 32, G = 16: every config of the three SSA kernels stays on a 99 KB GPU
    for module, sizes in [
        (CMP, dict(G=16, HEAD_DIM=32, CELLS=8)),
        (SEL, dict(G=16, HEAD_DIM=32)),
        (WIN, dict(G=16, HEAD_DIM=32, TILE_Q=8)),
    ]:
        configs = module._configs()
        kept = _kept(module, configs, RTX, monkeypatch, **sizes)
        assert kept, module.__name__
        assert all(c in configs for c in kept)
        assert all(module._smem(c, 32, *([128] if module is WIN else [])) <= RTX for c in kept)


def test_config_too_big_for_a_consumer_gpu_is_dropped_there_only(monkeypatch):
    # the compressed kernel at D = 128 (a wider model): BLOCK_R 64 x BLOCK_K 128, 2 stages needs
    # 2·(2·2·128·128 + 64·128 + 64·128) = 163840 B: over an RTX's 101376, within an A100's and an H100's
    big = _cfg(BLOCK_R=64, BLOCK_K=128)
    small = _cfg(BLOCK_R=32, BLOCK_K=64)
    assert CMP._smem(big, 128) == 163840 and CMP._smem(small, 128) <= RTX
    sizes = dict(G=16, HEAD_DIM=128, CELLS=1)
    assert _kept(CMP, [big, small], RTX, monkeypatch, **sizes) == [small]
    assert _kept(CMP, [big, small], A100, monkeypatch, **sizes) == [big, small]
    assert _kept(CMP, [big, small], H100, monkeypatch, **sizes) == [big, small]


def test_never_prunes_to_empty(monkeypatch):
    # nothing fits 8 KB: the smallest config stays (Triton then reports it if even that fails), not an empty list
    configs = SEL._configs()
    kept = _kept(SEL, configs, 8192, monkeypatch, G=16, HEAD_DIM=32)
    smallest = min(configs, key=lambda c: SEL._smem(c, 32))
    assert kept == [smallest]


def test_limit_comes_from_the_running_device(monkeypatch):
    _common._cuda_smem_limit.cache_clear()
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda i: SimpleNamespace(shared_memory_per_block_optin=RTX if i == 1 else H100),
    )
    assert _common.smem_limit(torch.device("cuda", 1)) == RTX
    assert _common.smem_limit(torch.device("cuda", 0)) == H100
    assert _common.smem_limit(torch.device("cpu")) > H100  # the interpreter: no limit
    _common._cuda_smem_limit.cache_clear()


@pytest.mark.triton
def test_autotuners_prune_with_these_hooks():
    assert CMP._cmp_attn_topk_tuned.early_config_prune is CMP._prune
    assert SEL._selection_tuned.early_config_prune is SEL._prune
    assert WIN._window_tuned.early_config_prune is WIN._prune


def test_size_classes():
    # one class per factor of 4 from 8k rows; the two stages of the released model land in different classes
    edges = {0: 16, 1: 16, 8191: 16, 8192: 32, 32767: 32, 32768: 64, 131071: 64, 131072: 128, 524287: 128}
    for rows, cls in edges.items():
        assert tuning.tune_size(rows) == cls, rows
    assert tuning.tune_size(1 << 30) == 256  # and no further
    assert tuning.tune_size(27_126) != tuning.tune_size(108_862)
    # multiples of 16 only: Triton specialises integer arguments on ==1 and %16, so all classes share a binary
    assert all(tuning.tune_size(1 << b) % 16 == 0 for b in range(32))


def test_autotuners_key_on_the_size_class():
    for tuner in (CMP._cmp_attn_topk_tuned, SEL._selection_tuned, WIN._window_tuned):
        assert "tune_rows" in tuner.keys


@pytest.mark.triton
def test_autotuners_benchmark_each_config_briefly(monkeypatch):
    # where this Triton takes a do_bench, every tuner benchmarks a config over BENCH_WARMUP_MS + BENCH_MS
    import inspect

    if "do_bench" not in inspect.signature(_common.triton.autotune).parameters:
        pytest.skip("this Triton's autotune takes no do_bench; its own 25 + 100 ms benchmark applies")
    for tuner in (CMP._cmp_attn_topk_tuned, SEL._selection_tuned, WIN._window_tuned):
        assert tuner._do_bench is tuning._quick_bench
    seen = {}
    monkeypatch.setattr(_common.triton.testing, "do_bench", lambda fn, **kw: seen.update(kw) or [fn()] * 3)
    assert tuning._quick_bench(lambda: 0.5, quantiles=(0.5, 0.2, 0.8)) == [0.5] * 3
    assert seen == {"warmup": tuning.BENCH_WARMUP_MS, "rep": tuning.BENCH_MS, "quantiles": (0.5, 0.2, 0.8)}
    assert tuning.BENCH_WARMUP_MS + tuning.BENCH_MS < 25 + 100


class _FakeTuner:
    """What `_parallel` needs of Triton's Autotuner, recording launches (run) and compiles (fn.run warmup)."""

    def __init__(self, configs, cache=None):
        self.configs, self.cache, self.cache_results = configs, dict(cache or {}), False
        self.arg_names, self.keys, self.nargs = ["x", "n"], ["n"], None
        self.launched, self.compiled = [], []
        self.fn = SimpleNamespace(run=lambda *a, warmup, **kw: self.compiled.append((a, kw, warmup)))

    def prune_configs(self, kwargs):
        return self.configs

    def run(self, *args, **kwargs):
        self.launched.append(args)


needs_async = pytest.mark.skipif(tuning.AsyncCompileMode is None, reason="this Triton has no AsyncCompileMode")


@needs_async
def test_inside_compile_ahead_a_tuned_launch_only_compiles_each_config():
    configs = [_cfg(BLOCK=16), _cfg(BLOCK=32, warps=8)]
    tuner = tuning._parallel(_FakeTuner)(configs)
    x = torch.zeros(3)
    tuning.compile_ahead(("test", 1), lambda: tuner.run(x, 5, grid=(1,), warmup=False))
    assert tuner.launched == []
    assert [kw["BLOCK"] for _, kw, warm in tuner.compiled] == [16, 32]
    assert all(warm and a == (x, 5) and kw["grid"] == (1,) for a, kw, warm in tuner.compiled)
    assert tuner.nargs is None
    # outside it, the same launch is Triton's own (benchmark, then launch)
    tuner.run(x, 5, grid=(1,), warmup=False)
    assert len(tuner.launched) == 1 and len(tuner.compiled) == 2


@needs_async
def test_compile_ahead_compiles_only_the_known_winner():
    # a result tuned before (here in memory; on disk in a new process) needs only its own config compiled
    configs = [_cfg(BLOCK=16), _cfg(BLOCK=32)]
    tuner = tuning._parallel(_FakeTuner)(configs, cache={(5, "torch.float32"): configs[1]})
    tuning.compile_ahead(("test", 2), lambda: tuner.run(torch.zeros(3), 5, grid=(1,), warmup=False))
    assert [kw["BLOCK"] for _, kw, _ in tuner.compiled] == [32]


@needs_async
def test_compile_ahead_runs_once_per_key_and_swallows_failures():
    calls = []

    def dry_run():
        calls.append(tuning._AHEAD.get())
        raise RuntimeError("out of resources")

    tuning.compile_ahead(("test", 3), dry_run)  # no exception escapes
    tuning.compile_ahead(("test", 3), dry_run)
    assert calls == [True]
    assert tuning._AHEAD.get() is False  # reset after the dry run
    tuning.compile_ahead(("test", 4), dry_run)
    assert calls == [True, True]


def test_an_ssa_forward_on_the_cpu_compiles_nothing_ahead(monkeypatch):
    from s2core.ssa import SpatialSparseAttention, ssa_plan

    seen = []
    monkeypatch.setattr(tuning, "compile_ahead", lambda key, dry_run: seen.append(key))
    m = SpatialSparseAttention(64, 4, 2, 4, 4, 2, 4)
    coords = torch.stack(torch.meshgrid(*[torch.arange(4)] * 3, indexing="ij"), -1).reshape(-1, 3)  # one block
    coords = torch.cat([torch.zeros(len(coords), 1, dtype=torch.long), coords], 1)
    plan = ssa_plan(coords, 1, 4, 4, 4, (0,))
    out = m(torch.randn(len(coords), 64), plan)
    assert out.shape == (len(coords), 64) and seen == []
