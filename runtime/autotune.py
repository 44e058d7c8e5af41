"""Choosing a kernel configuration per tuning key: in memory, else from the disk cache, else
by timing the candidates within a time budget, then stored on disk.

Our own small tuner rather than ``triton.autotune``: it reads and writes the persistent cache
(runtime/autotune_cache.py), bounds the time spent per key, and runs the same way on every
Triton version. The candidates arrive already pruned by the shared-memory model and ordered
best-guess first (codegen/tiling.py), so a budget cut still returns a good configuration.

Environment: ``QCOMPILE_AUTOTUNE=0`` takes the first candidate without timing (and leaves the
cache alone); ``QCOMPILE_TUNE_BUDGET_S`` (default 10) bounds the seconds spent per key.
"""
import hashlib
import inspect
import math
import os
import time
from collections.abc import Callable

import torch
import triton
import triton.testing
from triton.runtime.errors import OutOfResources

from qcompile.codegen import kv_attention, kv_int4_attention, kv_tiling, scaled_gemm, tiling, unpack, wq_gemm, wq_gemv

from .autotune_cache import AutotuneCache

# A tuned choice is only valid for the code it was timed on.
SOURCE = hashlib.sha256("".join(inspect.getsource(m) for m in (tiling, unpack, wq_gemm, wq_gemv, scaled_gemm,
                                                                   kv_tiling, kv_attention, kv_int4_attention)
                                ).encode()
                        ).hexdigest()[:16]


def enabled() -> bool:
    return os.environ.get("QCOMPILE_AUTOTUNE", "1") != "0"


def budget_s() -> float:
    return float(os.environ.get("QCOMPILE_TUNE_BUDGET_S", "10"))


def time_us(run: Callable[[], None], device: torch.device, graphed: bool = False) -> float:
    """Median µs of ``run``: CUDA events on a GPU (20 ms per config; Triton's default is 100),
    the wall clock under the interpreter. ``graphed``: replayed from a CUDA graph, for kernels
    of tens of µs whose launches from Python would take longer than they run (timed
    launch by launch, the KV attention's tuning ranked its tiles by CPU noise and picked one
    38% slower than the best at 16k tokens, batch 1)."""
    if device.type == "cuda":
        if graphed:
            return triton.testing.do_bench_cudagraph(run, rep=20) * 1e3
        return triton.testing.do_bench(run, warmup=5, rep=20) * 1e3
    run()
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1e6


class Tuner:
    def __init__(self, cache: AutotuneCache | None = None):
        self.cache = cache
        self.memory: dict = {}  # (kernel, key, tuning on) -> the chosen candidate
        self.stats = {"memory": 0, "disk": 0, "tuned": 0, "untuned": 0}

    def disk(self) -> AutotuneCache:
        """The cache folder as the environment names it now (tests and the CLI change it)."""
        return self.cache or AutotuneCache()

    def pick(self, kernel: str, key: tuple, candidates: Callable[[], list], run: Callable, device: torch.device,
             graphed: bool = False):
        """The candidate for ``key`` (a tiling.Choice: kernel and config); ``candidates()``
        lists them, best guess first (called on a miss only: pruning costs more than a
        launch); ``run(c)`` launches one. ``kernel`` names the op being tuned."""
        memo = (kernel, key, enabled())
        hit = self.memory.get(memo)
        if hit is not None:
            self.stats["memory"] += 1
            return hit
        candidates = candidates()
        if len(candidates) == 1 or not enabled():  # nothing to time, nothing to cache
            cfg = candidates[0]
            self.stats["untuned"] += 1
        else:
            disk = self.disk()
            cfg = disk.load(device, kernel, SOURCE, key, candidates)
            if cfg is not None:
                self.stats["disk"] += 1
            else:
                cfg, timings = self._tune(candidates, run, device, graphed)
                disk.store(device, kernel, SOURCE, key, cfg, timings)
                self.stats["tuned"] += 1
        self.memory[memo] = cfg
        return cfg

    @staticmethod
    def _tune(candidates, run, device, graphed):
        """Time candidates in order until the budget is spent; configs that do not fit the
        device are skipped. Returns the fastest and every timing taken."""
        start, timings, best, first_error = time.monotonic(), {}, (math.inf, None), None
        for cfg in candidates:
            if best[1] is not None and time.monotonic() - start > budget_s():
                break
            try:
                t = time_us(lambda: run(cfg), device, graphed)
            except OutOfResources as e:
                first_error = first_error or e
                continue
            timings[str(cfg)] = round(t, 3)
            best = min(best, (t, cfg), key=lambda b: b[0])
        if best[1] is None:
            raise first_error
        return best[1], timings


TUNER = Tuner()
