"""Launch configurations of the KV attention kernel (codegen/kv_attention.py) and the
shared-memory model that prunes them, as codegen/tiling.py does for the linear kernels.

A configuration is a tile of BLOCK_T cached tokens, warps, pipeline stages and WAVES, the
programs per SM that the split of a decode step's cache aims at (a runtime argument: it
changes the split, not the compiled kernel), and for some REGS, a cap on the registers of a
thread (passed as ``maxnreg`` at launch).

Shared memory, a sympy expression: the query tile; STAGES - 1 buffers in flight of the K and V
code tiles, their scales and zeros and (with a mask) the mask tile; a dequantized tile and the
probabilities staged as the dots' operands; or, when larger, the float32 accumulator converted
for the output's store (a 64-row prefill block's 32 KB). Against Triton 3.6's kernels for
sm_90 (decode and prefill, with and without a mask, 32-128 tokens, 1-8 warps, 1 and 3 stages;
-kv-smem-model.json) it never under-counts, and over-counts at most 2x but for a masked
prefill, whose loads Triton does not pipeline (up to 3.4x). The model before counted every
stage and both dequantized tiles: up to 5.3x over, and 9-22% under for prefill blocks of 32
tokens.
"""
import itertools

import sympy
import triton

from qcompile.runtime.device import interpreting, max_shared_mem

from .tiling import Choice

BT, STAGES, ROWS, D, G = sympy.symbols("BLOCK_T STAGES ROWS D G", positive=True, integer=True)
CODE_BYTES, S_BYTES, DOT_BYTES, MASK_BYTES = sympy.symbols("code_bytes s_bytes dot_bytes mask_bytes", positive=True)
_IN_FLIGHT = (STAGES - 1) * BT * (2 * D * CODE_BYTES + 4 * G * S_BYTES + ROWS * MASK_BYTES)
_OPERANDS = (ROWS * D + BT * (D + ROWS)) * DOT_BYTES  # q, a dequantized tile, p
SMEM_BYTES = sympy.Max(ROWS * D * 4, _IN_FLIGHT + _OPERANDS)  # or the accumulator, for the store
_smem = sympy.lambdify((BT, STAGES, ROWS, D, G, CODE_BYTES, S_BYTES, DOT_BYTES, MASK_BYTES), SMEM_BYTES)

# Under the interpreter every config costs a slow run: two small ones, so that tuning and its
# cache have a choice to make there too. A GPU gets no 16-token tiles: with 4 warps, fp16 and
# 4-bit codes they gave wrong results on the H100 (Triton 3.6; max error 1.5, fine with 8
# warps, in fp32 and with 32-token tiles).
INTERPRETED = [triton.Config({"BLOCK_T": 16, "WAVES": 2}, num_warps=4, num_stages=1),
               triton.Config({"BLOCK_T": 32, "WAVES": 1}, num_warps=4, num_stages=1)]
SMALLEST = triton.Config({"BLOCK_T": 32, "WAVES": 1}, num_warps=4, num_stages=1)
# Per code width, (BLOCK_T, WAVES, warps, stages, REGS) of the tiles that won on the H200 (16k
# context A/Bs, bench/results/2026-11-30-h200-attention-ab-cache.json and -attention-warps.json,
# and the tuned tables -attention.json and -attention-2.json): the first candidates, so that a
# tuning budget cut still times them. One list for both widths put 4-bit's winners sixth and
# later, and a cold Triton cache (each new tile compiled inside the budget) cut 4-bit at 16k,
# batch 8 to a tile 1.27x slower (200.3 against 158.1 us, -attention-b8.json). REGS caps the
# registers a thread (ptxas .maxnreg; None: no cap): at 128, 4 programs of 4 warps fit an SM
# instead of 3, at the cost of a few spills (4-bit at batch 8: 161.6 against 175.8 us,
# -attention-ab-regs.json). Programs of one warp (decoding only) share no tile between warps,
# so no barrier holds a warp back for another (8-bit at batch 8 and 32: 107.7 against 119.5
# us, 343.2 against 388.6; 4-bit at batch 8 with 8 programs per SM: 153.3 against 161.0).
WINNERS = {8: ((64, 4, 1, 3, None), (128, 1, 8, 3, None), (64, 2, 1, 3, None), (64, 2, 4, 3, None),
               (128, 2, 4, 1, None), (64, 4, 4, 3, None)),
           4: ((128, 4, 4, 1, 128), (64, 8, 1, 1, None), (128, 2, 8, 1, None), (64, 4, 4, 1, 96),
               (128, 4, 4, 1, None), (128, 1, 8, 3, None), (128, 4, 8, 1, None))}
# codegen/kv_int4_attention.py: one warp over 64 tokens, STAGES - 1 tiles in flight (10 KB of
# shared memory a stage); its 218-236 registers (Triton 3.9, 3.6) fit 8 programs an SM. On the
# H200 at 16k, 8 programs of 2 stages won: 54.4 us at batch 8 against 60.4 for 4 of 3 stages and
# 66.2 for 8 of 3; 10 programs (registers capped at 200) 70.4 (-attention-ab-int4.json)
INT4_KERNEL = "kv_int4_decode"
INT4_TILES = [triton.Config({"BLOCK_T": 64, "WAVES": w}, num_warps=1, num_stages=st)
              for w, st in ((8, 2), (4, 3), (4, 2))]
# codegen/kv_int4_attention.py's kv_int4_rows_kernel (up to 16 query rows, 4-bit codes in groups
# of 32 to 128; 8-bit ones below) takes INT4_TILES too: one warp over 64 tokens, 178-254
# registers (Triton 3.6, offline), 8 programs an SM of 2 stages fastest at batch 8 and 32 on the
# H200 (-attention-ab-rows-32.json, -attention-ab-rows-64.json)
INT4_ROWS_KERNEL = "kv_int4_rows"
# its 8-bit codes (whole heads): 255 registers and 34 KB of shared memory a program at 2 stages,
# 6 programs an SM at most; on the H200 4 an SM of 2 or 3 stages fastest, 6 close at batch 8 and
# 1.03-1.25x slower at batch 1, 8 (two waves) far behind (-attention-ab-int8-rows.json)
INT8_ROWS_TILES = [triton.Config({"BLOCK_T": 64, "WAVES": w}, num_warps=1, num_stages=st)
                   for w, st in ((4, 2), (4, 3), (6, 2))]
MAX_SPLITS = 256
# a prefill's other way: the cache dequantized into the queries' dtype (kv_dequant_kernel, tiles
# of BLOCK_T tokens) and torch's SDPA, flash where only causality masks it. The first candidate
# of a prefill: its dots are flash's, where the Triton kernel's prefill tiles ran 0.37-0.49x of
# flash from 1k to 16k tokens; those stay candidates, for short prefills that a full dequantized
# copy of the cache would slow down.
DEQUANT_SDPA = "kv_dequant_sdpa"
DEQUANT_TILE = triton.Config({"BLOCK_T": 64}, num_warps=4, num_stages=1)  # no loop to pipeline
ONE_WARP = list(itertools.product((64, 32), (1, 2, 4, 8), (1,), (1, 3)))  # decoding: at most 64 tokens a warp


def smem_bytes(cfg: triton.Config, rows: int, d: int, groups: int, bits: int, s_bytes: int, dot_bytes: int,
               mask: bool) -> int:
    return int(_smem(cfg.kwargs["BLOCK_T"], cfg.num_stages, rows, d, groups, bits / 8, s_bytes, dot_bytes,
                     2 if mask else 0))


def _grid(decode: bool, bits: int, rows: int):
    """The winners for this width first, then every other tile (128, 64 and 32 tokens, 4 or 8
    warps, 1 or 3 stages; for decoding, one warp over 64 or 32 tokens too) and, for decoding,
    1, 2 or 4 programs per SM (8 too for one warp). A prefill has one split, so WAVES does not
    matter there. Programs of one warp only decode blocks of up to 16 query rows: the
    accumulator of more would not fit one warp's registers."""
    waves = (1, 2, 4) if decode else (1,)
    one_warp = decode and rows <= 16
    tiles = [(bt, w if decode else 1, nw, s, regs) for bt, w, nw, s, regs in WINNERS.get(bits, ())
             if one_warp or nw > 1]
    tiles += [(*t, None) for t in itertools.product((128, 64, 32), waves, (4, 8), (1, 3))]
    tiles += [(*t, None) for t in ONE_WARP] if one_warp else []
    return [triton.Config({"BLOCK_T": bt, "WAVES": w} | ({"REGS": regs} if regs else {}), num_warps=nw, num_stages=s)
            for bt, w, nw, s, regs in dict.fromkeys(tiles)]


def candidates(decode: bool, rows: int, d: int, groups: int, bits: int, s_bytes: int, dot_bytes: int,
               mask: bool, device, int4: bool = False, int4_rows: bool = False) -> list:
    """The Choices worth timing, those over the device's shared memory pruned; with ``int4``
    (kv_int4_attention.unsupported_reason found nothing against it) the Gluon kernel's first,
    with ``int4_rows`` (rows_unsupported_reason) its rows kernel's (INT8_ROWS_TILES for 8-bit
    codes), and for a prefill DEQUANT_SDPA first. With both, the rows kernel's come first: the
    op offers both only past 4 query rows a KV head, where the rows kernel runs 1.3-1.7x
    faster, and a tuning budget that cold compiles cut times the first candidates alone (GQA 8
    at 16k, batch 8: the decode kernel's 87.6 us taken on the H200, the rows kernel's about 50:
    -attention-gqa8-3.json)."""
    own = [Choice(kernel, c) for kernel, ok in ((INT4_ROWS_KERNEL, int4_rows), (INT4_KERNEL, int4)) if ok
           for c in (INT8_ROWS_TILES if bits == 8 else INT4_TILES)]
    own += [] if decode else [Choice(DEQUANT_SDPA, DEQUANT_TILE)]
    if interpreting():
        return own + [Choice("kv_attention", c) for c in INTERPRETED]
    limit = max_shared_mem(device.index or 0)
    fits = [c for c in _grid(decode, bits, rows)
            if smem_bytes(c, rows, d, groups, bits, s_bytes, dot_bytes, mask) <= limit]
    return own + [Choice("kv_attention", c) for c in fits or [SMALLEST]]


def splits(programs: int, length: int, block_t: int, waves: int, sms: int) -> int:
    """As many programs as fit ``waves`` per SM, not one more, each with at least one tile of
    the cache. Rounding up put one program more on some SMs than on the others, and a decode
    step waits for those: on the H200 at 16k context, batch 8, 9 splits of 64 programs (5 on
    some SMs) took 1.13x as long as 8 (4 on each); scratch sweep in -kv-splits.json. At most
    MAX_SPLITS, so that the tuner's WAVES choose at batch 1 too: there the Gluon int4 kernel ran
    128k in 54.7 us with 132 splits (8 programs an SM) against 57.7 with 66, and 16k in 17.5
    against 15.1 (-attention-ab-b1.json); with a cap of 64 both took 64. Then no split is left
    empty: each takes a whole number of tiles, and 66 splits of 4 tiles covered 16k in 64, which
    the merge read in two blocks of splits instead of one."""
    tiles = triton.cdiv(length, block_t)
    wanted = max(1, min(waves * sms // programs, tiles, MAX_SPLITS))
    return triton.cdiv(tiles, triton.cdiv(tiles, wanted))
