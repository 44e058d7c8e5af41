"""Triton helpers shared by the W-only kernels: unpack a tile of packed words into codes,
turn codes into floats without int-to-float conversion instructions, and finish a split-K
tile in the same launch.

Every format's value is ``u - offset`` for a non-negative integer ``u`` read from the
words (see ``biased_code``), which lets one conversion trick serve all of them: OR-ing
``u`` into the mantissa of a power of two gives ``2**e + u`` exactly, in one logic op
instead of a conversion instruction (those run at an eighth of the ALU rate on Hopper).
"""
import triton
import triton.language as tl

F32_MAGIC = tl.constexpr(8388608.0)  # 2**23: the float32 whose mantissa holds u exactly


@triton.jit
def load_words(w_ptr, rw, rn, KW, N, swk, swn):
    """Words [BLOCK_KW, BLOCK_N] of rows rw (K-major layout, coalesced along N)."""
    return tl.load(w_ptr + rw[:, None] * swk + rn[None, :] * swn,
                   mask=(rw[:, None] < KW) & (rn[None, :] < N), other=0)


@triton.jit
def split_words(words, rj, BITS: tl.constexpr, PER: tl.constexpr):
    """[BLOCK_KW, CODES, BLOCK_N]: code j of each word (CODES is PER rounded up to a power of
    two; positions j >= PER repeat the last code and meet a zero activation)."""
    shift = tl.minimum(rj, PER - 1) * BITS
    return (words[:, None, :] >> shift[None, :, None]) & ((1 << BITS) - 1)


@triton.jit
def biased_code(w_ptr, rw, rj, rn, KW, N, swp, swk, swn, BITS: tl.constexpr, FMT: tl.constexpr,
                PER: tl.constexpr):
    """u >= 0 with value = u - offset: affine u = q (offset = zero), symmetric u = q ^ half
    (offset = half), bipolar u = 2q from the planes (offset = 2**BITS - 1). bcq reads its
    planes one at a time through ``plane_code``."""
    if FMT >= 2:
        u = split_words(load_words(w_ptr, rw, rn, KW, N, swk, swn), rj, 1, 32) << 1
        for p in tl.static_range(1, BITS):
            u += split_words(load_words(w_ptr + p * swp, rw, rn, KW, N, swk, swn), rj, 1, 32) << (p + 1)
    else:
        u = split_words(load_words(w_ptr, rw, rn, KW, N, swk, swn), rj, BITS, PER)
        if FMT == 1:
            u = u ^ (1 << (BITS - 1))
    return u


@triton.jit
def plane_code(w_ptr, p, rw, rj, rn, KW, N, swp, swk, swn):
    """bcq plane p as u = 2 * bit (offset 1): the sign -1 or +1."""
    return split_words(load_words(w_ptr + p * swp, rw, rn, KW, N, swk, swn), rj, 1, 32) << 1


@triton.jit
def static_offset(BITS: tl.constexpr, FMT: tl.constexpr):
    """The offset of formats without a zero-point tensor (affine's comes from memory)."""
    if FMT == 1:
        return 1 << (BITS - 1)
    elif FMT == 2:
        return (1 << BITS) - 1
    else:
        return 1


@triton.jit
def magic_f32(u):
    """2**23 + u as float32, for 0 <= u < 2**23."""
    return (u | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def exact_in(u, DOT: tl.constexpr, MAX_U: tl.constexpr):
    """u as the dot's dtype, exactly: a 16-bit mantissa trick when u fits the mantissa
    (fp16 below 1024, bf16 below 128), else through float32."""
    if DOT == tl.float16 and MAX_U < 1024:
        return (u | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0
    elif DOT == tl.bfloat16 and MAX_U < 128:
        return (u | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True) - 128.0
    else:
        return (magic_f32(u) - F32_MAGIC).to(DOT)


@triton.jit
def store_tile(acc, y_ptr, ws_ptr, lock_ptr, rm, rn, M, N, sym, syn, pid_k, tile,
               SPLIT_K: tl.constexpr):
    """Store the float32 tile acc [len(rm), len(rn)] into y in y's dtype.

    With SPLIT_K > 1 each program leaves its partial sum in ws [SPLIT_K, M, N]; the last of
    the tile's programs to arrive (a counter per tile) adds them in order, stores y and resets
    the counter. One launch, no zero-filled buffer, and the same sum on every run."""
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    y = y_ptr + rm[:, None] * sym + rn[None, :] * syn
    if SPLIT_K == 1:
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        part = ws_ptr + rm[:, None] * N + rn[None, :]
        tl.store(part + pid_k * M * N, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the counter moves
        if tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel") == SPLIT_K - 1:
            total = tl.zeros_like(acc)
            for p in range(SPLIT_K):
                total += tl.load(part + p * M * N, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(y, total.to(y_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(lock_ptr + tile, 0)
