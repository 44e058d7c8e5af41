"""The weight-only GEMM template (tensor cores): y[M, N] = x[M, K] @ dequant(W)[K, N] (+ bias).

One kernel for every W-only format and every M past the GEMV's (wq_gemv.py). BITS, GROUP
and FMT are constexprs:

* FMT 0 affine (fields, zero point), 1 symmetric (fields, sign-extended), 2 bipolar (planes
  recombined to the odd integer 2q - (2**BITS - 1)), 3 bcq (planes with a scale each).
* A K tile is BLOCK_K // CODES whole packed words; each word yields CODES positions of the
  dot, its PER codes and, for widths whose PER is not a power of two (3, 5, 6, 7 bits), a few
  padding positions that meet zero activations. So every width loads only packed words.
* Per-group deferred dequantization when a K tile lies inside one group: the tile's dot runs
  on the raw integers u (exact in fp16/bf16) and scale/offset are applied once per group and
  column: acc += s * (x . u - offset * sum(x)). bcq does one dot per plane with the plane's
  scale. Otherwise each weight is dequantized before the dot.
* Split-K (SPLIT_K > 1, small M): programs along grid axis 2 each take a K range; the last
  one of a tile adds the partial sums (unpack.store_tile).
* DOT is the dtype of the dot's operands: the activation dtype, or float32 ("ieee") for
  float32 activations and for bf16 under the interpreter, whose bf16 dot is wrong.
"""
import triton
import triton.language as tl

from .unpack import F32_MAGIC, biased_code, exact_in, magic_f32, plane_code, static_offset, store_tile

FMT_CODES = {"affine": 0, "symmetric": 1, "bipolar": 2, "bcq": 3}


@triton.jit
def wq_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr,
    M, N, K, M_BUCKET,
    sxm, sxk, swp, swk, swn, ssp, ssg, ssn, sym, syn,
    BITS: tl.constexpr, GROUP: tl.constexpr, FMT: tl.constexpr, HAS_BIAS: tl.constexpr,
    CODES: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    PER: tl.constexpr = 32 if FMT >= 2 else 32 // BITS
    BLOCK_KW: tl.constexpr = BLOCK_K // CODES
    DEFER: tl.constexpr = GROUP % (BLOCK_KW * PER) == 0
    MAX_U: tl.constexpr = 2 if FMT == 3 else ((2 << BITS) if FMT == 2 else (1 << BITS))
    KW = tl.cdiv(K, PER)
    kw_len = tl.cdiv(tl.cdiv(KW, BLOCK_KW), SPLIT_K) * BLOCK_KW
    kw_start = pid_k * kw_len
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, CODES)
    rc = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kw0 in range(kw_start, tl.minimum(KW, kw_start + kw_len), BLOCK_KW):
        rw = kw0 + tl.arange(0, BLOCK_KW)
        rk = (kw0 + rc // CODES) * PER + rc % CODES  # the K index of each dot position
        kvalid = (rc % CODES < PER) & (rk < K)
        x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk,
                    mask=(rm[:, None] < M) & kvalid[None, :], other=0.0).to(DOT)
        if DEFER:
            soff = (kw0 * PER // GROUP) * ssg + rn * ssn  # one scale row per tile
            smask = rn < N
            xsum = tl.sum(x.to(tl.float32), 1)[:, None]
        else:
            soff = (rk // GROUP)[:, None] * ssg + rn[None, :] * ssn
            smask = kvalid[:, None] & (rn[None, :] < N)
        if FMT == 3:  # bcq: a dot (or a dequantized term) per plane, each with its scale
            deq = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
            for p in tl.static_range(BITS):
                u = tl.reshape(plane_code(w_ptr, p, rw, rj, rn, KW, N, swp, swk, swn), (BLOCK_K, BLOCK_N))
                scale = tl.load(s_ptr + soff + p * ssp, mask=smask, other=0.0).to(tl.float32)
                if DEFER:
                    acc += (tl.dot(x, exact_in(u, DOT, MAX_U), input_precision=PRECISION) - xsum) * scale[None, :]
                else:
                    deq += (magic_f32(u) - (F32_MAGIC + 1)) * scale
            if not DEFER:
                acc = tl.dot(x, deq.to(DOT), acc, input_precision=PRECISION)
        else:
            u = tl.reshape(biased_code(w_ptr, rw, rj, rn, KW, N, swp, swk, swn, BITS, FMT, PER),
                           (BLOCK_K, BLOCK_N))
            scale = tl.load(s_ptr + soff, mask=smask, other=0.0).to(tl.float32)
            if FMT == 0:
                offset = tl.load(z_ptr + soff, mask=smask, other=0.0).to(tl.float32)
            else:
                offset = static_offset(BITS, FMT)
            if DEFER:
                part = tl.dot(x, exact_in(u, DOT, MAX_U), input_precision=PRECISION)
                acc += (part - xsum * offset) * scale[None, :]
            else:
                w = ((magic_f32(u) - F32_MAGIC) - offset) * scale  # 2**23 + a fractional zero would round
                acc = tl.dot(x, w.to(DOT), acc, input_precision=PRECISION)
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    store_tile(acc, y_ptr, ws_ptr, lock_ptr, rm, rn, M, N, sym, syn, pid_k,
               pid_m * tl.num_programs(1) + pid_n, SPLIT_K)
