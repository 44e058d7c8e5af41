"""The scaled 8-bit GEMM template (int8 or fp8 tensor cores) for activation-quantized
linears: y[M, N] = (a[M, K] . b[K, N]) * row_scale[M] * col_scale[N] + bias[N].

a holds the per-token 8-bit activations, b the 8-bit weight (as nn.Linear stores it, [N, K],
read through strides as K x N tiles); ACC is the accumulator: int32 for int8, float32 for
fp8. The scales and the bias are optional (HAS_ROW, HAS_COL, HAS_BIAS), applied in float32
once per output in the epilogue, which stores y's dtype. Their strides are 0 for a single value
broadcast to every row or column (a per-tensor scale).

B_PACKED (w4a8): b is 4-bit codes packed 8 per int32 word along K ([K/8, N], the weight-only
formats' fields layout), and each code becomes its int8 weight inside the kernel as
(code - zero) * scale, with the uint8 zero and scale of its group of GROUP rows of K ([K/GROUP,
N]): integer arithmetic, exact, then the same int8 dot. Each word is loaded once per tile and
split into its codes; TILE_IN_GROUP (the K tile lies in one group) loads one row of the
group's integers per tile instead of one per code.
"""
import triton
import triton.language as tl

from .unpack import load_words, split_words


@triton.jit
def scaled_gemm_kernel(
    a_ptr, b_ptr, row_ptr, col_ptr, bias_ptr, y_ptr, z_ptr, s_ptr, M, N, K, M_BUCKET,
    sam, sak, sbn, sbk, sym, syn, srow, scol, sbias, sgk, sgn,
    ACC: tl.constexpr, HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr, HAS_BIAS: tl.constexpr,
    B_PACKED: tl.constexpr, GROUP: tl.constexpr, TILE_IN_GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * sam + kk[None, :] * sak,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        bmask = (kk[:, None] < K) & (rn[None, :] < N)
        if B_PACKED:  # w4a8: each word loaded once and split into its 8 codes along K
            words = load_words(b_ptr, k0 // 8 + tl.arange(0, BLOCK_K // 8), rn, tl.cdiv(K, 8), N, sbk, sbn)
            code = tl.reshape(split_words(words, tl.arange(0, 8), 4, 8), (BLOCK_K, BLOCK_N))
            if TILE_IN_GROUP:  # one row of the group's integers for the whole tile
                goff = (k0 // GROUP) * sgk + rn[None, :] * sgn
                gmask = rn[None, :] < N
            else:
                goff = (kk // GROUP)[:, None] * sgk + rn[None, :] * sgn
                gmask = bmask
            zero = tl.load(z_ptr + goff, mask=gmask, other=0).to(tl.int32)
            step = tl.load(s_ptr + goff, mask=gmask, other=0).to(tl.int32)
            b = (code * step - zero * step).to(tl.int8)  # codes past K meet zero activations
        else:
            b = tl.load(b_ptr + kk[:, None] * sbk + rn[None, :] * sbn, mask=bmask, other=0.0)
        acc = tl.dot(a, b, acc, out_dtype=ACC)  # triton 3.6 defaults out_dtype to float32
    y = acc.to(tl.float32)
    if HAS_ROW:
        y *= tl.load(row_ptr + rm * srow, mask=rm < M, other=0.0).to(tl.float32)[:, None]
    if HAS_COL:
        y *= tl.load(col_ptr + rn * scol, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn * sbias, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * sym + rn[None, :] * syn, y.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))
