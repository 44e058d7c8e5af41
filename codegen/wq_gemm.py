"""The weight-only GEMM template: y[M, N] = x[M, K] @ dequant(W)[K, N] (+ bias).

One kernel for every W-only format. BITS, GROUP and FMT are constexprs:

* FMT 0 affine (fields, zero point), 1 symmetric (fields, sign-extended), 2 bipolar (planes
  recombined to the odd integer 2q - (2**BITS - 1)), 3 bcq (planes with a scale each).
* Per-group deferred dequantization when a K tile lies inside one group (GROUP % BLOCK_K == 0):
  the tile's dot runs on the raw integers (exact in fp16/bf16 up to 8 bits) and scale/zero are
  applied once per group and column: acc += s * (x . q - z * sum(x)). bcq does one dot per
  plane with the plane's scale. Otherwise each weight is dequantized before the dot.
* Split-K (SPLIT_K > 1, small M): programs along grid axis 2 each take a K range and add
  into a zeroed float32 y, so a GEMV keeps every SM streaming weights.
* DOT is the dtype of the dot's operands: the activation dtype, or float32 ("ieee") for
  float32 activations and for bf16 under the interpreter, whose bf16 dot is wrong.
* Weights are read in the formats' K-major layout, coalesced along N; each value costs one
  shift and one mask (see _codes).
"""
import triton
import triton.language as tl

FMT_CODES = {"affine": 0, "symmetric": 1, "bipolar": 2, "bcq": 3}


@triton.jit
def _codes(w_ptr, k0, rk, rn, K, N, swk, swn, BITS: tl.constexpr, BLOCK_K: tl.constexpr,
           BLOCK_N: tl.constexpr):
    """Unsigned BITS-wide codes [BLOCK_K, BLOCK_N] from fields (BITS=1 reads one plane).

    When whole words fit the tile, each word is loaded once and split by broadcasting shifts;
    widths whose words hold a count of codes that is not a power of two (3, 5, 6, 7) gather
    the word of each code instead."""
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    if BLOCK_K % PER == 0:
        rw = k0 // PER + tl.arange(0, BLOCK_K // PER)
        words = tl.load(w_ptr + rw[:, None] * swk + rn[None, :] * swn,
                        mask=(rw[:, None] < tl.cdiv(K, PER)) & (rn[None, :] < N), other=0)
        codes = (words[:, None, :] >> (tl.arange(0, PER) * BITS)[None, :, None]) & MASK
        return tl.reshape(codes, (BLOCK_K, BLOCK_N))
    else:
        words = tl.load(w_ptr + (rk // PER)[:, None] * swk + rn[None, :] * swn,
                        mask=(rk[:, None] < K) & (rn[None, :] < N), other=0)
        return (words >> ((rk % PER) * BITS)[:, None]) & MASK


@triton.jit
def wq_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    M, N, K, M_BUCKET,
    sxm, sxk, swp, swk, swn, ssp, ssg, ssn, sym, syn,
    BITS: tl.constexpr, GROUP: tl.constexpr, FMT: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)  # split-K: each program sums one K range, atomically into fp32 y
    k_len = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = pid_k * k_len
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    DEFER: tl.constexpr = GROUP % BLOCK_K == 0
    PLANES: tl.constexpr = FMT >= 2
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, tl.minimum(K, k_start + k_len), BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk,
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0).to(DOT)
        wmask = (rk[:, None] < K) & (rn[None, :] < N)
        if DEFER:
            soff = (k0 // GROUP) * ssg + rn * ssn  # one scale row per tile
            smask = rn < N
        else:
            soff = (rk // GROUP)[:, None] * ssg + rn[None, :] * ssn
            smask = wmask
        if FMT == 3:  # bcq: a dot (or a dequantized term) per plane, each with its scale
            deq = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
            for p in tl.static_range(BITS):
                sign = (_codes(w_ptr + p * swp, k0, rk, rn, K, N, swk, swn, 1, BLOCK_K, BLOCK_N) * 2 - 1).to(tl.float32).to(DOT)
                scale = tl.load(s_ptr + soff + p * ssp, mask=smask, other=0.0).to(tl.float32)
                if DEFER:
                    acc += tl.dot(x, sign, input_precision=PRECISION) * scale[None, :]
                else:
                    deq += sign.to(tl.float32) * scale
            if not DEFER:
                acc = tl.dot(x, deq.to(DOT), acc, input_precision=PRECISION)
        else:
            if PLANES:  # bipolar: recombine the planes into q, value = 2q - (2**BITS - 1)
                q = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.int32)
                for p in tl.static_range(BITS):
                    q += _codes(w_ptr + p * swp, k0, rk, rn, K, N, swk, swn, 1, BLOCK_K, BLOCK_N) << p
                q = 2 * q - ((1 << BITS) - 1)
            else:
                q = _codes(w_ptr, k0, rk, rn, K, N, swk, swn, BITS, BLOCK_K, BLOCK_N)
                if FMT == 1:  # two's complement sign extension
                    q = (q ^ (1 << (BITS - 1))) - (1 << (BITS - 1))
            scale = tl.load(s_ptr + soff, mask=smask, other=0.0).to(tl.float32)
            if FMT == 0:
                zero = tl.load(z_ptr + soff, mask=smask, other=0.0).to(tl.float32)
            if DEFER:
                part = tl.dot(x, q.to(tl.float32).to(DOT), input_precision=PRECISION)
                if FMT == 0:
                    part -= tl.sum(x.to(tl.float32), 1)[:, None] * zero[None, :]
                acc += part * scale[None, :]
            else:
                w = q.to(tl.float32)
                if FMT == 0:
                    w -= zero
                acc = tl.dot(x, (w * scale).to(DOT), acc, input_precision=PRECISION)
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + rm[:, None] * sym + rn[None, :] * syn
    ymask = (rm[:, None] < M) & (rn[None, :] < N)
    if SPLIT_K == 1:
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=ymask)
    else:
        tl.atomic_add(y, acc, mask=ymask)
