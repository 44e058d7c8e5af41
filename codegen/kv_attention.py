"""Split-KV decode attention over a quantized KV cache (flash-decoding), the K and V codes
dequantized in registers after loading the packed bytes (issue 5, first part).

Grid (B, Hkv, SPLITS): each program takes one KV head with all REP = Hq / Hkv query heads
that share it (grouped-query attention: the cache is read once per KV head, not per query
head) and all S new query tokens, over one range of the cache, with an online softmax. It
leaves (acc, max, sum) partials per split; ``kv_combine_kernel`` merges them. Query s of S is
the token at position length - S + s and sees the cache up to it; with HAS_MASK an additive
mask [B, 1 or Hq, S, T] (strides, 0 where broadcast) says instead what each query sees, as
transformers' static cache passes it to SDPA.

BITS 8: one byte per code; 4: two per byte, channel 2i low nibble. Per token and group of
GROUP channels: value = (code - zero) * scale. DOT is the dtype of the dots' operands (the
query's; float32 under the interpreter, whose bf16 dot is wrong); PRECISION "ieee" keeps float32
dots exact, which the GPU would otherwise round to tf32.
"""
import triton
import triton.language as tl


@triton.jit
def _dequant(c_ptr, s_ptr, z_ptr, rt, rd, tmask, sct, scd, sst, ssg, BITS: tl.constexpr, GROUP: tl.constexpr):
    """[BLOCK_T, D] float32 values of tokens rt: codes [BLOCK_T, D / GROUP, GROUP] against one
    scale and zero per group (loaded once per group, not per channel)."""
    D: tl.constexpr = rd.shape[0]
    rg = tl.arange(0, D // GROUP)
    d3 = rg[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # [G, GROUP] channel numbers
    if BITS == 8:
        codes = tl.load(c_ptr + rt[:, None, None] * sct + d3[None, :, :] * scd, mask=tmask[:, None, None], other=0)
    else:
        byte = tl.load(c_ptr + rt[:, None, None] * sct + (d3 // 2)[None, :, :] * scd, mask=tmask[:, None, None],
                       other=0)
        codes = (byte >> ((d3 % 2) * 4)[None, :, :]) & 15
    soff = rt[:, None] * sst + rg[None, :] * ssg
    scale = tl.load(s_ptr + soff, mask=tmask[:, None], other=0.0).to(tl.float32)[:, :, None]
    zero = tl.load(z_ptr + soff, mask=tmask[:, None], other=0.0).to(tl.float32)[:, :, None]
    return tl.reshape((codes.to(tl.float32) - zero) * scale, (rt.shape[0], D))


@triton.jit
def kv_decode_kernel(
    q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, mask_ptr, acc_ptr, stat_ptr,
    length, sm_scale,
    sqb, sqh, sqs, sqd, scb, sch, sct, scd, ssb, ssh, sst, ssg, smb, smh, sms, smt,
    REP: tl.constexpr, S: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
    GROUP: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, SPLITS: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    b, hkv, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    r = tl.arange(0, ROWS)  # row r: query head hkv * REP + r // S, new token r % S
    rvalid = r < REP * S
    rd = tl.arange(0, D)
    head = hkv * REP + r // S
    q = tl.load(q_ptr + b * sqb + head[:, None] * sqh + (r % S)[:, None] * sqs + rd[None, :] * sqd,
                mask=rvalid[:, None], other=0.0)
    q = (q.to(tl.float32) * sm_scale).to(DOT)
    last = length - S + r % S  # the last position each row may see
    chunk = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_T) * BLOCK_T
    start = split * chunk
    m = tl.full((ROWS,), float("-inf"), tl.float32)
    l = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, D), tl.float32)
    kv = b * scb + hkv * sch
    sv = b * ssb + hkv * ssh
    for t0 in range(start, tl.minimum(start + chunk, length), BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        tmask = rt < length
        k = _dequant(kc_ptr + kv, ks_ptr + sv, kz_ptr + sv, rt, rd, tmask, sct, scd, sst, ssg, BITS, GROUP)
        qk = tl.dot(q, tl.trans(k.to(DOT)), input_precision=PRECISION)
        if HAS_MASK:
            qk += tl.load(mask_ptr + b * smb + head[:, None] * smh + (r % S)[:, None] * sms + rt[None, :] * smt,
                          mask=rvalid[:, None] & tmask[None, :], other=0.0).to(tl.float32)
            qk = tl.where(tmask[None, :], qk, float("-inf"))
        else:
            qk = tl.where(rt[None, :] <= last[:, None], qk, float("-inf"))
        m_new = tl.maximum(m, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
        p = tl.exp(qk - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        v = _dequant(vc_ptr + kv, vs_ptr + sv, vz_ptr + sv, rt, rd, tmask, sct, scd, sst, ssg, BITS, GROUP)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v.to(DOT), input_precision=PRECISION)
        l = l * alpha + tl.sum(p, 1)
        m = m_new
    part = ((b * tl.num_programs(1) + hkv) * SPLITS + split) * ROWS + r
    tl.store(acc_ptr + part[:, None] * D + rd[None, :], acc)
    tl.store(stat_ptr + part * 2, m)
    tl.store(stat_ptr + part * 2 + 1, l)


@triton.jit
def kv_combine_kernel(
    acc_ptr, stat_ptr, o_ptr, sob, soh, sos, sod,
    REP: tl.constexpr, S: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
):
    """out = sum_i acc_i e^(m_i - M) / sum_i l_i e^(m_i - M) over the splits, M = max_i m_i."""
    b, hkv = tl.program_id(0), tl.program_id(1)
    r = tl.arange(0, ROWS)
    rd = tl.arange(0, D)
    base = (b * tl.num_programs(1) + hkv) * SPLITS * ROWS
    mx = tl.full((ROWS,), float("-inf"), tl.float32)
    for i in range(SPLITS):
        mx = tl.maximum(mx, tl.load(stat_ptr + (base + i * ROWS + r) * 2))
    num = tl.zeros((ROWS, D), tl.float32)
    den = tl.zeros((ROWS,), tl.float32)
    for i in range(SPLITS):
        part = base + i * ROWS + r
        w = tl.exp(tl.load(stat_ptr + part * 2) - mx)  # an empty split has m = -inf: weight 0
        num += tl.load(acc_ptr + part[:, None] * D + rd[None, :]) * w[:, None]
        den += tl.load(stat_ptr + part * 2 + 1) * w
    out = num / den[:, None]
    head = hkv * REP + r // S
    tl.store(o_ptr + b * sob + head[:, None] * soh + (r % S)[:, None] * sos + rd[None, :] * sod,
             out.to(o_ptr.dtype.element_ty), mask=(r < REP * S)[:, None])
