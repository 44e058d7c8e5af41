"""Kernel choice and tile configurations for the W-only kernels.

M decides which kernels are candidates: up to GEMV_MAX_M rows the CUDA-core GEMV
(wq_gemv.py); up to MULTIROW_MAX_M both the tensor-core GEMM (wq_gemm.py) and the GEMV with
all rows in one program, which tuning chooses between; then the GEMM; from DEQUANT_MIN_M on
the weight is dequantized for torch.mm (wq_dequant.py). GEMM configurations are filtered by a shared-memory
model, a sympy expression of the bytes one launch asks for: each pipeline stage holds an
activation tile, the packed weight tile and the scale (and zero) rows; the dequantized
weight tile is staged once more as the dot's operand, and its int32 codes once for the
layout change after unpacking. Configurations over the device's ``max_shared_mem`` are
pruned before Triton compiles or times them.
"""
import itertools
from dataclasses import dataclass

import sympy
import triton

from qcompile.runtime.device import interpreting, max_shared_mem

GEMV_MAX_M = 2
MULTIROW_MAX_M = 16  # up to here the GEMV with BLOCK_M = M's bucket competes with the GEMM
DEQUANT_MIN_M = 256  # from here on: dequantize the weight, then torch.mm (wq_dequant.py)
DEQUANT_TILE = {"BLOCK_N": 128, "BLOCK_KW": 4}  # BLOCK_KW in words of 32 codes' worth of K
SPLIT_M_BUCKET = 64  # GEMM M buckets up to this one may split K
MAX_SPLIT_K = {"gemv": 64, "gemm": 8}  # the partial-sum workspace holds this many [M, N] slices

BM, BN, BK, STAGES = sympy.symbols("BLOCK_M BLOCK_N BLOCK_K STAGES", positive=True, integer=True)
X_BYTES, W_BYTES, S_BYTES, S_ROWS = sympy.symbols("x_bytes w_bytes s_bytes s_rows", positive=True)

CODE_BYTES = 4  # unpacked int32 codes, converted to the dot's layout through shared memory
SMEM_BYTES = (STAGES * (BM * BK * X_BYTES + BK * BN * W_BYTES + S_ROWS * BN * S_BYTES)
              + BK * BN * (X_BYTES + CODE_BYTES))
_smem = sympy.lambdify((BM, BN, BK, STAGES, X_BYTES, W_BYTES, S_BYTES, S_ROWS), SMEM_BYTES)
SMEM_SCALED = STAGES * (BM * BK + BK * BN)  # scaled_gemm: one 8-bit tile of each operand per stage
_smem_scaled = sympy.lambdify((BM, BN, BK, STAGES), SMEM_SCALED)


def codes_per_word(bits: int, planes: bool) -> int:
    """PER: the codes one int32 word holds (bit planes: one per bit; fields: 32 // bits)."""
    return 32 if planes else 32 // bits


def codes_per_word_padded(bits: int, planes: bool) -> int:
    """CODES: K positions a kernel takes from one word (its codes, rounded up to a power of two)."""
    return 32 if planes else triton.next_power_of_2(32 // bits)


def weight_bytes(bits: int, planes: bool) -> float:
    """Packed bytes the GEMM loads per K position of its tile."""
    return bits * 4 / 32 if planes else 4 / codes_per_word_padded(bits, planes)


def scale_rows(fmt: int, bits: int) -> int:
    """Rows of per-group tensors read per K tile: scale+zero (affine), one per plane (bcq)."""
    return {0: 2, 3: bits}.get(fmt, 1)


def smem_bytes(cfg: dict, num_stages: int, x_bytes: int, bits: int, fmt: int, s_bytes: int) -> int:
    return int(_smem(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], num_stages, x_bytes,
                     weight_bytes(bits, fmt >= 2), s_bytes, scale_rows(fmt, bits)))


def m_bucket(m: int) -> int:
    """Autotune key for M: next power of two, capped (one tuning per bucket, not per M)."""
    return min(triton.next_power_of_2(max(m, 1)), 4096)


def kernels_for(m: int) -> tuple:
    """The kernels M may run, the best guess (what runs untuned) first."""
    if m <= GEMV_MAX_M:
        return ("gemv",)
    if m <= MULTIROW_MAX_M:
        return ("gemm", "gemv")  # tuning times both (the GEMM measured 0.64-0.91x of cuBLAS at M=16)
    return ("gemm",) if m < DEQUANT_MIN_M else ("dequant",)


@dataclass(frozen=True, eq=False)
class Choice:
    """A kernel and its launch configuration: what tuning picks per key."""
    kernel: str
    config: triton.Config

    def to_json(self) -> dict:
        c = self.config
        return {"kernel": self.kernel, "kwargs": dict(c.kwargs), "num_warps": c.num_warps, "num_stages": c.num_stages}

    def __str__(self):
        c = self.config
        return " ".join([self.kernel, *(f"{k}={v}" for k, v in c.kwargs.items()), f"warps={c.num_warps}",
                         f"stages={c.num_stages}"])


def _gemm_grid():
    """Candidates per M range; the tile in M never exceeds the bucket by more than needed."""
    out = []
    for bm, bns, bks, splits, stages, warps in (
        (16, (64, 128), (128, 256), (1, 4, 8), (4,), (4,)),
        (32, (64, 128), (64, 128), (1, 4, 8), (3, 4), (4,)),
        (64, (64, 128, 256), (64, 128), (1, 4), (3, 4), (4, 8)),
        (128, (128, 256), (64, 128), (1,), (3, 4), (8,)),
        (256, (128,), (64,), (1,), (3,), (8,)),
    ):
        for bn, bk, split, s, w in itertools.product(bns, bks, splits, stages, warps):
            out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split},
                                     num_stages=s, num_warps=w))
    return out


GEMV_BEST_GUESS = {"BLOCK_M": 1, "BLOCK_N": 64, "BLOCK_KW": 8, "SPLIT_K": 16}  # the H100 sweep's most frequent winner


def _gemv_grid():
    """One row per program: narrow tiles (up to 16 words, 2 warps), where the H100 sweep (W4,
    M=1) found its winners, with 8-32 K splits (pipelining stages change nothing for this
    loop); wide tiles (32-64 words, 4 warps; tuning took them on some shapes, e.g. 4096x4096),
    each program loading its whole K range at once, one memory round trip instead of several.
    Several rows per program (BLOCK_M 2-16, narrow tiles; the 4-row GEMV won at M=4 on every
    H100 shape): the tile is dequantized once for all rows."""
    cfg = lambda bm, bn, kw, split, warps: triton.Config(  # noqa: E731
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_KW": kw, "SPLIT_K": split}, num_warps=warps, num_stages=1)
    product = itertools.product
    return ([cfg(1, bn, kw, split, 2) for bn, kw, split in product((64, 128), (2, 4, 8, 16), (8, 16, 32))]
            + [cfg(1, bn, kw, split, 4) for bn, kw, split in product((64, 128), (32, 64), (8, 16, 32, 64))
               if bn * kw <= 4096]
            + [cfg(bm, 64, kw, split, w) for bm, kw, split, w in product((2, 4, 8, 16), (2, 4, 8), (8, 16, 32), (2, 4))
               if bm * kw * 64 <= 64 * 32 * w])  # at most 64 accumulators a thread (two tensors of them)


SMALLEST = {"scaled": triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_stages=1, num_warps=4),
            "gemm": triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 1}, num_stages=1, num_warps=4),
            "gemv": triton.Config({"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_KW": 2, "SPLIT_K": 1}, num_stages=1, num_warps=4)}


# Under the interpreter every config costs a slow run: one small one, and a second with a
# wider N tile so that tuning and its cache have a choice to make there too.
INTERPRETED = {kernel: [cfg, triton.Config({**cfg.kwargs, "BLOCK_N": 64}, num_stages=1, num_warps=4)]
               for kernel, cfg in SMALLEST.items()}


def candidates(m: int, args: dict) -> list:
    """The Choices worth timing for a launch with M rows, best guess first, the kernels'
    lists interleaved so that a tuning budget cut still tries each kernel. ``args``: x, s (the
    scale tensor), M_BUCKET, K, and the BITS, GROUP, FMT, CODES constexprs."""
    lists = []
    for kernel in kernels_for(m):
        if interpreting():
            configs = INTERPRETED[kernel]
        else:
            configs = prune_gemm(_gemm_grid(), args) if kernel == "gemm" else prune_gemv(_gemv_grid(), args)
        lists.append([Choice(kernel, c) for c in configs])
    return [c for group in itertools.zip_longest(*lists) for c in group if c is not None]


def m_tiles(mb: int) -> tuple:
    """The M tiles worth timing for M's bucket: the bucket itself (16 at least), or 64-256
    from 128 rows on."""
    target = min(max(16, mb), 128)
    return {128: (64, 128, 256)}.get(target, (target,))


def _scaled_grid():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_stages=s, num_warps=w)
            for bm, bn, bk, s, w in itertools.product((16, 32, 64, 128), (64, 128, 256), (64, 128), (3, 4), (4, 8))
            if not (bm <= 32 and w == 8)]


def scaled_candidates(m: int, device) -> list:
    """scaled_gemm configs for M rows: the M tile fits M's bucket (64 or 128 from 128 rows on),
    the stages fit shared memory."""
    if interpreting():
        return [Choice("scaled", c) for c in INTERPRETED["scaled"]]
    limit, wanted = max_shared_mem(device.index or 0), m_tiles(m_bucket(m))
    return [Choice("scaled", c) for c in _scaled_grid() if c.kwargs["BLOCK_M"] in wanted
            and _smem_scaled(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages) <= limit]


def prune_gemm(configs, args):
    """Drop configs over shared memory, out of the M bucket, or (when some tile fits a group)
    tiles that would lose deferred dequantization."""
    x, mb = args["x"], args["M_BUCKET"]
    bits, fmt, group, codes = args["BITS"], args["FMT"], args["GROUP"], args["CODES"]
    per = codes_per_word(bits, fmt >= 2)
    limit = max_shared_mem(x.device.index or 0)
    configs = [c for c in configs if c.kwargs["BLOCK_K"] >= codes]
    sizes = [smem_bytes(c.kwargs, c.num_stages, x.element_size(), bits, fmt, args["s"].element_size())
             for c in configs]
    fits = [c for c, size in zip(configs, sizes) if size <= limit] or [configs[sizes.index(min(sizes))]]
    fits = [c for c in fits if c.kwargs["BLOCK_M"] in m_tiles(mb)] or fits
    fits = [c for c in fits if group % (c.kwargs["BLOCK_K"] // codes * per) == 0] or fits
    if mb > SPLIT_M_BUCKET:
        fits = [c for c in fits if c.kwargs["SPLIT_K"] == 1] or fits
    return fits


def prune_gemv(configs, args):
    """One row per program for M = 1 (and 2), all rows of M's bucket per program from 2 on.
    Narrow tiles: those inside one group when some are (the scale once per tile), the two
    widest of them. Wide tiles: only when each word lies in one group (deferred per word) and
    a program gets one or two tiles of K. Every program gets at least one tile. Best guess first."""
    bits, fmt, group, k, mb = args["BITS"], args["FMT"], args["GROUP"], args["K"], args["M_BUCKET"]
    per = codes_per_word(bits, fmt >= 2)
    span = lambda c: c.kwargs["SPLIT_K"] * c.kwargs["BLOCK_KW"] * per  # noqa: E731  K covered by one tile per program
    configs = [c for c in configs if c.kwargs["BLOCK_M"] in {1: (1,), 2: (1, 2)}.get(mb, (mb,))]
    narrow = [c for c in configs if c.kwargs["BLOCK_KW"] <= 16]
    narrow = [c for c in narrow if group % (c.kwargs["BLOCK_KW"] * per) == 0] or narrow
    widths = sorted({c.kwargs["BLOCK_KW"] for c in narrow})[-2:]
    narrow = [c for c in narrow if c.kwargs["BLOCK_KW"] in widths and span(c) <= k] or narrow[:1]
    wide = [c for c in configs if c.kwargs["BLOCK_KW"] > 16 and group % per == 0 and span(c) <= k < 2 * span(c)]
    narrow.sort(key=lambda c: c.kwargs != GEMV_BEST_GUESS)
    return narrow[:1] + wide + narrow[1:]  # the unmeasured wide tiles before the tuning budget runs out
