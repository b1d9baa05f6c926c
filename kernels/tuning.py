"""How the SSA kernels autotune: a size class in the key, results kept on disk, and configs compiled in parallel.

- `tune_size(rows)` is the size class a launch passes in its `tune_rows` argument, which the autotune key names.
  Without it the first shape tuned (a small test, say) would pick the tile for every later size, and with
  results kept on disk it would do so for good: on an H100 that cost the 1024 stage ~9% (2026-12-06).
- Results are kept in Triton's on-disk cache where this Triton can (3.3+), so a new process skips the
  benchmarking (the first sparse sampling of a process otherwise spends seconds on it).
- A new install compiles every config once, one after another inside Triton's autotuner: ~20 s before the
  first mesh on an H100 machine (bench/results/first_run.md). When Triton has its asynchronous compile mode
  (3.4+), the first benchmark of a tuning round first compiles all the round's configs on a few threads; a
  round that finds its result on disk benchmarks nothing and so compiles nothing extra. Any failure there only
  means the configs compile one by one, as without it.
- `compile_ahead` goes further for a layer with several tuned kernels (the SSA layer's three): a dry run of
  its first call hands every config of all of them to one pool, so one slowest compile bounds them together.
- Each config is benchmarked for BENCH_WARMUP_MS + BENCH_MS (`_quick_bench`) where Triton takes a benchmark
  function, instead of Triton's 25 + 100 ms.
"""

from __future__ import annotations

import inspect
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar

from ._common import HAS_TRITON, triton

log = logging.getLogger(__name__)

try:
    from triton.runtime._async_compile import AsyncCompileMode
except ImportError:  # no Triton, or one without the asynchronous compile mode
    AsyncCompileMode = None

COMPILE_THREADS = min(16, os.cpu_count() or 1)
# Each config's benchmark: warm-up and measuring time in ms. Triton's defaults (25, 100) spend ~0.13 s on a
# config, ~4 s over a new install's ~15 configs × 2 size classes. A 25 ms median still spans 14+ launches of
# the slowest kernel; configs closer than its noise (the selection kernel's top two were 3% apart at 27k
# tokens, bench/results/first_run.md) may swap, which costs at most that difference.
BENCH_WARMUP_MS, BENCH_MS = 5, 25
PARALLEL_COMPILE = (
    True  # False: configs compile one by one inside the benchmark, none ahead (first_run.py --sequential)
)


def tune_size(rows: int) -> int:
    """The autotune size class of a launch over `rows` query rows: one class per factor of 4 from 8k (below 8k,
    8k-32k, 32k-128k, 128k-512k, more). The values are multiples of 16, so the unused kernel argument that
    carries it never changes Triton's specialisation: one compiled binary serves every class."""
    return 16 << min(max(rows.bit_length() - 12, 0) // 2, 4)


def _quick_bench(kernel_call, quantiles):
    """Triton's benchmark of one config (median and quantiles, ms), over BENCH_WARMUP_MS + BENCH_MS."""
    return triton.testing.do_bench(kernel_call, warmup=BENCH_WARMUP_MS, rep=BENCH_MS, quantiles=quantiles)


def _precompile(tuner, args, meta, config) -> None:
    """At the first config of a tuning round (`config`), compile the tuner's kernel for every config of the
    round on COMPILE_THREADS threads; the autotuner's launches then find them built."""
    kwargs = {k: v for k, v in meta.items() if k != "warmup"}
    try:
        configs = tuner.prune_configs(meta)
        if len(configs) < 2 or str(config) != str(configs[0]):
            return
        with ThreadPoolExecutor(COMPILE_THREADS) as pool, AsyncCompileMode(pool):
            _compile(tuner, args, kwargs, configs)
    except Exception as e:  # noqa: BLE001 - e.g. a config out of resources: the benchmark reports it as before
        log.debug("parallel precompile of %s stopped (%s); configs compile one by one", tuner.fn, e)


# Set inside `compile_ahead`'s dry run: autotuned launches then only start their compiles.
_AHEAD: ContextVar[bool] = ContextVar("compile_ahead", default=False)
_AHEAD_DONE: set = set()


def compile_ahead(key, dry_run) -> None:
    """Once per `key` in a process, run `dry_run()` (the launches of a layer's first call, on its own outputs)
    with every autotuned launch in it only handing its configs' compiles to one pool of COMPILE_THREADS threads
    and launching nothing; returns when all of them are compiled. Untuned launches run as usual.

    Without it each tuning round compiles its own configs in parallel, but the rounds of one layer follow one
    another: the SSA layer's three kernels took 4.2 + 3.1 + 1.4 s on an H100 machine's 16 cores (brand-new
    cache), where one slowest compile bounds them together: its first 512 call 8.9 → 6.5 s
    (bench/results/first_run.md). Where the tuning
    result is already known (Triton's disk cache) only the chosen config is compiled. Any failure only means
    that kernels compile at their first launch, as without it."""
    if AsyncCompileMode is None or not PARALLEL_COMPILE or key in _AHEAD_DONE:
        return
    _AHEAD_DONE.add(key)
    token = _AHEAD.set(True)
    try:
        with ThreadPoolExecutor(COMPILE_THREADS) as pool, AsyncCompileMode(pool):
            dry_run()
    except Exception as e:  # noqa: BLE001 - the real launches compile whatever is missing
        log.debug("compiling ahead for %s stopped (%s); kernels compile at their first launch", key, e)
    finally:
        _AHEAD.reset(token)


def _known_best(tuner, kwargs, configs):
    """The config this launch would use without benchmarking (tuned in this process or on disk), or None.
    Mirrors the key Triton's Autotuner.run builds (the key arguments, then every tensor's dtype); should that
    change, the answer is None and all configs compile, which costs time only."""
    args = {k: v for k, v in {**tuner.nargs, **kwargs}.items() if k in tuner.arg_names}
    key = [args[k] for k in tuner.keys if k in args] + [str(v.dtype) for v in args.values() if hasattr(v, "dtype")]
    key = tuple(key)
    if key not in tuner.cache and getattr(tuner, "cache_results", False):

        class Miss(Exception):
            pass

        def miss():
            raise Miss

        try:
            tuner.check_disk_cache(key, configs, miss)
        except Exception:  # noqa: BLE001 - Miss, or a Triton whose disk check differs: compile all
            return None
    return tuner.cache.get(key)


def _submit_all(tuner, args, kwargs) -> None:
    """Inside `compile_ahead`: start compiling each config this launch would benchmark, launch nothing."""
    kwargs = {k: v for k, v in kwargs.items() if k != "warmup"}
    tuner.nargs = dict(zip(tuner.arg_names, args))
    configs = tuner.prune_configs(kwargs)
    best = _known_best(tuner, kwargs, configs) if len(configs) > 1 else configs[0]
    _compile(tuner, args, kwargs, configs if best is None else [best])
    tuner.nargs = None


def _compile(tuner, args, kwargs, configs) -> None:
    """Compile (never launch) the tuner's kernel for each config; inside an AsyncCompileMode this only hands
    the compiles to its pool."""
    for c in configs:
        tuner.fn.run(*args, **kwargs, **c.all_kwargs(), warmup=True)


def _parallel(base: type) -> type:
    class ParallelCompileAutotuner(base):
        """Triton's autotuner, compiling a round's configs together before benchmarking the first one, and
        only compiling inside `compile_ahead`."""

        def run(self, *args, **kwargs):
            if _AHEAD.get():
                return _submit_all(self, args, kwargs)
            return super().run(*args, **kwargs)

        def _bench(self, *args, config, **meta):
            if PARALLEL_COMPILE:
                _precompile(self, args, meta, config)
            return super()._bench(*args, config=config, **meta)

    return ParallelCompileAutotuner


def autotune(configs, key, **kwargs):
    """`triton.autotune(configs, key, **kwargs)` with disk-kept results and parallel compilation where available."""
    params = inspect.signature(triton.autotune).parameters if HAS_TRITON else {}
    if "cache_results" in params:
        kwargs.setdefault("cache_results", True)
    if "do_bench" in params:
        kwargs.setdefault("do_bench", _quick_bench)

    def wrap(kernel):
        tuner = triton.autotune(configs, key=key, **kwargs)(kernel)
        if AsyncCompileMode is not None and isinstance(getattr(tuner, "fn", None), triton.JITFunction):
            tuner.__class__ = _parallel(type(tuner))
        return tuner

    return wrap
