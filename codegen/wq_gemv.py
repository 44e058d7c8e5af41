"""The weight-only GEMV template (CUDA cores) for decode-sized M: y[m] = x[m] @ dequant(W).

At M = 1 a tensor-core tile wastes its rows and routes the dequantized weights through
shared memory to reach the MMA layout; here each program dequantizes a packed tile
[BLOCK_KW words, BLOCK_N] in registers once, multiplies it with BLOCK_M rows of x and keeps
per-word partial sums, reducing across threads once at the end. Grid axis 0 takes the rows
BLOCK_M at a time (with BLOCK_M < M, neighbours read the same weight tile, from L2); axis 2
splits K so that every SM has weight bytes in flight, the last program of a tile adding the
partial sums (unpack.store_tile).

Same constexprs and layout as wq_gemm.py. The inner loop is what bounds the kernel (Nsight
Compute on the H100: ALU-bound, not memory-bound, with a shift, a mask, a conversion, a
subtraction and a multiply per code), so each code costs one logic op, one add and one FMA:

* codes are unrolled one at a time (a static loop over the word's fields), every tensor in
  the words' own layout: no code axis for Triton to spread over threads and shuffle;
* a code is masked where it lies and OR-ed into the mantissa of 2**23 (``unpack.F32_MAGIC``),
  which is ``2**23 + u * 2**E`` exactly, E its bit position; fields above the mantissa take
  one shift per word. The factor 2**-E goes into x (per activation, not per weight);
* the zero point is deferred: per word, sum x*(u - z) = sum x*u - z * sum x, so fractional
  zero points stay exact; the group scale is applied once per word.

The same loop reads bit planes (bipolar, bcq): a plane's code is its bit, weighted 2**(p+1)
(bipolar) or by the plane's scale (bcq); bipolar's 2, 4 or 8 planes are first regrouped into
packed codes. A word spanning two groups splits x into each group's part; only where a group is
shorter than a word (GROUP < its codes) is each code scaled on its own: correct, slower.
"""
import triton
import triton.language as tl

from .unpack import F32_MAGIC, static_offset, store_tile

MANTISSA = tl.constexpr(23)


@triton.jit
def _mantissa_words(words, SHIFT: tl.constexpr, CB: tl.constexpr, PER: tl.constexpr, FLIP: tl.constexpr):
    """The words shifted right by SHIFT, cut to the 23 mantissa bits and OR-ed into 2**23
    (once per word; each field is then one AND away from its float). FLIP xors the top bit of
    every CB-bit field (symmetric codes)."""
    src = words >> SHIFT
    if FLIP:
        src = src ^ (((((1 << (PER * CB)) - 1) // ((1 << CB) - 1)) << (CB - 1)) >> SHIFT & 0x7FFFFF)
    return (src & 0x7FFFFF) | 0x4B000000


@triton.jit
def _field(mwords, E: tl.constexpr, CB: tl.constexpr):
    """The CB-bit field at bit E of mantissa words, as float32 u * 2**E exactly."""
    bits = mwords & ((((1 << CB) - 1) << E) - 8388608)  # the field and the exponent bits (-2**23 = 0xFF800000)
    return bits.to(tl.float32, bitcast=True) - F32_MAGIC


@triton.jit
def _gathered_planes(w_ptr, R: tl.constexpr, offs, wmask, swp, BITS: tl.constexpr):
    """Bipolar's BITS one-bit planes regrouped into packed BITS-bit codes: field i of the result
    is the code of position R + BITS * i (bit q from plane q), so the loop below reads it like an
    affine word, at a few logic ops per code instead of the per-plane cost times BITS."""
    SPREAD: tl.constexpr = 0x55555555 if BITS == 2 else (0x11111111 if BITS == 4 else 0x01010101)
    words = tl.zeros(offs.shape, dtype=tl.int32)
    for q in tl.static_range(BITS):
        plane = tl.load(w_ptr + q * swp + offs, mask=wmask, other=0)
        words |= ((plane >> R) & SPREAD) << q
    return words


@triton.jit
def _group_term(t, xsum, grp, s_ptr, z_ptr, rn, N, K, ssg, ssn, GROUP: tl.constexpr, FMT: tl.constexpr,
                BITS: tl.constexpr):
    """(sum x*u - offset * sum x) * scale for words (or their parts) in groups ``grp``: the
    deferred dequantization, with the format's offset (affine: the zero point)."""
    soff = grp[:, None] * ssg + rn[None, :] * ssn  # [1 or BLOCK_KW, BLOCK_N]
    smask = (grp[:, None] * GROUP < K) & (rn[None, :] < N)
    scale = tl.load(s_ptr + soff, mask=smask, other=0.0).to(tl.float32)[None, :, :]
    if FMT == 0:
        offset = tl.load(z_ptr + soff, mask=smask, other=0.0).to(tl.float32)[None, :, :]
    else:  # symmetric: half the range; bipolar: 2**bits - 1; bcq (one plane): 1
        offset = static_offset(BITS, FMT)
    return (t - offset * xsum) * scale


@triton.jit
def wq_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr,
    M, N, K, M_BUCKET,
    sxm, sxk, swp, swk, swn, ssp, ssg, ssn, sym, syn,
    BITS: tl.constexpr, GROUP: tl.constexpr, FMT: tl.constexpr, HAS_BIAS: tl.constexpr,
    CODES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
    SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    PLANES: tl.constexpr = BITS if FMT >= 2 else 1
    CB: tl.constexpr = 1 if FMT >= 2 else BITS  # bits per field of a word
    PER: tl.constexpr = 32 // CB
    DEFER: tl.constexpr = GROUP >= PER  # a word lies in one group, or spans two: scales once per word
    SPAN2: tl.constexpr = DEFER and GROUP % PER != 0  # ... two: x split into each group's part
    TILE_IN_GROUP: tl.constexpr = GROUP % (BLOCK_KW * PER) == 0  # the whole tile in one group
    GATHER: tl.constexpr = FMT == 2 and DEFER and (BITS == 2 or BITS == 4 or BITS == 8)  # planes regrouped
    FCB: tl.constexpr = BITS if GATHER else CB  # bits per field of the words the loop reads
    FPER: tl.constexpr = 32 // FCB
    KW = tl.cdiv(K, PER)
    kw_len = tl.cdiv(tl.cdiv(KW, BLOCK_KW), SPLIT_K) * BLOCK_KW
    kw_start = pid_k * kw_len
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_KW, BLOCK_N), dtype=tl.float32)
    for kw0 in range(kw_start, tl.minimum(KW, kw_start + kw_len), BLOCK_KW):
        rw = kw0 + tl.arange(0, BLOCK_KW)
        wmask = (rw[None, :, None] < KW) & (rn[None, None, :] < N)  # 3D [1, BLOCK_KW, BLOCK_N]: the layout acc takes
        if TILE_IN_GROUP:
            grp = kw0 * PER // GROUP + tl.zeros((1,), dtype=tl.int32)
        else:
            grp = rw * PER // GROUP  # the group of each word's first code
        xsum = tl.zeros((BLOCK_M, BLOCK_KW, 1), dtype=tl.float32)  # sum of x over each word (its first group's part)
        t = tl.zeros((BLOCK_M, BLOCK_KW, BLOCK_N), dtype=tl.float32)  # sum of x * u, per word
        xsum2 = tl.zeros((BLOCK_M, BLOCK_KW, 1), dtype=tl.float32)  # SPAN2: the second group's parts
        t2 = tl.zeros((BLOCK_M, BLOCK_KW, BLOCK_N), dtype=tl.float32)
        for p in tl.static_range(PLANES):  # GATHER: pass p reads positions p, p + BITS, p + 2 * BITS, ...
            offs = rw[None, :, None] * swk + rn[None, None, :] * swn
            if GATHER:
                words = _gathered_planes(w_ptr, p, offs, wmask, swp, BITS)
            else:
                words = tl.load(w_ptr + p * swp + offs, mask=wmask, other=0)
            low = _mantissa_words(words, 0, FCB, FPER, FMT == 1)
            high = _mantissa_words(words, 9, FCB, FPER, FMT == 1)  # fields ending above bit 23, moved 32 - 23 down
            # u = code << WEIGHT: bipolar's value 2 * code - (2**BITS - 1), plane by plane or gathered
            WEIGHT = 0 if FMT < 2 else (1 if GATHER or FMT == 3 else p + 1)
            ONCE = p == 0 or FMT == 3 or GATHER  # this pass adds each x to the offset's sum once
            for i in tl.static_range(FPER):
                j = p + BITS * i if GATHER else i  # the code's position in the word's 32 (or PER)
                POS = i * FCB
                E = POS if POS + FCB <= MANTISSA else POS - 9
                f = _field(low if POS + FCB <= MANTISSA else high, E, FCB)
                rk = rw * PER + j
                kmask = (rw < KW) if EVEN_K else (rk < K)  # EVEN_K: one test per word, not per code
                x = tl.load(x_ptr + rm[:, None, None] * sxm + rk[None, :, None] * sxk,
                            mask=(rm[:, None, None] < M) & kmask[None, :, None], other=0.0).to(tl.float32)
                if DEFER:
                    if SPAN2:  # per word and code, not per weight: which group the code is in
                        x2 = tl.where((rk >= (grp + 1) * GROUP)[None, :, None], x, 0.0)
                        x -= x2
                        if ONCE:
                            xsum2 += x2
                        t2 += (x2 * ((1 << WEIGHT) / (1 << E))) * f
                    if ONCE:
                        xsum += x
                    t += (x * ((1 << WEIGHT) / (1 << E))) * f  # exact: powers of two
                else:  # several groups in a word (GROUP < codes per word): each code's own scale
                    soff_j = (rk // GROUP)[:, None] * ssg + rn[None, :] * ssn
                    smask_j = (rk[:, None] < K) & (rn[None, :] < N)
                    plane_scale = s_ptr + p * ssp if FMT == 3 else s_ptr  # bcq: a scale per plane
                    scale = tl.load(plane_scale + soff_j, mask=smask_j, other=0.0).to(tl.float32)
                    if FMT == 0:
                        offset = tl.load(z_ptr + soff_j, mask=smask_j, other=0.0).to(tl.float32)
                    else:
                        offset = static_offset(BITS, FMT)
                    if p > 0 and FMT == 2:
                        offset = 0.0  # bipolar: the planes share one offset
                    acc += x * ((f * (1 << WEIGHT) / (1 << E) - offset) * scale[None, :, :])
            if DEFER and (FMT == 3 or p == PLANES - 1):  # bcq: each plane's scale; others: once
                plane_scale = s_ptr + p * ssp if FMT == 3 else s_ptr
                acc += _group_term(t, xsum, grp, plane_scale, z_ptr, rn, N, K, ssg, ssn, GROUP, FMT, BITS)
                if SPAN2:
                    acc += _group_term(t2, xsum2, grp + 1, plane_scale, z_ptr, rn, N, K, ssg, ssn, GROUP, FMT, BITS)
                t = tl.zeros((BLOCK_M, BLOCK_KW, BLOCK_N), dtype=tl.float32)
                t2 = tl.zeros((BLOCK_M, BLOCK_KW, BLOCK_N), dtype=tl.float32)
                xsum = tl.zeros((BLOCK_M, BLOCK_KW, 1), dtype=tl.float32)
                xsum2 = tl.zeros((BLOCK_M, BLOCK_KW, 1), dtype=tl.float32)
    out = tl.sum(acc, 1)
    if HAS_BIAS:
        if pid_k == 0:
            out += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    store_tile(out, y_ptr, ws_ptr, lock_ptr, rm, rn, M, N, sym, syn, pid_k,
               pid_m * tl.num_programs(1) + pid_n, SPLIT_K)
