"""Attention over a quantized KV cache, the K and V codes dequantized in registers after
loading the packed bytes: split-KV flash decoding for a few new tokens, and the same kernel
tiled over query rows for prefill (issue 5).

The REP = Hq / Hkv query heads that share a KV head and the S new tokens make REP * S rows
(grouped-query attention: the cache is read once per KV head, not per query head). Grid (B,
Hkv, row blocks * splits): each program takes ROWS rows over one range of the cache, with an
online softmax. Decoding has one block of rows and splits the cache, leaving (acc, max, sum)
partials that ``kv_combine_kernel`` merges; prefill has many blocks, one split, and stores the
output itself. Query s of S is the token at position length - S + s and sees the cache up to
it, so a block stops at its last row's position; with HAS_MASK an additive mask [B, 1 or Hq,
S, T] (strides, 0 where broadcast) says instead what each query sees, as transformers' static
cache passes it to SDPA. A static cache's unwritten tail, hidden by that mask, is not read: a
decode step splits only up to the last token the mask shows (``kv_live_kernel``), a prefill
skips the tiles its block cannot see. The tile (BLOCK_T, warps, stages) and the split are
tuned per shape (codegen/kv_tiling.py).

BITS 8: one byte per code; 4: two per byte, channel 2i low nibble. K's and V's codes are read
through their own strides: 8-bit V is stored token-contiguous (formats.kv.v_token_major), the
order in which p @ V sums, so its bytes reach the tensor cores without a byte-wise
shared-memory read, and in blocks of VB tokens (one contiguous run a tile, where runs T bytes
apart read at 60% of the copy bandwidth: 1.27-1.34x at batch 8 and 32 on the H200,
bench/results/2026-12-01-h200-attention-v-*.json). Per token and group of GROUP channels:
value = (code - zero) * scale, computed in the scale's dtype. Two paths skip the
integer-to-float conversion of each code (measured on the H200, 16k context, against the
version before them:
bench/results/2026-11-30-h200-attention-ab*.json): 8-bit codes with whole-head groups and
fp16 dots take their scales on the dots, not on every code (``_tile_deferred``, 1.25-1.49x);
4-bit codes with fp16 scales become ``1024 + nibble`` in fp16 by bit operations
(``_biased_nibbles``, 1.08-1.20x; with bf16 scales ``128 + nibble`` in bf16, 1.13x at batch 1
and 1.22x at batch 8: -attention-ab-e19-bf16.json). 1024 + code is not exact in bf16, so bf16
queries take the 8-bit path with both dots in fp16, q scaled per row by a power of two
(``_fp16_range``): 1.20x at batch 1 and 1.31x at batch 8 with V's dot still in bf16
(-attention-ab-cache-bf16.json), then 1.08x and 1.27x more with it in fp16 too
(-attention-ab-e18-bf16.json). On that path a decode step's 8 or fewer rows keep only the top
half of the dots' 16 (HALF: 1.14x at batch 1, -attention-ab-e20.json; 4-bit codes ran 0.93x
with it). The tiles every row of a block sees whole run without bounds or bias, and the softmax
takes 2^x in one instruction (4-bit 1.05x, 8-bit within 2%: -attention-ab-e23.json and
-attention-ab-e21-e23.json).
DOT is the dtype of the dots' operands (the query's; float32 under the interpreter, whose bf16
dot is wrong); PRECISION "ieee" keeps float32 dots exact, which the GPU would otherwise round
to tf32.

Measured on the H100 and not kept (bench/results/2026-11-25-h100-attention-sweep*.json): 8-bit
codes loaded as 2D tiles with K transposed into the dot's B operand shape (1.4-2.2x slower);
dequantization deferred to the dots' results through a batched dot over the groups (the
scale applied per token and group, not per element: 1.6-3.7x slower, 255 registers, 76% of the
shared-memory wavefronts in bank conflicts); 4-bit nibbles kept apart in two dots (wrong
results with 16-row blocks in fp16/bf16 under Triton 3.6). On the H200: the mantissa trick for
every code, the zero subtracted after (1.01-1.09x, short of the two paths above; main's
history, 1a2cb8e).
"""
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from qcompile.runtime.device import interpreting

INTERPRET = tl.constexpr(interpreting())  # the interpreter runs no PTX
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _dequant(c_ptr, s_ptr, z_ptr, rt, tmask, sct, scd, sck, sst, ssg, D: tl.constexpr, BITS: tl.constexpr,
             GROUP: tl.constexpr, DEQ: tl.constexpr, VB: tl.constexpr):
    """[BLOCK_T, D] values of tokens rt in DEQ, the scale's dtype (float32 for bf16 under the
    interpreter, whose bf16 arithmetic is wrong): (code - zero) * scale rounded once as the
    reference rounds it, without a float32 detour (two conversions fewer per element). Codes
    [BLOCK_T, D / GROUP, GROUP] against one scale and zero per group, loaded once per group. The
    codes' tokens are sct apart, or in blocks (_token_offsets)."""
    T: tl.constexpr = rt.shape[0]
    ct = _token_offsets(rt, sct, sck, VB)
    rg = tl.arange(0, D // GROUP)
    if BITS == 8:  # loaded in the [T, G, GROUP] shape it is used in (a 2D load and a reshape ran slower)
        d3 = rg[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        codes = tl.load(c_ptr + ct[:, None, None] + d3[None, :, :] * scd, mask=tmask[:, None, None], other=0)
    else:  # each byte loaded once, its nibbles interleaved back: channel 2i low, 2i + 1 high
        byte = tl.load(c_ptr + ct[:, None] + tl.arange(0, D // 2)[None, :] * scd, mask=tmask[:, None], other=0)
        if DEQ == tl.float16 or DEQ == tl.bfloat16:
            low, high = _biased_nibbles(byte, DEQ)
            bias: tl.constexpr = 1024.0 if DEQ == tl.float16 else 128.0
            codes = tl.reshape(tl.reshape(tl.join(low, high), (T, D)), (T, D // GROUP, GROUP)) - bias
        else:
            codes = tl.reshape(tl.reshape(tl.join(byte & 15, byte >> 4), (T, D)), (T, D // GROUP, GROUP))
    soff = rt[:, None] * sst + rg[None, :] * ssg
    scale = tl.load(s_ptr + soff, mask=tmask[:, None], other=0.0).to(DEQ)[:, :, None]
    zero = tl.load(z_ptr + soff, mask=tmask[:, None], other=0.0).to(DEQ)[:, :, None]
    return tl.reshape((codes.to(DEQ) - zero) * scale, (T, D))


# 2^e + each nibble of the packed bytes by bit operations, the exponent's byte given as {top}:
# fp16 0x64 (1024; its 10 mantissa bits hold 0-15), bf16 0x43 (128; 7 bits). A PRMT puts two
# bytes under two exponent bytes, a mask (low nibbles) or a shift and mask (high) keeps one nibble.
_NIBBLES_ASM = """{{
        .reg .b32 t0, t1;
        prmt.b32 t0, $4, 0x{top}{top}{top}{top}, 0x5140;
        prmt.b32 t1, $4, 0x{top}{top}{top}{top}, 0x5342;
        and.b32 $0, t0, 0xFF0FFF0F;
        and.b32 $1, t1, 0xFF0FFF0F;
        shr.b32 t0, t0, 4;
        shr.b32 t1, t1, 4;
        lop3.b32 $2, t0, 0x000F000F, 0x{top}00{top}00, 0xEA;
        lop3.b32 $3, t1, 0x000F000F, 0x{top}00{top}00, 0xEA;
        }}"""
NIBBLES_FP16 = tl.constexpr(_NIBBLES_ASM.format(top="64"))
NIBBLES_BF16 = tl.constexpr(_NIBBLES_ASM.format(top="43"))


@triton.jit
def _biased_nibbles(byte, DEQ: tl.constexpr):
    """1024 + each nibble of the bytes in fp16, 128 + it in bf16 (low, high), exact: 3
    instructions for 4 codes on the GPU instead of an integer-to-float conversion of each,
    integer arithmetic under the interpreter."""
    if INTERPRET:
        top: tl.constexpr = 0x6400 if DEQ == tl.float16 else 0x4300
        low = ((byte & 15).to(tl.uint16) | top).to(DEQ, bitcast=True)
        high = ((byte >> 4).to(tl.uint16) | top).to(DEQ, bitcast=True)
    elif DEQ == tl.float16:
        low, high = tl.inline_asm_elementwise(NIBBLES_FP16, "=r,=r,=r,=r,r", [byte], dtype=(tl.float16, tl.float16),
                                              is_pure=True, pack=4)
    else:
        low, high = tl.inline_asm_elementwise(NIBBLES_BF16, "=r,=r,=r,=r,r", [byte], dtype=(tl.bfloat16, tl.bfloat16),
                                              is_pure=True, pack=4)
    return low, high


@triton.jit
def _softmax_step(qk, l, m):
    """Online softmax: p of this tile, the factor alpha for what came before, and l, m after it."""
    m_new = tl.maximum(m, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new) * LOG2E  # rows that have seen nothing yet
    p = _exp2(qk * LOG2E - m_safe[:, None])  # one FFMA and one MUFU an element
    alpha = _exp2(m * LOG2E - m_safe)
    return p, alpha, l * alpha + tl.sum(p, 1), m_new


@triton.jit
def _exp2(x):
    """2^x flushing subnormal results to 0 (they weigh nothing against the row's largest 1): with
    the scaling by log2(e) one FFMA and one MUFU.EX2 an element, where tl.exp(x - m) takes six
    (its subnormal handling four of them)."""
    if INTERPRET:
        return tl.exp2(x)
    return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def _tile(q, qsum, qinv, acc, l, m, bias, rt, tmask, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, skt, skd, svt, svd,
          svk, sst, ssg, D: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, DEQ: tl.constexpr,
          DOT: tl.constexpr, PRECISION: tl.constexpr, DEFERRED: tl.constexpr, HALF: tl.constexpr, VB: tl.constexpr):
    """One tile of the online softmax: (acc, l, m) updated with tokens rt, those of tmask, plus
    bias (None: every row sees every token, tmask all true). With HALF (only DEFERRED's) the
    dots have twice the rows of acc (the tensor cores' 16 for a step's 8 or fewer), and only the
    top half of them goes through the softmax and the accumulator."""
    if DEFERRED:
        acc, l, m = _tile_deferred(q, qsum, qinv, acc, l, m, bias, rt, tmask, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr,
                                   vz_ptr, skt, skd, svt, svd, svk, sst, D, DOT, PRECISION, HALF, VB)
    else:  # (an early return would still trace this branch)
        k = _dequant(kc_ptr, ks_ptr, kz_ptr, rt, tmask, skt, skd, 0, sst, ssg, D, BITS, GROUP, DEQ, 0)
        qk = tl.dot(q, tl.trans(k.to(DOT)), input_precision=PRECISION)
        if bias is not None:
            qk += bias
        p, alpha, l, m = _softmax_step(qk, l, m)
        v = _dequant(vc_ptr, vs_ptr, vz_ptr, rt, tmask, svt, svd, svk, sst, ssg, D, BITS, GROUP, DEQ, VB)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v.to(DOT), input_precision=PRECISION)
    return acc, l, m


@triton.jit
def _rows(x, HALF: tl.constexpr):
    """x [2H, N]: its top H rows with HALF, else x. Row bit 3 of the tensor cores' accumulator is
    a register of each thread, not a lane, so the split moves no data."""
    if HALF:
        x, _ = tl.split(tl.permute(tl.reshape(x, (2, x.shape[0] // 2, x.shape[1])), (1, 2, 0)))
    return x


@triton.jit
def _padded(x, HALF: tl.constexpr):
    """x [H, N] over H rows of zeros with HALF (the dot's operand again), else x."""
    if HALF:
        x = tl.reshape(tl.permute(tl.join(x, tl.zeros_like(x)), (2, 0, 1)), (2 * x.shape[0], x.shape[1]))
    return x


@triton.jit
def _plus_1024(codes):
    """1024 + code in fp16: one PRMT for two codes on the GPU (their bytes under 0x64 bytes), the
    same bits by integer arithmetic under the interpreter."""
    if INTERPRET:
        return (codes.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)
    return tl.inline_asm_elementwise("prmt.b32 $0, $2, 0x64646464, 0x5140; prmt.b32 $1, $2, 0x64646464, 0x5342;",
                                     "=r,=r,r", [codes], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def _token_offsets(rt, st, sk, VB: tl.constexpr):
    """Where tokens rt start in codes of token stride st, or with VB (a block of VB tokens a
    run, token-contiguous within it: formats.kv.as_token_blocks) in blocks sk apart."""
    if VB:
        return (rt // VB) * sk + (rt % VB) * st
    return rt * st


@triton.jit
def _tile_deferred(q, qsum, qinv, acc, l, m, bias, rt, tmask, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, skt,
                   skd, svt, svd, svk, sst, D: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                   HALF: tl.constexpr, VB: tl.constexpr):
    """_tile for 8-bit codes with one scale and zero per token (whole-head groups): the scales
    applied to the dots, not to every code. K: q @ (1024 + code)^T, exact on the tensor cores,
    then (dot - (1024 + zero) sum(q)) scale per token; V: p scale / the tile's largest scale (an
    fp16 operand in range) against code - zero. Both dots take q's dtype, fp16 for bf16 queries
    too: code - zero is exact there for an integer zero, and a fractional one keeps 11 bits,
    more than the reference's bf16 does."""
    rd = tl.arange(0, D)
    kc = tl.load(kc_ptr + rt[:, None] * skt + rd[None, :] * skd, mask=tmask[:, None], other=0)
    dots = _rows(tl.dot(q, tl.trans(_plus_1024(kc).to(q.dtype)), input_precision=PRECISION), HALF)
    ks = tl.load(ks_ptr + rt * sst, mask=tmask, other=0.0).to(tl.float32)
    kz = tl.load(kz_ptr + rt * sst, mask=tmask, other=0.0).to(tl.float32)
    qk = (dots - (kz + 1024.0)[None, :] * qsum[:, None]) * ks[None, :]
    if DOT == tl.bfloat16:  # q came in scaled into fp16's range
        qk = qk * qinv[:, None]
    if bias is not None:
        qk += bias
    p, alpha, l, m = _softmax_step(qk, l, m)
    vc = tl.load(vc_ptr + _token_offsets(rt, svt, svk, VB)[:, None] + rd[None, :] * svd, mask=tmask[:, None], other=0)
    vs = tl.load(vs_ptr + rt * sst, mask=tmask, other=0.0).to(tl.float32)
    vz = tl.load(vz_ptr + rt * sst, mask=tmask, other=0.0).to(tl.float32)
    v = ((_plus_1024(vc) - 1024.0).to(tl.float32) - vz[:, None]).to(q.dtype)  # fp16 for bf16 queries too
    top = tl.maximum(tl.max(tl.abs(vs), 0), 1e-30)
    pv = tl.dot(_padded((p * (vs * (1.0 / top))[None, :]).to(q.dtype), HALF), v, input_precision=PRECISION)
    acc = acc * alpha[:, None] + _rows(pv, HALF) * top
    return acc, l, m


@triton.jit
def _fp16_range(q):
    """Per row of float32 q, the power of two f that brings its largest |value| into [2^14,
    2^15), and 1 / f: q f in fp16 cannot overflow and keeps 11 bits of every value above 2^-14
    of the largest, more than bf16's 8; multiplying the dots by 1 / f undoes it exactly."""
    e = ((tl.max(tl.abs(q), 1).to(tl.uint32, bitcast=True) >> 23) & 0xFF).to(tl.int32) - 127
    k = tl.minimum(tl.maximum(14 - e, -126), 126)
    return ((k + 127) << 23).to(tl.float32, bitcast=True), ((127 - k) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _bias(mask_ptr, r, rvalid, head, last, rt, tmask, smh, sms, smt, S: tl.constexpr, HAS_MASK: tl.constexpr):
    """[ROWS, T] additive mask of a tile: the given mask's, or causal (row r sees up to last[r])."""
    if HAS_MASK:
        return tl.load(mask_ptr + head[:, None] * smh + (r % S)[:, None] * sms + rt[None, :] * smt,
                       mask=rvalid[:, None] & tmask[None, :], other=float("-inf")).to(tl.float32)
    return tl.where(rt[None, :] <= last[:, None], 0.0, float("-inf"))


@triton.jit
def kv_live_kernel(mask_ptr, live_ptr, length, rows, smb, smh, sms, smt, nlive,
                   S: tl.constexpr, MROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Per batch and block of BLOCK tokens, one past the last token the mask's first ``rows``
    rows ([B, rows // S, S, T], MROWS a power of two above) show to any query (0 if none):
    what a decode step over a static cache splits, instead of the whole cache with its
    unwritten tail. Grid (B, nlive)."""
    b, blk = tl.program_id(0).to(tl.int64), tl.program_id(1)  # int64: b's offsets may pass 2^31
    rt = blk * BLOCK + tl.arange(0, BLOCK)
    r = tl.arange(0, MROWS)
    bias = tl.load(mask_ptr + b * smb + (r // S)[:, None] * smh + (r % S)[:, None] * sms + rt[None, :] * smt,
                   mask=(r < rows)[:, None] & (rt < length)[None, :], other=float("-inf"))
    seen = tl.max(bias.to(tl.float32), 0) > float("-inf")
    tl.store(live_ptr + b * nlive + blk, tl.max(tl.where(seen, rt + 1, 0)))


@triton.jit
def kv_attention_kernel(
    q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, mask_ptr, live_ptr, o_ptr, acc_ptr, stat_ptr,
    length, sm_scale, splits, nlive,
    sqb, sqh, sqs, sqd, skb, skh, skt, skd, svb, svh, svt, svd, svk, ssb, ssh, sst, ssg, smb, smh, sms, smt,
    sob, soh, sos, sod, REP: tl.constexpr, S: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
    GROUP: tl.constexpr, DEQ: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_MASK: tl.constexpr, LIVE: tl.constexpr, SKIP_HIDDEN: tl.constexpr, VB: tl.constexpr, PDL: tl.constexpr,
):
    """LIVE (a decode step with a mask): the cache is split up to the end kv_live_kernel found,
    not up to ``length``. SKIP_HIDDEN (a prefill with a mask): each tile's mask is checked and
    a tile hidden from every row of the block is not read; that branch keeps Triton from
    pipelining the loads, so decoding, whose loop is all loads, does without it. VB: V's codes
    in blocks of VB tokens, svk apart (formats.kv.as_token_blocks); 0, through svt alone. PDL
    (sm_90 and later): kv_combine_kernel is launched as a programmatic dependent of this one."""
    b, hkv, pid = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)  # int64: b's offsets may pass 2^31
    if PDL:  # the merge, launched dependent on this kernel, may start its programs now; this
        gdc_launch_dependents()  # kernel, launched dependent on the one before, waits for its writes
        gdc_wait()
    split, block = pid % splits, pid // splits
    DEFERRED: tl.constexpr = BITS == 8 and GROUP == D  # _tile_deferred's codes
    # There a block of 16 rows for 8 or fewer (a decode step) keeps only the top half of the
    # dots' rows: the softmax and the accumulator do half the work, in half the registers.
    # (4-bit codes ran 0.93x with it: -attention-ab-e20.json.)
    HALF: tl.constexpr = DEFERRED and ROWS == 16 and REP * S <= 8
    KEPT: tl.constexpr = ROWS // 2 if HALF else ROWS
    rq = block * ROWS + tl.arange(0, ROWS)  # the dots' rows
    r = block * ROWS + tl.arange(0, KEPT)  # row r: query head hkv * REP + r // S, new token r % S
    rvalid = r < REP * S
    rd = tl.arange(0, D)
    head = hkv * REP + r // S
    last = length - S + r % S  # the last position each row may see
    span = length
    if LIVE:
        rl = tl.arange(0, LIVE)
        span = tl.max(tl.load(live_ptr + b * nlive + rl, mask=rl < nlive, other=0))
    chunk = tl.cdiv(tl.cdiv(span, splits), BLOCK_T) * BLOCK_T
    start = split * chunk
    end = tl.minimum(start + chunk, span)
    if not HAS_MASK:  # causal: no row of this block sees past its last query's position
        end = tl.minimum(end, tl.max(tl.where(rvalid, last, 0)) + 1)
    kc = kc_ptr + b * skb + hkv * skh
    vc = vc_ptr + b * svb + hkv * svh
    sv = b * ssb + hkv * ssh
    q = tl.load(q_ptr + b * sqb + (hkv * REP + rq // S)[:, None] * sqh + (rq % S)[:, None] * sqs + rd[None, :] * sqd,
                mask=(rq < REP * S)[:, None], other=0.0)
    q = q.to(tl.float32) * sm_scale
    qinv = tl.full((KEPT,), 1.0, tl.float32)
    if DEFERRED and DOT == tl.bfloat16:  # K's dot in fp16, where 1024 + code is exact
        qf, qinv = _fp16_range(q)
        qinv = tl.reshape(_rows(qinv[:, None], HALF), (KEPT,))
        q = (q * qf[:, None]).to(tl.float16)
    else:
        q = q.to(DOT)
    qsum = tl.sum(_rows(q.to(tl.float32), HALF), 1)
    m = tl.full((KEPT,), float("-inf"), tl.float32)
    l = tl.zeros((KEPT,), tl.float32)
    acc = tl.zeros((KEPT, D), tl.float32)
    full = start
    if not HAS_MASK:  # first the tiles every row sees whole: no bias, no bounds (an all-true mask)
        seen = tl.min(tl.where(rvalid, last, length)) + 1
        full += tl.maximum(tl.minimum(end, seen) - start, 0) // BLOCK_T * BLOCK_T
        for t0 in range(start, full, BLOCK_T):
            rt = t0 + tl.arange(0, BLOCK_T)
            acc, l, m = _tile(q, qsum, qinv, acc, l, m, None, rt, tl.full((BLOCK_T,), True, tl.int1), kc, ks_ptr + sv,
                              kz_ptr + sv, vc, vs_ptr + sv, vz_ptr + sv, skt, skd, svt, svd, svk, sst, ssg, D, BITS,
                              GROUP, DEQ, DOT, PRECISION, DEFERRED, HALF, VB)
    for t0 in range(full, end, BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        tmask = rt < length
        bias = _bias(mask_ptr + b * smb, r, rvalid, head, last, rt, tmask, smh, sms, smt, S, HAS_MASK)
        if SKIP_HIDDEN:
            if tl.max(tl.max(bias, 1), 0) > float("-inf"):
                acc, l, m = _tile(q, qsum, qinv, acc, l, m, bias, rt, tmask, kc, ks_ptr + sv, kz_ptr + sv, vc,
                                  vs_ptr + sv, vz_ptr + sv, skt, skd, svt, svd, svk, sst, ssg, D, BITS, GROUP, DEQ,
                                  DOT, PRECISION, DEFERRED, HALF, VB)
        else:
            acc, l, m = _tile(q, qsum, qinv, acc, l, m, bias, rt, tmask, kc, ks_ptr + sv, kz_ptr + sv, vc, vs_ptr + sv,
                              vz_ptr + sv, skt, skd, svt, svd, svk, sst, ssg, D, BITS, GROUP, DEQ, DOT, PRECISION,
                              DEFERRED, HALF, VB)
    if splits == 1:  # the whole cache in this program: the output directly
        tl.store(o_ptr + b * sob + head[:, None] * soh + (r % S)[:, None] * sos + rd[None, :] * sod,
                 (acc / l[:, None]).to(o_ptr.dtype.element_ty), mask=rvalid[:, None])
    else:  # partials for kv_combine_kernel (one block of rows; the padding rows' are not stored)
        part = ((b * tl.num_programs(1) + hkv) * splits + split) * ROWS + r
        tl.store(acc_ptr + part[:, None] * D + rd[None, :], acc, mask=rvalid[:, None])
        tl.store(stat_ptr + part * 2, m, mask=rvalid)
        tl.store(stat_ptr + part * 2 + 1, l, mask=rvalid)


@triton.jit
def kv_dequant_kernel(c_ptr, s_ptr, z_ptr, o_ptr, length, heads, scb, sch, sct, scd, sck, ssb, ssh, sst, ssg,
                      sob, soh, sot, sod, D: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                      DEQ: tl.constexpr, VB: tl.constexpr, BLOCK_T: tl.constexpr):
    """formats.kv.dequantize_kv of a cache's first ``length`` tokens into o [B, H, length, D],
    rounded as the reference rounds (_dequant): a prefill's K or V for torch's SDPA, whose flash
    kernel a long prompt's dots are faster in than this module's. Grid (B H, tiles of BLOCK_T)."""
    b, h = tl.program_id(0).to(tl.int64) // heads, tl.program_id(0) % heads  # int64: b's offsets may pass 2^31
    rt = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = rt < length
    x = _dequant(c_ptr + b * scb + h * sch, s_ptr + b * ssb + h * ssh, z_ptr + b * ssb + h * ssh, rt, tmask, sct, scd,
                 sck, sst, ssg, D, BITS, GROUP, DEQ, VB)
    if DEQ == tl.float32:  # bf16 under the interpreter too: rounded, not truncated
        x = _rounded_to(x, o_ptr.dtype.element_ty)
    tl.store(o_ptr + b * sob + h * soh + rt[:, None] * sot + tl.arange(0, D)[None, :] * sod,
             x.to(o_ptr.dtype.element_ty), mask=tmask[:, None])


@triton.jit
def kv_combine_kernel(
    acc_ptr, stat_ptr, o_ptr, splits, sob, soh, sos, sod,
    REP: tl.constexpr, S: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, MROWS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr,
):
    """out = sum_i acc_i e^(m_i - M) / sum_i l_i e^(m_i - M) over the splits, M = max_i m_i, for
    BLOCK_D channels of one KV head's REP * S rows (MROWS a power of two above; the partials
    are laid out ROWS apart), BLOCK_S splits at a time with a running M: grid (B, Hkv,
    D / BLOCK_D). A loop over the splits one by one waits on each one's loads: 38 us for the
    264 splits of a batch-1 decode step on the H200, longer than the attention itself. On the
    GPU it is launched as a programmatic dependent of the attention kernel: its programs start
    while that kernel runs and wait (griddepcontrol.wait) for its writes, which hides the launch
    (about 4 of a batch-1 step's 18 us at 16k went to this kernel: the kv-kernel-times stage)."""
    b, hkv, dblock = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)  # b's offsets may pass 2^31
    r = tl.arange(0, MROWS)
    rmask = r < REP * S  # the rows the attention kernel stored
    rd = dblock * BLOCK_D + tl.arange(0, BLOCK_D)
    base = (b * tl.num_programs(1) + hkv) * splits * ROWS
    mx = tl.full((MROWS,), float("-inf"), tl.float32)
    num = tl.zeros((MROWS, BLOCK_D), tl.float32)
    den = tl.zeros((MROWS,), tl.float32)
    if PDL:  # launched dependent on the attention kernel: wait for its partials
        gdc_wait()
    for s0 in range(0, splits, BLOCK_S):
        rs = s0 + tl.arange(0, BLOCK_S)
        valid = (rs < splits)[:, None] & rmask[None, :]
        part = base + rs[:, None] * ROWS + r[None, :]  # [BLOCK_S, MROWS]
        m = tl.load(stat_ptr + part * 2, mask=valid, other=float("-inf"))  # an empty split has m = -inf: weight 0
        l = tl.load(stat_ptr + part * 2 + 1, mask=valid, other=0.0)
        acc = tl.load(acc_ptr + part[:, :, None] * D + rd[None, None, :], mask=valid[:, :, None], other=0.0)
        m_new = tl.maximum(mx, tl.max(m, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(mx - m_safe)
        w = tl.exp(m - m_safe[None, :])
        num = num * alpha[:, None] + tl.sum(acc * w[:, :, None], 0)
        den = den * alpha + tl.sum(l * w, 0)
        mx = m_new
    out = num / den[:, None]
    head = hkv * REP + r // S
    tl.store(o_ptr + b * sob + head[:, None] * soh + (r % S)[:, None] * sos + rd[None, :] * sod,
             out.to(o_ptr.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def _round(x):
    """Round half to even, as torch.round: adding 1.5 * 2**23 leaves no fraction bits in float32
    (|x| < 2**22 here: codes up to 255)."""
    return (x + 12582912.0) - 12582912.0


@triton.jit
def _rounded_to(x, dtype: tl.constexpr):
    """float32 x rounded to nearest-even in ``dtype`` (bf16 by its bits: the interpreter's own
    conversion truncates)."""
    if dtype == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.to(tl.float32, bitcast=True)
    return x.to(dtype).to(tl.float32)


@triton.jit
def kv_append_kernel(
    x_ptr, pos_ptr, c_ptr, s_ptr, z_ptr, H, S, T,
    sxb, sxh, sxs, sxd, scb, sch, sct, scd, sck, ssb, ssh, sst, ssg,
    D: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_S: tl.constexpr, VB: tl.constexpr,
):
    """New tokens x [B, H, S, D] quantized as formats.kv.quantize_kv does and written at their
    positions pos [S] into the cache's codes, scale and zero (T tokens long): one launch instead
    of Inductor's quantization kernel and three scatters. Grid (B * H, S blocks)."""
    b, h, block = tl.program_id(0).to(tl.int64) // H, tl.program_id(0) % H, tl.program_id(1)  # int64: as above
    rs = block * BLOCK_S + tl.arange(0, BLOCK_S)
    smask = rs < S
    x = tl.load(x_ptr + b * sxb + h * sxh + rs[:, None] * sxs + tl.arange(0, D)[None, :] * sxd, mask=smask[:, None],
                other=0.0)
    g = tl.reshape(x.to(tl.float32), (BLOCK_S, D // GROUP, GROUP))
    qmax: tl.constexpr = 2**BITS - 1
    lo, hi = tl.min(g, 2), tl.max(g, 2)
    # the arithmetic of quantize_kv: times the reciprocal for the scale, then IEEE divisions
    # (div_rn: the GPU's default float32 division is approximate, and a code next to a rounding
    # boundary would then differ)
    scale = _rounded_to(tl.maximum((hi - lo) * (1.0 / qmax), 1e-8), s_ptr.dtype.element_ty)  # as stored
    zero = tl.minimum(tl.maximum(_round(tl.div_rn(-lo, scale)), 0.0), qmax)
    codes = tl.div_rn(g, tl.broadcast_to(scale[:, :, None], g.shape)) + zero[:, :, None]
    codes = tl.minimum(tl.maximum(_round(codes), 0.0), qmax).to(tl.uint8)
    codes = tl.reshape(codes, (BLOCK_S, D))
    t = tl.load(pos_ptr + rs, mask=smask, other=0)
    smask &= (t >= 0) & (t < T)  # a position past the cache is dropped, never written out of bounds
    if BITS == 4:  # channel 2i in the low nibble, 2i + 1 in the high one
        low, high = tl.split(tl.reshape(codes, (BLOCK_S, D // 2, 2)))
        codes = low | (high << 4)
    rc = tl.arange(0, codes.shape[1])
    ct = _token_offsets(t, sct, sck, VB)  # the codes in blocks of VB tokens, sck apart, with VB
    tl.store(c_ptr + b * scb + h * sch + ct[:, None] + rc[None, :] * scd, codes, mask=smask[:, None])
    rg = tl.arange(0, D // GROUP)
    soff = b * ssb + h * ssh + t[:, None] * sst + rg[None, :] * ssg
    tl.store(s_ptr + soff, scale.to(s_ptr.dtype.element_ty), mask=smask[:, None])
    tl.store(z_ptr + soff, zero.to(z_ptr.dtype.element_ty), mask=smask[:, None])
