"""Dequantize a W-only weight to a dense [K, N] matrix in the activation dtype.

For large M the GEMM is compute-bound and cuBLAS's dense fp16/bf16 GEMM beats a Triton
mixed-input one (measured on the H100: 0.3x of cuBLAS for wq_gemm at M >= 256), so the op
writes the weight out once per call and hands it to torch.mm: the extra pass over the
weight costs about what the GEMM loses. Same unpacking as the other templates; each value
is scaled individually, as it is stored."""
import triton
import triton.language as tl

from .unpack import F32_MAGIC, biased_code, magic_f32, plane_code


@triton.jit
def wq_dequant_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr, N, K,
    swp, swk, swn, ssp, ssg, ssn, sok, son,
    BITS: tl.constexpr, GROUP: tl.constexpr, FMT: tl.constexpr, CODES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
):
    PER: tl.constexpr = 32 if FMT >= 2 else 32 // BITS
    KW = tl.cdiv(K, PER)
    rw = tl.program_id(0) * BLOCK_KW + tl.arange(0, BLOCK_KW)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, CODES)
    rk = (rw[:, None] * PER + rj[None, :])[:, :, None]  # [BLOCK_KW, CODES, 1]
    mask = (rj[None, :, None] < PER) & (rk < K) & (rn[None, None, :] < N)
    soff = (rk // GROUP) * ssg + rn[None, None, :] * ssn
    if FMT == 3:
        w = tl.zeros((BLOCK_KW, CODES, BLOCK_N), dtype=tl.float32)
        for p in tl.static_range(BITS):
            scale = tl.load(s_ptr + soff + p * ssp, mask=mask, other=0.0).to(tl.float32)
            w += (magic_f32(plane_code(w_ptr, p, rw, rj, rn, KW, N, swp, swk, swn)) - (F32_MAGIC + 1)) * scale
    else:
        u = biased_code(w_ptr, rw, rj, rn, KW, N, swp, swk, swn, BITS, FMT, PER)
        scale = tl.load(s_ptr + soff, mask=mask, other=0.0).to(tl.float32)
        if FMT == 0:
            offset = tl.load(z_ptr + soff, mask=mask, other=0.0).to(tl.float32)
        elif FMT == 1:
            offset = 1 << (BITS - 1)
        else:
            offset = (1 << BITS) - 1
        w = ((magic_f32(u) - F32_MAGIC) - offset) * scale  # 2**23 + a fractional zero would round
    tl.store(out_ptr + rk * sok + rn[None, None, :] * son, w.to(out_ptr.dtype.element_ty), mask=mask)
