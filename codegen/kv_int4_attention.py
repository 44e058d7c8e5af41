"""Decode attention over a 4-bit KV cache in groups of 32 channels, head_dim 128, fp16 or bf16
queries (bf16 ones scaled into fp16's range per row, FP16_RANGE), in Gluon
(triton.experimental.gluon), whose layouts are stated, not inferred (issue 5); and, in the rows
kernel below, 4-bit caches in groups of 32 to 128 and 8-bit ones in whole heads.

Why a second kernel next to codegen/kv_attention.py: Triton's unpack of nibbles (a join and
reshape that doubles the elements) sends every fp16 tile through shared memory and then
rearranges registers, about 2800 instructions for 64 tokens; that held the 4-bit path at 21-32%
of the memory roofline on the H200 (README, fifth run). Here about 1470 (bench.sass):

- A tile is 64 tokens for one warp. Its codes, scales and zeros are copied into shared memory
  with cp.async, STAGES - 1 tiles ahead of the one computed; one barrier a tile orders both the
  copies' writes before the reads and a stage's reads before its next copy.
- K's bytes stay as the cache stores them ([T, 64] a head, byte j holding channels 2j and
  2j + 1). Lane % 4 = i reads bytes 16 i .. 16 i + 15 of a token (one LDS.128), and the
  nibbles of each register become fp16 operands in place (``_nibbles``: 4 LOP3 and a shift
  for 8 codes, as Marlin does; high nibbles come as 1024 + 16 code, so their q is divided by
  16). Their places in the dot's K dimension are chosen so that each result register already
  is a B operand register (``_k_channel``); q is loaded in that channel order.
- V's: a lane reads its 8 contiguous bytes of a token; one PRMT pairs tokens 2j and 2j + 1 in a
  register (p @ V's B operand pairs tokens), the zero comes off each code in the operand
  (an HADD2 or HFMA2 for two: exact in fp16), and the output's columns come in the order of
  ``_v_channel``.
- The scales and K's zeros go on the dots' results, not on the codes. A program takes 4 query
  rows, and the tensor cores compute 16: row 8 j + 4 b + r holds query r's channels
  of group 2 b + j and zeros elsewhere (a group is one lane of four in the dot's K dimension,
  so no row-wise trick on the output could separate them). Per group, (dot - 1024 sum(q's
  operand) - zero sum(q)) scale, summed over the 4 groups, is q . k. For p @ V the same rows
  hold p scale_g / top_g (top_g: the largest scale of group g so far, keeping the fp16 operand
  in [0, 1]); output column n takes the row of its own group at the end.
- The conversions between the dots' result layout and these views are reshapes and permutes
  that ``convert_layout(..., assert_trivial=True)`` proves free at compile time.
- A step with more query rows a KV head (GQA 8, or several new tokens) takes ROW_BLOCKS
  programs of 4 rows each over the same tokens: the second reads the tiles the first brought
  into L2.

A second kernel here, kv_int4_rows_kernel, takes what that one takes badly or not at all: GQA 8
and 16 (up to 16 query rows a KV head in one program, where the decode kernel's ROW_BLOCKS
programs each unpack the tiles again: 1.3-1.7x faster at batch 8 and 32), groups of 64 and
whole-head groups (128: int4's memory 3.76x smaller than fp16 against 3.2x in groups of 32). Its
dots' 16 rows are the query rows. With groups of 32 or 64, K and V are dequantized in the
operands, rounded once as the reference rounds. With one group a token, K's zero and scale go on
the scores, and V's scale on p, as above; only V's zero comes off in the operand. That is 1244
instructions a tile (Triton 3.6). Scales of one group a token are copied by token pairs, so one
past an odd length may come along: the split's last tile, taken apart from the loop, zeroes it.
At 4 rows in groups of 32 the decode kernel stays faster (6-11%), so the op offers the rows
kernel only past 4 rows or for groups it alone takes (runtime/kv_ops.py). With at most 8 rows
in whole heads, dot rows 8-15's softmax is dead code (HALF: 1130 instructions a tile).

The rows kernel's 8-bit codes (BITS = 8, whole heads, V in the cache's token-contiguous blocks
of 64 tokens): each byte becomes 1024 + code by PRMT (two for four codes, ``_halves``). A
tile's tokens reach the dots in the order ``_token``, chosen so that a lane's 16 tokens of one
V channel are 16 contiguous bytes (one LDS.128) and pair up in the B operand's registers as
they are; K's rows are read in the same token order, and K's scales and zeros and V's scales
are copied into shared memory in it (V's zeros, taken off the codes, stay in the cache's
order). K's channels go in ``_k8_channel``'s order, a lane's 32 contiguous bytes of a token.
On the H200 it ran batch 1 at 16k in 14.7 µs against the Triton kernel's 17.2 (README, tenth
run), 1.55-1.86x of fp16 SDPA at every batch from 16k. In whole heads the rows kernel takes
bf16 queries too, at 4 and 8 bits (FP16_RANGE, as the decode kernel; the scales go on the dots
in float32): int8 in bf16 at 16k, batch 8, 73.9 µs against the Triton kernel's 85.2 (README,
eleventh run).

Both kernels copy their split's first tiles before they load q (``_prologue``), and put the
output's columns back in the channels' order in registers before they store it or the partials,
16 bytes a lane (``_store``): stored in the dots' column order, each 4-byte store landed 16
channels from the next, 29% of the rows kernel's global sectors at batch 1. On the H200 that
made the rows kernel 1.10-1.32x faster at batch 1 (whole heads) and 1.02-1.09x at batch 8 and
32 (README, ninth run).

Grid (B, Hkv ROW_BLOCKS, splits), the split and the partials of kv_attention_kernel, merged by
kv_combine_kernel (launched as a programmatic dependent, PDL). The kernels are launched as
programmatic dependents of the kernel before them too and wait for it before their first read
(1.00-1.04x at batch 1). The batch's offsets are int64 (program id 0), those within a sequence
int32 (kv_ops.span_unsupported_reason sends longer sequences to the reference). Measured on the
H200 (README, sixth and seventh runs): 1.7-2.7x the Triton kernel's speed at >= 16k context; the Marlin-style
unpack 1.03x a PRMT one. Tried and not kept: each tile's loads waited for in registers (its
first version, 1.35x slower at 16k, batch 8), lazy rescaling (0.97x), 3 stages or 10 programs
an SM (0.8-0.9x: -attention-ab-int4.json, -attention-ab-stages.json), the merge done by the
last of a head's programs (0.66x at batch 1: -attention-ab-merge.json), tiles of 32 tokens
(fewer registers, 12 programs an SM, 9-13% more instructions a token: 0.91-0.98x,
-attention-ab-t32.json).
"""
import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2


D, T = gl.constexpr(128), gl.constexpr(64)  # head_dim, tokens a tile
GROUP, R = gl.constexpr(32), gl.constexpr(4)  # channels a scale group; query rows (16 dot rows / 4 groups)
# query rows a KV head: the decode kernel's 4 programs of R, the rows kernel's 16 dot rows (partials 16 rows apart)
MAX_ROWS = 16
LOG2E = gl.constexpr(1.4426950408889634)
# Triton 3.6's names, renamed since
_barrier = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier
_async_load = async_copy.async_load if hasattr(async_copy, "async_load") else async_copy.async_copy_global_to_shared
MMA = gl.constexpr(gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8]))
A = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2))
B = gl.constexpr(gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2))
# K's bytes [4 (i), 16 (m), T]: byte 16 i + m of a token; a lane's 16 bytes in its registers
K_BYTES = gl.constexpr(gl.DistributedLinearLayout(
    reg_bases=[[0, 1, 0], [0, 2, 0], [0, 4, 0], [0, 8, 0], [0, 0, 8], [0, 0, 16], [0, 0, 32]],
    lane_bases=[[1, 0, 0], [2, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 4]], warp_bases=[], block_bases=[],
    shape=[4, 16, 64]))
# V's bytes [8 (g), 8 (r), T]: byte 8 g + r of a token, a lane's 8 bytes of a token in its
# registers, then the same with tokens 2j and 2j + 1 in one register
_V_LANES = [[0, 0, 2], [0, 0, 4], [1, 0, 0], [2, 0, 0], [4, 0, 0]]
V_LOAD = gl.constexpr(gl.DistributedLinearLayout(
    reg_bases=[[0, 1, 0], [0, 2, 0], [0, 4, 0], [0, 0, 1], [0, 0, 8], [0, 0, 16], [0, 0, 32]], lane_bases=_V_LANES,
    warp_bases=[], block_bases=[], shape=[8, 8, 64]))
V_PAIRS = gl.constexpr(gl.DistributedLinearLayout(
    reg_bases=[[0, 1, 0], [0, 0, 1], [0, 2, 0], [0, 4, 0], [0, 0, 8], [0, 0, 16], [0, 0, 32]], lane_bases=_V_LANES,
    warp_bases=[], block_bases=[], shape=[8, 8, 64]))
# q @ K^T's result [16, T] seen as [T, 4 (group), 4 (query row)]: row 8 j + 4 b + r is group 2 b + j
GROUPS = gl.constexpr(gl.DistributedLinearLayout(
    reg_bases=[[1, 0, 0], [0, 1, 0], [8, 0, 0], [16, 0, 0], [32, 0, 0]],
    lane_bases=[[2, 0, 0], [4, 0, 0], [0, 0, 1], [0, 0, 2], [0, 2, 0]], warp_bases=[], block_bases=[],
    shape=[64, 4, 4]))
TG = gl.constexpr(gl.SliceLayout(2, GROUPS))  # [T, group]: scales and zeros
# the same with a token's two groups in adjacent registers: one 4-byte load
TG_LOAD = gl.constexpr(gl.DistributedLinearLayout(
    reg_bases=[[0, 1], [1, 0], [8, 0], [16, 0], [32, 0]], lane_bases=[[2, 0], [4, 0], [0, 0], [0, 0], [0, 2]],
    warp_bases=[], block_bases=[], shape=[64, 4]))
TR = gl.constexpr(gl.SliceLayout(1, GROUPS))  # [T, row]: scores, p
GR = gl.constexpr(gl.SliceLayout(0, GROUPS))  # [group, row]: the dot rows' sums
ROW = gl.constexpr(gl.SliceLayout(0, TR))  # [row]: softmax state
# cp.async of a tile: 16 bytes a lane and copy, coalesced
COPY_K = gl.constexpr(gl.BlockedLayout([1, 1, 16], [8, 4, 1], [1, 1, 1], [2, 1, 0]))  # [T, 4, 16] bytes
COPY_V = gl.constexpr(gl.BlockedLayout([1, 16], [8, 4], [1, 1], [1, 0]))  # [T, 64] bytes
SHARED = gl.constexpr(gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))  # a stage's; the buffer adds the stage dim
SHARED_V = gl.constexpr(gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
SHARED_S = gl.constexpr(gl.SwizzledSharedLayout(1, 1, 1, [0]))
QL = gl.constexpr(gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8], warps_per_cta=[1, 1],
                                   order=[1, 0]))
# 8-bit codes (the rows kernel, one group a token). A tile's tokens reach the dots in the order
# t = t0 + 2 t1 + ... of the mma operands, memory token _token(t) = t0 + 2 t3 + 4 t4 + 8 t5 + 16 t1
# + 32 t2, so that a lane's 16 tokens of V's channel (t0, t3, t4, t5: its registers) are 16
# contiguous bytes of the cache's token-contiguous blocks, one LDS.128. K's bytes [128 (c),
# T (memory token)]: lane % 4 reads channels 32 (lane % 4) .. + 31 of a token (two LDS.128), its
# registers c0..c4 becoming the B operand's k bits 0, 3, 4, 5, 6 (_k8_operand).
K8_BYTES = gl.constexpr(gl.DistributedLinearLayout(
    reg_bases=[[1, 0], [2, 0], [4, 0], [8, 0], [16, 0], [0, 2], [0, 4], [0, 8]],
    lane_bases=[[32, 0], [64, 0], [0, 1], [0, 16], [0, 32]], warp_bases=[], block_bases=[], shape=[128, 64]))
# V's bytes [128 (c), T (memory token)]: a lane's 16 tokens of a channel, channel n8 tiles in registers
V8_BYTES = gl.constexpr(gl.DistributedLinearLayout(
    reg_bases=[[0, 1], [0, 2], [0, 4], [0, 8], [8, 0], [16, 0], [32, 0], [64, 0]],
    lane_bases=[[0, 16], [0, 32], [1, 0], [2, 0], [4, 0]], warp_bases=[], block_bases=[], shape=[128, 64]))
COPY_K8 = gl.constexpr(gl.BlockedLayout([1, 16], [4, 8], [1, 1], [1, 0]))  # [T, 128] bytes, a row 128
COPY_V8 = gl.constexpr(gl.BlockedLayout([1, 16], [8, 4], [1, 1], [1, 0]))  # [128, T] bytes, a row 64


@gluon.jit
def _k_channel(k):
    """The head channel at position k of q @ K^T's K dimension: k = m1 + 2 i + 8 m0 + 16 m2 +
    32 m3 + 64 h for nibble h of byte 16 i + m (m's bits m3..m0; _nibbles swaps m0 and m1)."""
    m = ((k >> 3) & 1) + (k & 1) * 2 + ((k >> 4) & 1) * 4 + ((k >> 5) & 1) * 8
    return 2 * (16 * ((k >> 1) & 3) + m) + (k >> 6)


@gluon.jit
def _v_channel(n):
    """The head channel at column n of p @ V: n = g + 8 h + 16 r for nibble h of byte 8 g + r."""
    return 2 * (8 * (n % 8) + n // 16) + (n // 8) % 2


# a program's output or partials as stored: 4 channels a lane (one 16-byte store), a row a warp
STORE = gl.constexpr(gl.BlockedLayout([1, 4], [1, 32], [1, 1], [1, 0]))


@gluon.jit
def _store(x, m, l, b, hkv, heads, split, splits, first, o_ptr, acc_ptr, stat_ptr, sob, soh, sos, sod,
           REP: gl.constexpr, S: gl.constexpr, ROWS: gl.constexpr, BITS: gl.constexpr = 4):
    """Query rows first, first + 1, ... of a program (x [rows, D], its columns in _v_channel's
    order for 4-bit V, the channels' own for 8-bit; m, l [rows]): the output when the program
    took the whole cache, else the partials for kv_combine_kernel, ROWS apart. 4-bit columns
    go back to the channels' order in registers first: stored in theirs, each 4-byte store fell
    16 channels from the next (on the H200 the rows kernel's 2 KB of partials a program came to
    544 excess sectors, 29% of its global traffic at batch 1)."""
    n: gl.constexpr = x.shape[0]
    # rows past REP S zeroed where they are, so that what only they need is dead code (their
    # sums of p: 17 FADD a tile in the rows kernel) and not carried through the conversion
    m = gl.where(first + gl.arange(0, n, layout=m.type.layout) < REP * S, m, 0.0)
    l = gl.where(first + gl.arange(0, n, layout=l.type.layout) < REP * S, l, 1.0)
    x = gl.where((first + gl.arange(0, n, layout=gl.SliceLayout(1, x.type.layout)) < REP * S)[:, None], x, 0.0)
    if BITS == 4:
        x = gl.permute(gl.reshape(x, (n, 8, 2, 8)), (0, 3, 1, 2))  # column 16 r + 8 h + g -> channel 16 g + 2 r + h
    x = gl.convert_layout(gl.reshape(x, (n, D)), STORE)
    r = first + gl.arange(0, n, layout=gl.SliceLayout(1, STORE))
    ch = gl.arange(0, D, layout=gl.SliceLayout(0, STORE))
    ok = r < REP * S
    l = gl.convert_layout(l, gl.SliceLayout(1, STORE))
    if splits == 1:  # the whole cache in this program: the output directly
        optr = o_ptr + b * sob + (hkv * REP + r // S)[:, None] * soh + (r % S)[:, None] * sos + ch[None, :] * sod
        gl.store(optr, (x / l[:, None]).to(o_ptr.dtype.element_ty), mask=ok[:, None])
    else:
        part = ((b * heads + hkv) * splits + split) * ROWS + r
        gl.store(acc_ptr + part[:, None] * D + ch[None, :], x, mask=ok[:, None])
        gl.store(stat_ptr + part * 2, gl.convert_layout(m, gl.SliceLayout(1, STORE)), mask=ok)
        gl.store(stat_ptr + part * 2 + 1, l, mask=ok)


@gluon.jit
def _dot_group(rho):
    """The scale group of dot row rho = 8 j + 4 b + r: 2 b + j."""
    return 2 * ((rho >> 2) & 1) + (rho >> 3)


@gluon.jit
def _log2(x):
    """log2(x), one MUFU.LG2 (x normal and positive)."""
    return gl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=gl.float32, is_pure=True,
                                     pack=1)


@gluon.jit
def _exp2(x):
    """2^x flushing subnormal results to 0, one MUFU.EX2 (kv_attention's _exp2)."""
    return gl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=gl.float32, is_pure=True,
                                     pack=1)


# A register's bytes x0..x3 give (x0, x2) and (x1, x3) of 1024 + low nibble and of 1024 + 16 high
# nibble in fp16: 4 LOP3 and a shift for 8 codes (as Marlin's dequantization), where shifting the
# high nibbles down and pairing bytes 0 and 1 (kv_attention's _biased_nibbles) takes 8.
NIBBLES_PAIRED = gl.constexpr("""{
        .reg .b32 t;
        lop3.b32 $0, $4, 0x000F000F, 0x64006400, 0xEA;
        lop3.b32 $2, $4, 0x00F000F0, 0x64006400, 0xEA;
        shr.b32 t, $4, 8;
        lop3.b32 $1, t, 0x000F000F, 0x64006400, 0xEA;
        lop3.b32 $3, t, 0x00F000F0, 0x64006400, 0xEA;
        }""")


@gluon.jit
def _nibbles(byte):
    """(1024 + low nibble, 1024 + 16 high nibble) of the bytes in fp16, with a register's bytes
    1 and 2 swapped: the result at byte 1's place comes from byte 2, and the reverse. Callers
    either relabel (a permute of those two bits) or read the swap into their channel order."""
    return gl.inline_asm_elementwise(NIBBLES_PAIRED, "=r,=r,=r,=r,r", [byte], dtype=(gl.float16, gl.float16),
                                     is_pure=True, pack=4)


# A register's bytes x0..x3 give (x0, x1) and (x2, x3) of 1024 + code in fp16: two PRMT for four codes
HALVES = gl.constexpr("""{
        prmt.b32 $0, $2, 0x64646464, 0x4140;
        prmt.b32 $1, $2, 0x64646464, 0x4342;
        }""")


@gluon.jit
def _halves(byte):
    """1024 + code in fp16 of each byte, in the bytes' places."""
    return gl.inline_asm_elementwise(HALVES, "=r,=r,r", [byte], dtype=gl.float16, is_pure=True, pack=4)


# Two bf16 of a register as fp16 in their places: each one's bits, moved to a float32's top half,
# are its float32, and one cvt rounds the pair (exact for the cache's zeros, small integers)
BF16X2_TO_F16X2 = gl.constexpr("""{
        .reg .b32 lo, hi;
        shl.b32 lo, $1, 16;
        and.b32 hi, $1, 0xFFFF0000;
        cvt.rn.f16x2.f32 $0, hi, lo;
        }""")


@gluon.jit
def _fp16(x):
    """x (fp16 or bf16) in fp16, a register's pair of bf16 converted in place: through float32
    one value at a time, the pairs came back packed in the other order, and each sum with the
    codes' pairs (tokens 2j, 2j + 1) went one half at a time (Triton 3.6: 1641 instructions a
    tile of the decode kernel in bf16, against 1425 in fp16)."""
    if x.dtype == gl.bfloat16:
        return gl.inline_asm_elementwise(BF16X2_TO_F16X2, "=r,r", [x], dtype=gl.float16, is_pure=True, pack=2)
    return x.to(gl.float16)


@gluon.jit
def _token(t):
    """The cache's token (within a tile) at the 8-bit path's dot position t (K8_BYTES)."""
    return (t & 1) + ((t >> 3) & 7) * 2 + ((t >> 1) & 3) * 16


@gluon.jit
def _k8_channel(k):
    """The head channel at position k of q @ K^T's K dimension with 8-bit codes (K8_BYTES)."""
    return (k & 1) + ((k >> 3) & 15) * 2 + ((k >> 1) & 3) * 32


@gluon.jit
def _copy_tile(bufs, stage, src, t0, lim, G: gl.constexpr, BITS: gl.constexpr = 4):
    """cp.async of tile t0's codes and its G scales and zeros a token (from ``src``, _sources')
    into ``stage`` of the shared buffers (tokens from ``lim`` on zero-filled, not read).
    cp.async copies 4 bytes or more: with G = 1 the scales and zeros of tokens in pairs, one
    past ``lim`` when it falls inside a pair. 8-bit codes (G = 1): K's [T, D] rows, V's block of
    T tokens [D, T] (the cache's blocks of 64 tokens, token-contiguous), and K's scales and zeros
    and V's scales in the dots' token order (_token), which the scores and p take."""
    if BITS == 8:
        _copy_tile8(bufs, stage, src, t0, lim)
    else:
        _copy_tile4(bufs, stage, src, t0, lim, G)


@gluon.jit
def _copy_tile8(bufs, stage, src, t0, lim):
    """_copy_tile's 8-bit codes (one group a token)."""
    kbuf, vbuf, ksbuf, kzbuf, vsbuf, vzbuf = bufs
    kc, vc, ks, kz, vs, vz = src
    tk = gl.arange(0, T, layout=gl.SliceLayout(1, COPY_K8))
    ck = gl.arange(0, D, layout=gl.SliceLayout(0, COPY_K8))
    _async_load(kbuf.index(stage), kc + (t0 + tk)[:, None] * D + ck[None, :], mask=(tk < lim - t0)[:, None])
    # V's whole block where the tile starts before ``lim``, past it too (a block is whole in
    # memory; its codes there meet p = 0); none for a tile the pipeline copies past the split,
    # which may lie past the cache. One mask for the tile keeps the copies 16 bytes wide.
    cv = gl.arange(0, D, layout=gl.SliceLayout(1, COPY_V8))[:, None]
    _async_load(vbuf.index(stage), vc + t0 * D + cv * T + gl.arange(0, T, layout=gl.SliceLayout(0, COPY_V8))[None, :],
                mask=gl.zeros([D, T], gl.int32, COPY_V8) + t0 < lim)
    L3: gl.constexpr = gl.BlockedLayout([1, 1, 2], [8, 4, 1], [1, 1, 1], [2, 1, 0])  # [t5 t4 t3, t2 t1, t0]
    mem = (gl.arange(0, 8, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3)))[:, None, None] * 2
           + gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, L3)))[None, :, None] * 16
           + gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3)))[None, None, :])
    pairs = gl.cdiv(lim - t0, 2) * 2  # the tokens copied: whole pairs
    _async_load(ksbuf.index(stage).reshape((8, 4, 2)), ks + t0 + mem, mask=mem < pairs)
    _async_load(kzbuf.index(stage).reshape((8, 4, 2)), kz + t0 + mem, mask=mem < pairs)
    _async_load(vsbuf.index(stage).reshape((8, 4, 2)), vs + t0 + mem, mask=mem < pairs)
    e = gl.arange(0, T, layout=gl.BlockedLayout([2], [32], [1], [0]))
    _async_load(vzbuf.index(stage), vz + t0 + e, mask=e < pairs)


@gluon.jit
def _copy_tile4(bufs, stage, src, t0, lim, G: gl.constexpr):
    """_copy_tile's 4-bit codes, G scale groups a token."""
    kbuf, vbuf, ksbuf, kzbuf, vsbuf, vzbuf = bufs
    kc, vc, ks, kz, vs, vz = src
    tk = gl.arange(0, T, layout=gl.SliceLayout(1, gl.SliceLayout(2, COPY_K)))
    ok = (tk < lim - t0)[:, None, None]
    byte = (gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, COPY_K)))[None, :, None] * 16
            + gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, COPY_K)))[None, None, :])
    _async_load(kbuf.index(stage), kc + t0 * (D // 2) + tk[:, None, None] * (D // 2) + byte, mask=ok)
    tv = gl.arange(0, T, layout=gl.SliceLayout(1, COPY_V))
    byte = gl.arange(0, D // 2, layout=gl.SliceLayout(0, COPY_V))
    _async_load(vbuf.index(stage), vc + t0 * (D // 2) + tv[:, None] * (D // 2) + byte[None, :],
                mask=(tv < lim - t0)[:, None])
    e = gl.arange(0, T * G, layout=gl.BlockedLayout([2 * G], [32], [1], [0]))
    if G == 1:
        ok = e < gl.cdiv(lim - t0, 2) * 2
    else:
        ok = e < (lim - t0) * G
    _async_load(ksbuf.index(stage), ks + t0 * G + e, mask=ok)
    _async_load(kzbuf.index(stage), kz + t0 * G + e, mask=ok)
    _async_load(vsbuf.index(stage), vs + t0 * G + e, mask=ok)
    _async_load(vzbuf.index(stage), vz + t0 * G + e, mask=ok)


@gluon.jit
def _sources(kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, b, hkv, skb, skh, svb, svh, ssb, ssh):
    """KV head hkv of batch b's codes, scales and zeros: (K's codes, V's, K's scales, zeros, V's ...)."""
    sv = b * ssb + hkv * ssh
    return (kc_ptr + b * skb + hkv * skh, vc_ptr + b * svb + hkv * svh, ks_ptr + sv, kz_ptr + sv, vs_ptr + sv,
            vz_ptr + sv)


@gluon.jit
def _prologue(src, start, end, length, STAGES: gl.constexpr, G: gl.constexpr, BITS: gl.constexpr = 4):
    """The shared buffers of STAGES tiles (K's and V's codes, the scales and zeros, G a token)
    with the split's first STAGES - 1 tiles' copies issued, the split's tiles and ``lim``, the
    end of what they copy. Called before q's loads, so that the first tiles' latency overlaps
    theirs (at batch 1 a program's chain is a few tiles long)."""
    kc, vc, ks, kz, vs, vz = src
    if BITS == 8:  # K's [T, D] rows, V's [D, T] block
        codes = (gl.allocate_shared_memory(gl.uint8, [STAGES, T, D], SHARED_V),
                 gl.allocate_shared_memory(gl.uint8, [STAGES, D, T], SHARED_V))
    else:
        codes = (gl.allocate_shared_memory(gl.uint8, [STAGES, T, 4, 16], SHARED),
                 gl.allocate_shared_memory(gl.uint8, [STAGES, T, D // 2], SHARED_V))
    bufs = (codes[0], codes[1],
            gl.allocate_shared_memory(ks.dtype.element_ty, [STAGES, T * G], SHARED_S),
            gl.allocate_shared_memory(kz.dtype.element_ty, [STAGES, T * G], SHARED_S),
            gl.allocate_shared_memory(vs.dtype.element_ty, [STAGES, T * G], SHARED_S),
            gl.allocate_shared_memory(vz.dtype.element_ty, [STAGES, T * G], SHARED_S))
    tiles = gl.cdiv(end - start, T)
    lim = gl.minimum(length, start + tiles * T)
    for i in gl.static_range(STAGES - 1):
        _copy_tile(bufs, i, src, start + i * T, lim, G, BITS)
        async_copy.commit_group()
    return bufs, tiles, lim


@gluon.jit
def _split(b, split, splits, length, live_ptr, nlive, rvalid, last, HAS_MASK: gl.constexpr, LIVE: gl.constexpr,
           PDL: gl.constexpr):
    """The tokens [start, end) of this program's split: a whole number of tiles of what the mask
    shows (``span``), cut where no row sees further (causal: ``last``, each row's last position).
    With PDL the merge, launched dependent on this kernel, may start its programs now; and this
    kernel, launched dependent on the one before it, waits for that one's writes before it
    reads anything (its launch overlapped that kernel's end)."""
    if PDL:
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; griddepcontrol.wait; // $0", "=r", [],
                                  dtype=gl.int32, is_pure=False, pack=1)
    span = length
    if LIVE:  # the end kv_live_kernel found in the mask
        rl = gl.arange(0, LIVE, layout=gl.BlockedLayout([1], [32], [1], [0]))
        span = gl.max(gl.load(live_ptr + b * nlive + rl, mask=rl < nlive, other=0), axis=0)
    chunk = gl.cdiv(gl.cdiv(span, splits), T) * T
    start = split * chunk
    end = gl.minimum(start + chunk, span)
    if not HAS_MASK:  # causal: no row sees past its last query's position
        end = gl.minimum(end, gl.max(gl.where(rvalid, last, 0), axis=0) + 1)
    return start, end


@gluon.jit
def _k_operand(kbuf):
    """K's codes of a tile ([T, 4, 16] bytes in shared memory) as q @ K^T's B operand [D
    (_k_channel's order), T]: 1024 + code for low nibbles, 1024 + 16 code for high ones."""
    low, high = _nibbles(kbuf.permute((1, 2, 0)).load(K_BYTES))
    x = gl.reshape(gl.join(low, high), (4, 2, 2, 2, 2, T, 2))  # [i, m3, m2, m1, m0, T, h]
    x = gl.permute(x, (6, 1, 2, 3, 0, 4, 5))  # [h, m3, m2, m1, i, m0, T]
    return gl.convert_layout(gl.reshape(x, (D, T)), B, assert_trivial=True)


@gluon.jit
def _v_operand(vbuf, vzbuf):
    """V's codes less their zeros, code - zero, of a tile ([T, 64] bytes and [T * 4] zeros in
    shared memory) as p @ V's B operand [T, D (_v_channel's order)]: exact in fp16, where 1024 +
    code against a zeros' sum kept apart lost the accumulator's low bits over a split (the
    tensor cores' float32 sums truncate: 3.6e-3 against the reference at 32k, batch 8)."""
    low, high = _nibbles(gl.convert_layout(vbuf.reshape((T, 8, 8)).permute((1, 2, 0)).load(V_LOAD), V_PAIRS))
    low, high = _swapped(low), _swapped(high)  # [g, r, T] again, a register pairing tokens 2j, 2j + 1
    low, high = gl.reshape(low, (4, 2, 8, T)), gl.reshape(high, (4, 2, 8, T))  # [group, g % 2, r, T]
    zero = vzbuf.reshape((T, 4)).permute((1, 0)).load(gl.SliceLayout(1, gl.SliceLayout(1, low.type.layout)))
    zero = _fp16(zero)[:, None, :][:, None, :, :]  # [group, 1, 1, T]: r, then g % 2 restored
    x = gl.join(gl.reshape(low - (zero + 1024.0), (8, 8, T)), gl.reshape(high * 0.0625 - (zero + 64.0), (8, 8, T)))
    x = gl.permute(x, (2, 1, 3, 0))  # [T, r, h, g]
    return gl.convert_layout(gl.reshape(x, (T, D)), B, assert_trivial=True)


@gluon.jit
def _swapped(x):
    """x [8, 8, T] from _nibbles with bit 0 of its second dim and of its last (a register's
    bytes 1 and 2 in V_PAIRS) exchanged back."""
    x = gl.permute(gl.reshape(x, (8, 4, 2, T // 2, 2)), (0, 1, 4, 3, 2))
    return gl.reshape(x, (8, 8, T))


@gluon.jit
def _per_group(buf):
    """[T, group] float32 scales or zeros of a tile ([T * 4] in shared memory)."""
    return gl.convert_layout(buf.reshape((T, 4)).load(TG_LOAD).to(gl.float32), TG, assert_trivial=True)


@gluon.jit
def _into_fp16_range(big):
    """Per value of ``big`` (float32, positive) the power of two f that brings it into [2^14,
    2^15), and 1 / f."""
    e = ((big.to(gl.uint32, bitcast=True) >> 23) & 0xFF).to(gl.int32) - 127
    k = gl.minimum(gl.maximum(14 - e, -126), 126)
    return ((k + 127) << 23).to(gl.float32, bitcast=True), ((127 - k) << 23).to(gl.float32, bitcast=True)


@gluon.jit
def _fp16_range(q):
    """For q [16 dot rows, D] in float32, per dot row the power of two f that brings its query's
    largest |value| (over the 4 rows of its groups) into [2^14, 2^15), and per query row 1 / f
    (ROW): q f in fp16 cannot overflow and keeps 11 bits of every value above 2^-14 of the
    largest, more than bf16's 8 (kv_attention's _fp16_range, per query row)."""
    big = gl.max(gl.reshape(gl.max(gl.abs(q), axis=1), (2, 2, R)), axis=0)
    f, inv = _into_fp16_range(gl.max(big, axis=0))  # [R]
    L3: gl.constexpr = gl.SliceLayout(2, gl.reshape(q, (2, 2, R, D)).type.layout)  # [j, b, r]
    f = gl.convert_layout(f, gl.SliceLayout(0, gl.SliceLayout(1, L3)))[None, None, :]
    rows = gl.reshape(gl.zeros([2, 2, R], gl.float32, L3) + f, (16,))
    return gl.convert_layout(rows, gl.SliceLayout(1, QL)), gl.convert_layout(inv, ROW)


@gluon.jit
def _by_group_rows(x):
    """[16] dot rows (QL's) -> [group, row] (GR), once a program."""
    return gl.convert_layout(gl.reshape(gl.permute(gl.reshape(x, (2, 2, R)), (1, 0, 2)), (4, R)), GR)


@gluon.jit
def _by_group(x):
    """[16, T] dot rows -> [T, group, row] (GROUPS), moving no data."""
    x = gl.permute(gl.reshape(x, (2, 2, 4, T)), (3, 1, 0, 2))  # [T, b, j, r]
    return gl.convert_layout(gl.reshape(x, (T, 4, R)), GROUPS, assert_trivial=True)


@gluon.jit
def _by_row(x):
    """[T, group, row] -> [16, T] dot rows, the inverse of _by_group."""
    x = gl.permute(gl.reshape(x, (T, 2, 2, R)), (2, 1, 3, 0))  # [j, b, r, T]
    return gl.convert_layout(gl.reshape(x, (16, T)), MMA, assert_trivial=True)


@gluon.jit
def _rows(x):
    """[group, row] -> [16] dot rows (the accumulator's row factors), moving no data."""
    x = gl.reshape(gl.permute(gl.reshape(x, (2, 2, R)), (1, 0, 2)), (16,))
    return gl.convert_layout(x, gl.SliceLayout(1, MMA), assert_trivial=True)


@gluon.jit
def _tile(qa, bias, qsum, qinv, acc, m, l, top, bufs, stage, t0, length, seen, last, bias_ptr, smt, bias_mask,
          HAS_MASK: gl.constexpr, FP16_RANGE: gl.constexpr):
    """One tile of 64 tokens of the online softmax, from ``stage`` of the shared buffers: acc
    [16, D] (rows by group, units of top), m, l per query row, top per group. Tokens from
    ``seen`` on are hidden from some row: the tile that holds them takes the mask (or the
    causal bound ``last``)."""
    kbuf, vbuf, ksbuf, kzbuf, vsbuf, vzbuf = bufs
    s = mma_v2(qa, _k_operand(kbuf.index(stage)), gl.zeros([16, T], gl.float32, MMA))
    k_scale = _per_group(ksbuf.index(stage))
    k_zero = _per_group(kzbuf.index(stage))
    qk = gl.sum((_by_group(s) - bias[None, :, :] - k_zero[:, :, None] * qsum[None, :, :]) * k_scale[:, :, None],
                axis=1)
    if FP16_RANGE:
        qk = qk * qinv[None, :]
    rs = t0 + gl.arange(0, T, layout=gl.SliceLayout(1, TR))
    if HAS_MASK:
        qk += gl.load(bias_ptr + rs[:, None] * smt, mask=bias_mask & (rs < length)[:, None],
                      other=float("-inf")).to(gl.float32)
    elif t0 + T > seen:
        qk = gl.where(rs[:, None] <= last[None, :], qk, float("-inf"))
    m_new = gl.maximum(m, gl.max(qk, axis=0))
    m_safe = gl.where(m_new == float("-inf"), 0.0, m_new) * LOG2E  # rows that have seen nothing yet
    p = _exp2(qk * LOG2E - m_safe[None, :])
    alpha = _exp2(m * LOG2E - m_safe)
    l = l * alpha + gl.sum(p, axis=0)
    v_scale = _per_group(vsbuf.index(stage))
    top_new = gl.maximum(top, gl.max(v_scale, axis=0))
    pv = (gl.expand_dims(p, 1) * (v_scale * (1.0 / top_new)[None, :])[:, :, None]).to(gl.float16)
    rescale = (gl.convert_layout(alpha, gl.SliceLayout(0, GR))[None, :]
               * gl.convert_layout(top / top_new, gl.SliceLayout(1, GR))[:, None])  # [group, row]
    acc = acc * _rows(rescale)[:, None]
    acc = mma_v2(gl.convert_layout(_by_row(pv), A), _v_operand(vbuf.index(stage), vzbuf.index(stage)), acc)
    return acc, m_new, l, top_new


@gluon.jit
def kv_int4_decode_kernel(
    q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, mask_ptr, live_ptr, o_ptr, acc_ptr, stat_ptr,
    length, sm_scale, splits, nlive,
    sqb, sqh, sqs, sqd, skb, skh, svb, svh, ssb, ssh, smb, smh, sms, smt, sob, soh, sos, sod,
    REP: gl.constexpr, S: gl.constexpr, ROWS: gl.constexpr, HAS_MASK: gl.constexpr, LIVE: gl.constexpr,
    STAGES: gl.constexpr, PDL: gl.constexpr, FP16_RANGE: gl.constexpr, ROW_BLOCKS: gl.constexpr,
):
    """kv_attention_kernel's decode step for REP * S <= 4 ROW_BLOCKS rows, over codes and scales
    as ``unsupported_reason`` allows them (their token strides then constants, which the loads
    take as offsets): grid (B, Hkv ROW_BLOCKS, splits), partials for kv_combine_kernel when
    splits > 1."""
    b, split = gl.program_id(0).to(gl.int64), gl.program_id(2)  # b's offsets: int64
    hkv, first = gl.program_id(1) // ROW_BLOCKS, gl.program_id(1) % ROW_BLOCKS * R  # its query rows from first
    r = first + gl.arange(0, R, layout=ROW)
    rvalid = r < REP * S
    last = length - S + r % S  # the last position each row may see
    start, end = _split(b, split, splits, length, live_ptr, nlive, rvalid, last, HAS_MASK, LIVE, PDL)
    # STAGES - 1 tiles in flight (cp.async) while one is computed, the first ones issued before
    # q's loads; one barrier a tile (one warp) orders both the copies' writes before the reads
    # and a stage's reads before its next copy, issued after it
    src = _sources(kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, b, hkv, skb, skh, svb, svh, ssb, ssh)
    bufs, tiles, lim = _prologue(src, start, end, length, STAGES, D // GROUP)
    # q [16 dot rows, D (_k_channel's order)], row 8 j + 4 b + r holding query r's channels of group 2 b + j
    rho = gl.arange(0, 16, layout=gl.SliceLayout(1, QL))
    k = gl.arange(0, D, layout=gl.SliceLayout(0, QL))
    qr = first + rho % R
    ch = _k_channel(k)
    keep = (qr < REP * S)[:, None] & (_dot_group(rho)[:, None] == (ch // GROUP)[None, :])
    q = gl.load(q_ptr + b * sqb + (hkv * REP + qr // S)[:, None] * sqh + (qr % S)[:, None] * sqs + ch[None, :] * sqd,
                mask=keep, other=0.0)
    # high nibbles come as 1024 + 16 code: their q is divided by 16 (exact), the dot's bias
    # 1024 sum(q's operand) and the zero's sum(q) computed apart
    high = (k >= D // 2)[None, :]
    q = q.to(gl.float32) * sm_scale
    qinv = gl.full([R], 1.0, gl.float32, ROW)
    if FP16_RANGE:  # bf16 queries: each row times a power of two into fp16's range, undone on the scores
        qf, qinv = _fp16_range(q)
        q = q * qf[:, None]
    q = (q * gl.where(high, 0.0625, 1.0)).to(gl.float16)
    bias = _by_group_rows(gl.sum(q.to(gl.float32), axis=1) * 1024.0)
    qsum = _by_group_rows(gl.sum(q.to(gl.float32) * gl.where(high, 16.0, 1.0), axis=1))
    qa = gl.convert_layout(q, A)
    acc = gl.zeros([16, D], gl.float32, MMA)
    m = gl.full([R], float("-inf"), gl.float32, ROW)
    l = gl.zeros([R], gl.float32, ROW)
    top = gl.full([4], 1e-30, gl.float32, gl.SliceLayout(0, TG))
    head = hkv * REP + r // S
    bias_ptr = mask_ptr + b * smb + (head * smh + (r % S) * sms)[None, :]
    bias_mask = rvalid[None, :]
    seen = gl.min(gl.where(rvalid, last, length), axis=0) + 1  # every row sees the tokens before (causal)
    for i in range(tiles):
        async_copy.wait_group(STAGES - 2)
        _barrier()
        ahead = i + STAGES - 1
        _copy_tile(bufs, ahead % STAGES, src, start + ahead * T, lim, D // GROUP)
        async_copy.commit_group()
        acc, m, l, top = _tile(qa, bias, qsum, qinv, acc, m, l, top, bufs, i % STAGES, start + i * T, length, seen,
                               last, bias_ptr, smt, bias_mask, HAS_MASK, FP16_RANGE)
    # column n takes the row of its own group, times top: the other groups' rows dropped
    rows = gl.arange(0, 16, layout=gl.SliceLayout(1, MMA))
    n = gl.arange(0, D, layout=gl.SliceLayout(0, MMA))
    tops = _rows(gl.zeros([4, R], gl.float32, GR) + gl.convert_layout(top, gl.SliceLayout(1, GR))[:, None])
    own = _dot_group(rows)[:, None] == ((n % 8) // 2)[None, :]
    x = gl.where(own, acc * tops[:, None], 0.0)
    x = gl.sum(gl.sum(gl.reshape(x, (2, 2, R, D)), axis=0), axis=0)  # [R, D]
    _store(x, m, l, b, hkv, gl.num_programs(1) // ROW_BLOCKS, split, splits, first, o_ptr, acc_ptr, stat_ptr, sob,
           soh, sos, sod, REP, S, ROWS)


def _layout_reason(q, k, v, groups: int, bits: int = 4) -> str | None:
    """Why the cache's layout does not suit the Gluon kernels, or None: they run on sm_80 and
    later and take the cache's own contiguous rows (the loads take the token strides as
    constants), 8-bit V in the cache's blocks of T tokens, token-contiguous and each block one
    run (formats.kv.as_token_blocks), with the batch and head strides of the scales and zeros
    multiples of 16 (Triton's specialization proves the 4-byte alignment cp.async needs from
    those)."""
    (kc, ks, kz), (vc, vs, vz) = k, v
    if q.device.type != "cuda" or torch.cuda.get_device_capability(q.device) < (8, 0):
        return "the Gluon int4 kernel runs on CUDA sm_80 and later (mma.sync)"
    row = D.value * bits // 8
    if kc.dim() != 4 or kc.stride()[2:] != (row, 1):
        return f"K's codes strided {tuple(kc.stride())}: the Gluon kernels take [B, H, T, {row}] rows"
    if bits == 4 and (vc.dim() != 4 or vc.stride()[2:] != (row, 1)):
        return f"V's codes strided {tuple(vc.stride())}: the Gluon kernels take [B, H, T, {row}] rows"
    if bits == 8 and (vc.dim() != 5 or vc.shape[3] != T.value or vc.stride()[2:] != (T.value * row, 1, T.value)):
        return (f"V's codes of shape {tuple(vc.shape)} strided {tuple(vc.stride())}: the Gluon kernel takes 8-bit "
                f"ones in blocks of {T.value} tokens, token-contiguous (formats.kv.as_token_blocks)")
    for t in (ks, kz, vs, vz):
        if t.stride()[2:] != (groups, 1) or t.stride(0) % 16 or t.stride(1) % 16:
            return (f"scales or zeros strided {tuple(t.stride())}: the Gluon kernels take [B, H, T, {groups}] rows "
                    "with batch and head strides multiples of 16")
    return None


def unsupported_reason(q, k, v, bits: int) -> str | None:
    """Why kv_int4_decode_kernel cannot take this decode step (q [B, Hq, S, D], K and V as
    (codes, scale, zero) of a cache), or None. It takes 4-bit codes in groups of 32 of head_dim
    128, fp16 or bf16 queries, at most 16 query rows a KV head (4 a program), in a layout
    _layout_reason allows."""
    b, hq, s, d = q.shape
    groups = k[1].shape[-1]
    if bits != 4 or d != D.value or groups != D.value // GROUP.value:
        return (f"bits={bits}, head_dim={d}, {groups} groups: the Gluon kernel takes 4-bit codes, head_dim 128, "
                "groups of 32")
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"{q.dtype} queries: the Gluon kernel takes fp16 and bf16 (its dots fp16)"
    if hq // k[0].shape[1] * s > MAX_ROWS:
        return f"{hq // k[0].shape[1] * s} query rows a KV head: the Gluon kernel takes at most {MAX_ROWS}"
    return _layout_reason(q, k, v, groups)


@gluon.jit
def _dequantized(low, high, sbuf, zbuf, valid, G: gl.constexpr, SCALED: gl.constexpr, EDGE: gl.constexpr):
    """(code - zero) scale in fp16 of nibbles from _nibbles ([n, m, T], dim 0 running over the
    G groups in order, n / G entries each), rounded once as the reference rounds: the
    subtraction is exact (1024 + code - (1024 + zero); a high nibble's 1024 + 16 code scaled by
    1/16 first), then one HMUL2 (none unless SCALED: code - zero). sbuf, zbuf: a tile's [T * G]
    scales and zeros, of which the first ``valid`` tokens' are the cache's (with G = 1 the copy
    may bring one more into the split's last tile, the EDGE: zeroed there)."""
    n: gl.constexpr = low.shape[0]
    shape: gl.constexpr = low.shape
    low = gl.reshape(low, (G, n // G, shape[1], T))
    high = gl.reshape(high, (G, n // G, shape[1], T))
    L: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, low.type.layout))  # [G, T]
    kept = (gl.arange(0, T, layout=gl.SliceLayout(0, L)) < valid)[None, :]  # read on the EDGE tile alone
    z = zbuf.reshape((T, G)).permute((1, 0)).load(L)
    if EDGE:
        z = gl.where(kept, z, 0.0)
    z = _fp16(z)[:, None, None, :]
    low = low - (z + 1024.0)
    high = high * 0.0625 - (z + 64.0)
    if SCALED:
        s = sbuf.reshape((T, G)).permute((1, 0)).load(L)
        if EDGE:
            s = gl.where(kept, s, 0.0)
        s = s.to(gl.float16)[:, None, None, :]
        low, high = low * s, high * s
    return gl.reshape(low, shape), gl.reshape(high, shape)


@gluon.jit
def _dot_tokens(BITS: gl.constexpr):
    """The token within a tile of each column of the scores (the dot result's columns): with
    8-bit codes in _token's order."""
    t = gl.arange(0, T, layout=gl.SliceLayout(0, MMA))
    if BITS == 8:
        t = _token(t)
    return t


@gluon.jit
def _per_token(buf, valid, EDGE: gl.constexpr, BITS: gl.constexpr):
    """[T] float32 scales or zeros of a tile with one group a token ([T] in shared memory; on
    the EDGE tile, past ``valid`` tokens zero), as the dot result's columns (with 8-bit codes
    in the dots' token order: _copy_tile)."""
    x = buf.load(gl.SliceLayout(0, MMA)).to(gl.float32)
    if EDGE:
        x = gl.where(_dot_tokens(BITS) < valid, x, 0.0)
    return x


@gluon.jit
def _k8_operand(kbuf):
    """8-bit K codes of a tile ([T, D] bytes in shared memory) as q @ K^T's B operand [D
    (_k8_channel's order), T (_token's)]: 1024 + code."""
    x = _halves(kbuf.permute((1, 0)).load(K8_BYTES))  # [c, memory token]
    x = gl.permute(gl.reshape(x, (4, 16, 2, 4, 8, 2)), (1, 0, 2, 4, 3, 5))  # [k6..k3, k2 k1, k0, t5 t4 t3, t2 t1, t0]
    return gl.convert_layout(gl.reshape(x, (D, T)), B, assert_trivial=True)


@gluon.jit
def _v8_operand(vbuf, zbuf, valid, EDGE: gl.constexpr):
    """8-bit V codes less their zeros, code - zero, of a tile ([D, T] bytes, the cache's
    token-contiguous block, and [T] zeros in shared memory) as p @ V's B operand [T (_token's
    order), D]: exact in fp16. On the EDGE tile zeros past ``valid`` tokens are zeroed (a pair's
    copy may bring one from past the cache)."""
    x = _halves(vbuf.load(V8_BYTES))  # [c, memory token]
    z = zbuf.load(gl.SliceLayout(0, V8_BYTES))
    if EDGE:
        z = gl.where(gl.arange(0, T, layout=gl.SliceLayout(0, V8_BYTES)) < valid, z, 0.0)
    x = x - (_fp16(z) + 1024.0)[None, :]
    x = gl.permute(gl.reshape(x, (D, 4, 8, 2)), (2, 1, 3, 0))  # [t5 t4 t3, t2 t1, t0, c]
    return gl.convert_layout(gl.reshape(x, (T, D)), B, assert_trivial=True)


@gluon.jit
def _k_dequantized(kbuf, sbuf, zbuf, valid, G: gl.constexpr):
    """_k_operand's B operand [D, T] dequantized: lane group i of K_BYTES holds channels
    32 i .. 32 i + 31, group 32 i // GROUP."""
    low, high = _nibbles(kbuf.permute((1, 2, 0)).load(K_BYTES))
    low, high = _dequantized(low, high, sbuf, zbuf, valid, G, True, False)
    x = gl.reshape(gl.join(low, high), (4, 2, 2, 2, 2, T, 2))  # [i, m3, m2, m1, m0, T, h]
    x = gl.permute(x, (6, 1, 2, 3, 0, 4, 5))  # [h, m3, m2, m1, i, m0, T]
    return gl.convert_layout(gl.reshape(x, (D, T)), B, assert_trivial=True)


@gluon.jit
def _v_dequantized(vbuf, sbuf, zbuf, valid, G: gl.constexpr, SCALED: gl.constexpr, EDGE: gl.constexpr):
    """_v_operand's B operand [T, D] dequantized (or less its zeros alone, unless SCALED): byte
    8 g + r holds channels 16 g + 2 r and 16 g + 2 r + 1, group 16 g // GROUP."""
    low, high = _nibbles(gl.convert_layout(vbuf.reshape((T, 8, 8)).permute((1, 2, 0)).load(V_LOAD), V_PAIRS))
    low, high = _swapped(low), _swapped(high)  # [g, r, T], a register pairing tokens 2j, 2j + 1
    low, high = _dequantized(low, high, sbuf, zbuf, valid, G, SCALED, EDGE)
    x = gl.permute(gl.join(low, high), (2, 1, 3, 0))  # [T, r, h, g]
    return gl.convert_layout(gl.reshape(x, (T, D)), B, assert_trivial=True)


@gluon.jit
def _rows_tile(qa, bias, qsum, qinv, acc, m, l, top, bufs, stage, t0, lim, length, seen, last, bias_ptr, smt,
               bias_mask, used, G: gl.constexpr, HAS_MASK: gl.constexpr, EDGE: gl.constexpr, HALF: gl.constexpr,
               BITS: gl.constexpr, FP16_RANGE: gl.constexpr):
    """One tile of 64 tokens for 16 query rows, the dots' rows the queries themselves (acc [16,
    D], m, l and top per row). Groups of 32 and 64: K and V dequantized in the operands. One
    group a token (G = 1): as in kv_int4_decode_kernel, K's zero and scale go on the scores
    ((dot - bias - zero qsum) scale) and V's scale on p (p scale / top, top the largest V scale
    so far), so only V's zero is taken off in the operand: no HMUL2 on the codes. HALF (G = 1, at
    most 8 rows): the thread's registers of dot rows 8-15 take p = 0 and a rescale by 1
    (``used``), so that their accumulator stays zero and their softmax is dead code (1242 -> 1130
    instructions a tile at 4 rows, Triton 3.6; rows 4-7 of a step of 4 stay: they differ by
    lane, not by register). Groups of 32 ran 1.1-1.4x slower with it on the H200
    (-attention-ab-rows-e28.json). 8-bit codes (G = 1): _k8_operand and _v8_operand, the tokens
    in _token's order. FP16_RANGE (bf16 queries, G = 1): each query row came times a power of
    two into fp16's range, 1 / it (``qinv``) goes on its scores."""
    kbuf, vbuf, ksbuf, kzbuf, vsbuf, vzbuf = bufs
    valid = lim - t0
    if G == 1:  # the dot starts from -(bias + zero qsum): bias and qsum come negated
        k_zero = _per_token(kzbuf.index(stage), valid, EDGE, BITS)
        if BITS == 8:
            k_op = _k8_operand(kbuf.index(stage))
        else:
            k_op = _k_operand(kbuf.index(stage))
        s = mma_v2(qa, k_op, bias[:, None] + k_zero[None, :] * qsum[:, None])
        qk = s * _per_token(ksbuf.index(stage), valid, EDGE, BITS)[None, :]
        if FP16_RANGE:
            qk = qk * qinv[:, None]
    else:
        qk = mma_v2(qa, _k_dequantized(kbuf.index(stage), ksbuf.index(stage), kzbuf.index(stage), valid, G),
                    gl.zeros([16, T], gl.float32, MMA))
    rs = t0 + _dot_tokens(BITS)
    if HAS_MASK:
        qk += gl.load(bias_ptr + rs[None, :] * smt, mask=bias_mask & (rs < length)[None, :],
                      other=float("-inf")).to(gl.float32)
    elif t0 + T > seen:
        qk = gl.where(rs[None, :] <= last[:, None], qk, float("-inf"))
    m_new = gl.maximum(m, gl.max(qk, axis=1))
    m_safe = gl.where(m_new == float("-inf"), 0.0, m_new) * LOG2E  # rows that have seen nothing yet
    alpha = _exp2(m * LOG2E - m_safe)
    if G == 1:  # p / top from the exponent, so that p scale / top is one multiply
        v_scale = _per_token(vsbuf.index(stage), valid, EDGE, BITS)
        top_new = gl.maximum(top, gl.max(v_scale, axis=0))
        p = _exp2(qk * LOG2E - (m_safe + _log2(top_new))[:, None])
        l = l * alpha + gl.sum(p, axis=1) * top_new
        rescale = alpha * (top / top_new)
        if HALF:
            rescale = gl.where(used, rescale, 1.0)
        acc = acc * rescale[:, None]
        p = p * v_scale[None, :]
        if HALF:
            p = gl.where(used[:, None], p, 0.0)
        top = top_new
    else:
        p = _exp2(qk * LOG2E - m_safe[:, None])
        l = l * alpha + gl.sum(p, axis=1)
        acc = acc * alpha[:, None]
    if BITS == 8:
        v_op = _v8_operand(vbuf.index(stage), vzbuf.index(stage), valid, EDGE)
    else:
        v_op = _v_dequantized(vbuf.index(stage), vsbuf.index(stage), vzbuf.index(stage), valid, G, G > 1, EDGE)
    acc = mma_v2(gl.convert_layout(p.to(gl.float16), A), v_op, acc)
    return acc, m_new, l, top


@gluon.jit
def kv_int4_rows_kernel(
    q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, mask_ptr, live_ptr, o_ptr, acc_ptr, stat_ptr,
    length, sm_scale, splits, nlive,
    sqb, sqh, sqs, sqd, skb, skh, svb, svh, ssb, ssh, smb, smh, sms, smt, sob, soh, sos, sod,
    REP: gl.constexpr, S: gl.constexpr, ROWS: gl.constexpr, HAS_MASK: gl.constexpr, LIVE: gl.constexpr,
    STAGES: gl.constexpr, PDL: gl.constexpr, G: gl.constexpr, BITS: gl.constexpr = 4,
    FP16_RANGE: gl.constexpr = False,
):
    """kv_int4_decode_kernel for up to 16 query rows a KV head and G scale groups a token
    (GROUP = 128 / G channels), fp16, the dots' 16 rows the query rows (_rows_tile: K and V
    dequantized in the operands, or with G = 1 the scales on the dots); or 8-bit codes (BITS,
    G = 1; V in the cache's token-contiguous blocks of 64 tokens). With G = 1, bf16 queries too
    (FP16_RANGE: each row times a power of two into fp16's range, undone on its scores; the
    scales go on the dots in float32, and V's zeros, integers, are exact in fp16). Grid (B, Hkv,
    splits), partials for kv_combine_kernel when splits > 1."""
    b, hkv, split = gl.program_id(0).to(gl.int64), gl.program_id(1), gl.program_id(2)  # b's offsets: int64
    RL: gl.constexpr = gl.SliceLayout(1, MMA)  # per dot row = query row
    r = gl.arange(0, 16, layout=RL)
    rvalid = r < REP * S
    last = length - S + r % S  # the last position each row may see
    start, end = _split(b, split, splits, length, live_ptr, nlive, rvalid, last, HAS_MASK, LIVE, PDL)
    src = _sources(kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, b, hkv, skb, skh, svb, svh, ssb, ssh)
    bufs, tiles, lim = _prologue(src, start, end, length, STAGES, G, BITS)
    # q [16 query rows, D (_k_channel's or _k8_channel's order)] times the softmax scale
    qr = gl.arange(0, 16, layout=gl.SliceLayout(1, QL))
    if BITS == 8:
        ch = _k8_channel(gl.arange(0, D, layout=gl.SliceLayout(0, QL)))
    else:
        ch = _k_channel(gl.arange(0, D, layout=gl.SliceLayout(0, QL)))
    q = gl.load(q_ptr + b * sqb + (hkv * REP + qr // S)[:, None] * sqh + (qr % S)[:, None] * sqs + ch[None, :] * sqd,
                mask=(qr < REP * S)[:, None], other=0.0)
    q = q.to(gl.float32) * sm_scale
    qinv = gl.full([16], 1.0, gl.float32, RL)
    if FP16_RANGE:
        f, qinv = _into_fp16_range(gl.max(gl.abs(q), axis=1))
        q = q * f[:, None]
        qinv = gl.convert_layout(qinv, RL)
    bias, qsum = gl.zeros([16], gl.float32, RL), gl.zeros([16], gl.float32, RL)
    # G = 1: K's codes as _k_operand gives them (4-bit: high nibbles' q divided by 16; 8-bit: no
    # high half), the dot's bias 1024 sum(q's operand)
    if G == 1:
        high = (gl.arange(0, D, layout=gl.SliceLayout(0, QL)) >= (D // 2 if BITS == 4 else D))[None, :]
        q = (q * gl.where(high, 0.0625, 1.0)).to(gl.float16)
        bias = gl.convert_layout(gl.sum(q.to(gl.float32), axis=1) * -1024.0, RL)  # negated, as _rows_tile takes them
        qsum = gl.convert_layout(gl.sum(q.to(gl.float32) * gl.where(high, -16.0, -1.0), axis=1), RL)
    qa = gl.convert_layout(q.to(gl.float16), A)
    acc = gl.zeros([16, D], gl.float32, MMA)
    m = gl.full([16], float("-inf"), gl.float32, RL)
    l = gl.zeros([16], gl.float32, RL)
    top = gl.full([16], 1e-30, gl.float32, RL)  # with G = 1: the largest V scale so far (acc in its units)
    bias_ptr = mask_ptr + b * smb + ((hkv * REP + r // S) * smh + (r % S) * sms)[:, None]
    bias_mask = rvalid[:, None]
    seen = gl.min(gl.where(rvalid, last, length), axis=0) + 1  # every row sees the tokens before (causal)
    HALF: gl.constexpr = G == 1 and REP * S <= 8
    used = r < 8  # with HALF, the dot rows the step needs (_rows_tile)
    # with G = 1 the split's last tile apart, the EDGE: the only one whose scales the copy of
    # token pairs may have brought from past the cache's length
    for i in range(tiles - 1 if G == 1 else tiles):
        async_copy.wait_group(STAGES - 2)
        _barrier()
        ahead = i + STAGES - 1
        _copy_tile(bufs, ahead % STAGES, src, start + ahead * T, lim, G, BITS)
        async_copy.commit_group()
        acc, m, l, top = _rows_tile(qa, bias, qsum, qinv, acc, m, l, top, bufs, i % STAGES, start + i * T, lim,
                                    length, seen, last, bias_ptr, smt, bias_mask, used, G, HAS_MASK, False, HALF,
                                    BITS, FP16_RANGE)
    if G == 1:
        if tiles > 0:
            async_copy.wait_group(STAGES - 2)
            _barrier()
            acc, m, l, top = _rows_tile(qa, bias, qsum, qinv, acc, m, l, top, bufs, (tiles - 1) % STAGES,
                                        start + (tiles - 1) * T, lim, length, seen, last, bias_ptr, smt, bias_mask,
                                        used, G, HAS_MASK, True, HALF, BITS, FP16_RANGE)
        acc = acc * top[:, None]
    _store(acc, m, l, b, hkv, gl.num_programs(1), split, splits, 0, o_ptr, acc_ptr, stat_ptr, sob, soh, sos, sod, REP,
           S, ROWS, BITS)


def rows_unsupported_reason(q, k, v, bits: int) -> str | None:
    """Why kv_int4_rows_kernel cannot take this decode step, or None. It takes 4-bit codes in
    groups of 32, 64 or 128 of head_dim 128 (K's and V's alike) or 8-bit ones in whole heads,
    fp16 queries (bf16 too in whole heads), up to 16 query rows a KV head, in a layout
    _layout_reason allows."""
    b, hq, s, d = q.shape
    groups = k[1].shape[-1]
    if (bits, groups) not in ((4, 1), (4, 2), (4, 4), (8, 1)) or d != D.value or v[1].shape[-1] != groups:
        return (f"bits={bits}, head_dim={d}, {groups} groups: the rows kernel takes head_dim 128 in 4-bit codes in "
                "groups of 32, 64 or 128, or in 8-bit codes in groups of 128")
    if q.dtype != torch.float16 and (q.dtype != torch.bfloat16 or groups != 1):
        return (f"{q.dtype} queries in {groups} groups: the rows kernel takes fp16 queries, and bf16 ones in whole "
                "heads (in groups it dequantizes in fp16)")
    if hq // k[0].shape[1] * s > MAX_ROWS:
        return f"{hq // k[0].shape[1] * s} query rows a KV head: the rows kernel takes at most {MAX_ROWS}"
    return _layout_reason(q, k, v, groups, bits)
