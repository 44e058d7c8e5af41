"""The weight-only GEMV template (CUDA cores) for decode-sized M: y[m] = x[m] @ dequant(W).

At M = 1 a tensor-core tile wastes its rows and routes the dequantized weights through
shared memory to reach the MMA layout; here each program dequantizes a packed tile
[BLOCK_KW words, BLOCK_N] in registers once, multiplies it with BLOCK_M rows of x and keeps
per-word partial sums, reducing across threads once at the end. Grid axis 0 takes the rows
BLOCK_M at a time (with BLOCK_M < M, neighbours read the same weight tile, from L2); axis 2
splits K so that every SM has weight bytes in flight, the last program of a tile adding the
partial sums (unpack.store_tile).

Same constexprs and layout as wq_gemm.py; the float value of each weight is formed with the
mantissa trick (unpack.magic_f32). Deferred dequantization whenever a word lies inside one
group (every width whose codes per word divide the group): the word's dot product is taken on
the integer codes and its group's scale applied once per word (once per tile when the whole
tile lies in one group), so wide tiles that span groups keep it too.
"""
import triton
import triton.language as tl

from .unpack import F32_MAGIC, biased_code, magic_f32, plane_code, static_offset, store_tile


@triton.jit
def wq_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr,
    M, N, K, M_BUCKET,
    sxm, sxk, swp, swk, swn, ssp, ssg, ssn, sym, syn,
    BITS: tl.constexpr, GROUP: tl.constexpr, FMT: tl.constexpr, HAS_BIAS: tl.constexpr,
    CODES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    PER: tl.constexpr = 32 if FMT >= 2 else 32 // BITS
    DEFER: tl.constexpr = GROUP % PER == 0  # every word inside one group: scale once per word
    TILE_IN_GROUP: tl.constexpr = GROUP % (BLOCK_KW * PER) == 0  # ... or once per tile
    KW = tl.cdiv(K, PER)
    kw_len = tl.cdiv(tl.cdiv(KW, BLOCK_KW), SPLIT_K) * BLOCK_KW
    kw_start = pid_k * kw_len
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, CODES)
    acc = tl.zeros((BLOCK_M, BLOCK_KW, BLOCK_N), dtype=tl.float32)
    for kw0 in range(kw_start, tl.minimum(KW, kw_start + kw_len), BLOCK_KW):
        rw = kw0 + tl.arange(0, BLOCK_KW)
        rk = rw[:, None] * PER + rj[None, :]  # [BLOCK_KW, CODES]
        kvalid = (rj[None, :] < PER) & (rk < K)
        x = tl.load(x_ptr + rm[:, None, None] * sxm + rk[None, :, :] * sxk,
                    mask=(rm[:, None, None] < M) & kvalid[None, :, :], other=0.0)
        x = x.to(tl.float32)[:, :, :, None]  # [BLOCK_M, BLOCK_KW, CODES, 1]
        if DEFER:
            if TILE_IN_GROUP:
                grp = kw0 * PER // GROUP + tl.zeros((1,), dtype=tl.int32)
            else:
                grp = rw * PER // GROUP
            soff = grp[:, None] * ssg + rn[None, :] * ssn  # [1 or BLOCK_KW, BLOCK_N]
            smask = (grp[:, None] * GROUP < K) & (rn[None, :] < N)
        else:
            soff = (rk // GROUP)[:, :, None] * ssg + rn[None, None, :] * ssn
            smask = kvalid[:, :, None] & (rn[None, None, :] < N)
        if FMT == 3:  # bcq: each plane's signs, weighted by the plane's scale
            for p in tl.static_range(BITS):
                t = x * (magic_f32(plane_code(w_ptr, p, rw, rj, rn, KW, N, swp, swk, swn)) - (F32_MAGIC + 1))[None]
                scale = tl.load(s_ptr + soff + p * ssp, mask=smask, other=0.0).to(tl.float32)[None]
                if DEFER:
                    acc += tl.sum(t, 2) * scale
                else:
                    acc += tl.sum(t * scale, 2)
        else:
            u = biased_code(w_ptr, rw, rj, rn, KW, N, swp, swk, swn, BITS, FMT, PER)
            scale = tl.load(s_ptr + soff, mask=smask, other=0.0).to(tl.float32)[None]
            if FMT == 0:
                offset = tl.load(z_ptr + soff, mask=smask, other=0.0).to(tl.float32)
                if DEFER:
                    offset = offset[:, None, :]
            else:
                offset = static_offset(BITS, FMT)
            t = x * (magic_f32(u) - (F32_MAGIC + offset))[None]
            if DEFER:
                acc += tl.sum(t, 2) * scale
            else:
                acc += tl.sum(t * scale, 2)
    out = tl.sum(acc, 1)
    if HAS_BIAS:
        if pid_k == 0:
            out += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    store_tile(out, y_ptr, ws_ptr, lock_ptr, rm, rn, M, N, sym, syn, pid_k,
               pid_m * tl.num_programs(1) + pid_n, SPLIT_K)
