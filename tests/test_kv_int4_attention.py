"""The Gluon decode kernel for 4-bit caches (codegen/kv_int4_attention.py) against the
dequantize + SDPA reference on a GPU, which op takes it, and what stays with the Triton kernel.
The interpreter runs no Gluon, so on CPU these are skipped; its compile for sm_90 is checked
offline in tests/test_sass.py."""
import pytest
import torch
import triton

from conftest import assert_close
from qcompile.codegen import kv_int4_attention, kv_tiling
from qcompile.codegen.tiling import Choice
from qcompile.formats.kv import as_token_blocks, kv_attention_reference, quantize_kv
from qcompile.runtime import kv_ops  # registers qcompile::kv_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="Gluon kernels need a CUDA GPU: the Triton interpreter does not run them")


def _cache(b, hkv, t, dtype=torch.float16, v_range=1.0, group=32, bits=4):
    """K and V of t random tokens quantized; 8-bit V's codes in blocks of 64 tokens, as the
    cache stores them (the rows kernel's 8-bit layout)."""
    k, v = (torch.randn(b, hkv, t, 128, dtype=dtype, device="cuda") for _ in range(2))
    (vc, vs, vz) = quantize_kv(v * v_range, bits, group)
    return quantize_kv(k, bits, group), (as_token_blocks(vc, 64) if bits == 8 else vc, vs, vz)


def _fp32_reference(q, k, v, length, bits=4):
    """The reference evaluated in float32 on the same codes, in q's dtype: bf16's own rounding of
    the dequantized cache moves its scores by up to ~0.2 at |q| ~ 100 (10% on the output at 200
    tokens, against 0.3% here), so it cannot judge a kernel that dequantizes exactly."""
    wide = [(c, s.float(), z.float()) for c, s, z in (k, v)]
    return kv_attention_reference(q.float(), *wide, bits, length).to(q.dtype)


def _choices():
    """Many splits with a deep pipeline, and fewer with two stages."""
    return [Choice(kv_tiling.INT4_KERNEL, triton.Config({"BLOCK_T": 64, "WAVES": w}, num_warps=1, num_stages=st))
            for w, st in ((8, 4), (2, 2))]


@pytest.mark.parametrize("hq, hkv, s, dtype", [(8, 2, 1, torch.float16), (4, 2, 2, torch.float16),
                                               (2, 2, 1, torch.float16), (6, 2, 1, torch.float16),
                                               (16, 2, 1, torch.float16), (8, 2, 3, torch.float16),
                                               (8, 2, 1, torch.bfloat16), (4, 2, 2, torch.bfloat16)],
                         ids=["gqa4", "s2", "mha", "gqa3", "gqa8", "gqa4-s3", "gqa4-bf16", "s2-bf16"])
@pytest.mark.parametrize("length", [2, 37, 64, 200, 1000])
def test_matches_the_reference(hq, hkv, s, dtype, length):
    """Query rows a KV head in one program (GQA with S = 1 or 2 new tokens, MHA, 3 rows of 4) or
    in 2 and 3 (GQA 8; GQA 4 with S = 3, each row its own causal bound), a cache
    longer than its filled part, lengths off the 64-token tile, one program or many splits; bf16
    queries and scales (against the float32 reference). The op itself takes the rows kernel
    past 4 rows a KV head in fp16 (its first candidate there)."""
    torch.manual_seed(length)
    length = max(length, s)  # the new tokens are in the cache: a first one at -1 sees nothing (NaN)
    k, v = _cache(3, hkv, 1024, dtype)
    q = torch.randn(3, hq, s, 128, dtype=dtype, device="cuda") * 10
    ref = kv_attention_reference(q, k, v, 4, length) if dtype == torch.float16 else _fp32_reference(q, k, v, length)
    for choice in _choices():
        assert_close(kv_ops._attention(q, k, v, length, 4, None, None, choice), ref, dtype)
    assert_close(torch.ops.qcompile.kv_attention(q, *k, *v, length, 4), ref, dtype)
    key = kv_ops.tuning_key(4, 32, 128, 16, True, 3 * hkv, length, dtype, False)
    both = hq // hkv * s > kv_int4_attention.R.value and dtype == torch.float16  # the rows kernel offered too
    first = kv_tiling.INT4_ROWS_KERNEL if both else kv_tiling.INT4_KERNEL
    assert kv_ops.chosen[key].kernel == first, "the op's first candidate: the rows kernel past 4 rows a KV head"


def _rows_choices():
    """The rows kernel's: many splits with a deep pipeline, and fewer with two stages."""
    return [Choice(kv_tiling.INT4_ROWS_KERNEL, triton.Config({"BLOCK_T": 64, "WAVES": w}, num_warps=1, num_stages=st))
            for w, st in ((8, 4), (2, 2))]


@pytest.mark.parametrize("hq, hkv, s", [(8, 2, 1), (16, 2, 1), (32, 2, 1), (8, 2, 3), (2, 2, 1)],
                         ids=["gqa4", "gqa8", "gqa16", "gqa4-s3", "mha"])
@pytest.mark.parametrize("bits, group", [(4, 32), (4, 64), (4, 128), (8, 128)])
@pytest.mark.parametrize("length", [37, 1000])
def test_the_rows_kernel_matches_the_reference(hq, hkv, s, bits, group, length):
    """kv_int4_rows_kernel (K and V dequantized in the operands, the dots' rows the queries):
    1 to 16 query rows a KV head, 4-bit codes in groups of 32, 64 and 128 and 8-bit ones in
    whole heads (V in blocks of 64 tokens), one program or many splits. The cache past
    ``length`` holds NaN scales and zeros: with groups of 128 the kernel copies the scales of
    token pairs, one past an odd length, which must not reach the result."""
    torch.manual_seed(length)
    k, v = _cache(3, hkv, 1024, group=group, bits=bits)
    for t in (*k[1:], *v[1:]):
        t[:, :, length:] = float("nan")
    q = torch.randn(3, hq, s, 128, dtype=torch.float16, device="cuda")
    ref = kv_attention_reference(q, k, v, bits, length)
    for choice in _rows_choices():
        assert_close(kv_ops._attention(q, k, v, length, bits, None, None, choice), ref, torch.float16)


@pytest.mark.parametrize("hq", [4, 8], ids=["4-rows", "8-rows"])
@pytest.mark.parametrize("mask_dtype", [torch.bool, "additive"])
def test_a_mask_decides_what_each_query_sees(mask_dtype, hq):
    """A static cache's mask (the unwritten tail hidden, split only up to what it shows) with
    holes, per head, for S = 2 new tokens, in one program or two a KV head."""
    torch.manual_seed(0)
    k, v = _cache(2, 2, 512)
    q = torch.randn(2, hq, 2, 128, dtype=torch.float16, device="cuda")
    seen = torch.rand(2, hq, 2, 512, device="cuda") > 0.3
    seen[..., 300:] = False
    seen[..., 0] = True
    mask = seen if mask_dtype == torch.bool else torch.zeros(seen.shape, dtype=torch.float16,
                                                             device="cuda").masked_fill_(~seen, float("-inf"))
    ref = kv_attention_reference(q, k, v, 4, 512, mask)
    for choice in _choices() + _rows_choices():
        assert_close(kv_ops._attention(q, k, v, 512, 4, mask, None, choice), ref, torch.float16)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("hq", [4, 16], ids=["4-rows", "16-rows"])
def test_whole_head_groups_under_a_mask_at_an_odd_length(hq, bits):
    """The rows kernel with one group a token (scales on the dots, the scales copied by token
    pairs) under a mask with holes, 301 tokens of a longer cache whose scales and zeros past them
    are NaN: the one copied past the length is never read into the result, nor into a masked
    score (NaN + -inf). 8-bit codes too, whose tokens reach the dots in another order."""
    torch.manual_seed(4)
    k, v = _cache(2, 2, 512, group=128, bits=bits)
    for t in (*k[1:], *v[1:]):
        t[:, :, 301:] = float("nan")
    q = torch.randn(2, hq, 1, 128, dtype=torch.float16, device="cuda")
    seen = torch.rand(2, hq, 1, 301, device="cuda") > 0.3
    seen[..., 0] = True
    ref = kv_attention_reference(q, k, v, bits, 301, seen)
    for choice in _rows_choices():
        assert_close(kv_ops._attention(q, k, v, 301, bits, seen, None, choice), ref, torch.float16)


@pytest.mark.parametrize("bits, group", [(4, 32), (4, 128), (8, 128)])
def test_small_v_scales_keep_their_precision(bits, group):
    """V's scales near fp16's smallest normals: p scale / top stays in [0, 1] (top: the largest
    scale so far), where p scale itself would be subnormal (the decode kernel's groups of 32,
    the rows kernel's whole heads)."""
    torch.manual_seed(1)
    k, v = _cache(1, 2, 704, v_range=1e-3, group=group, bits=bits)  # 704: the scales' head stride a multiple of 16
    q = torch.randn(1, 8, 1, 128, dtype=torch.float16, device="cuda")
    ref = kv_attention_reference(q, k, v, bits, 700)
    for choice in _choices() + _rows_choices() if group == 32 else _rows_choices():
        assert_close(kv_ops._attention(q, k, v, 700, bits, None, None, choice), ref, torch.float16)


@pytest.mark.parametrize("q_range", [1e-5, 1e6])
def test_bf16_queries_beyond_fp16s_range(q_range):
    """bf16 queries whose q / sqrt(D) is subnormal (1e-5) or overflows (1e6) in fp16, against a
    cache scaled the other way so that the scores stay near 1: each query row is scaled by a
    power of two into fp16's range (FP16_RANGE) and the scores by its inverse."""
    torch.manual_seed(3)
    k, v = _cache(2, 2, 300, torch.bfloat16)
    kc, ks, kz = k
    k = (kc, ks / q_range, kz)  # the same codes: K / q_range
    q = torch.randn(2, 8, 1, 128, dtype=torch.bfloat16, device="cuda") * q_range
    ref = _fp32_reference(q, k, v, 300)
    for choice in _choices():
        assert_close(kv_ops._attention(q, k, v, 300, 4, None, None, choice), ref, torch.bfloat16)


@pytest.mark.parametrize("case", ["fp32", "20 rows", "head_dim 64", "groups of 64", "groups of 128", "258 tokens"])
def test_what_the_decode_kernel_cannot_take_goes_elsewhere(case):
    """Each case the decode kernel cannot take: groups of 64 and 128 go to the rows kernel, the
    rest to the Triton kernel. A cache of 258 tokens puts the scales' head stride (258 4) off
    Triton's multiples of 16, where cp.async could not be proven aligned: a compile error at
    launch had the kernels taken it."""
    torch.manual_seed(2)
    dtype = torch.float32 if case == "fp32" else torch.float16
    d, group = (64, 32) if case == "head_dim 64" else (128, {"groups of 64": 64, "groups of 128": 128}.get(case, 32))
    s = 5 if case == "20 rows" else 1  # GQA 4 and 5 new tokens
    t = 258 if case == "258 tokens" else 256
    k, v = (quantize_kv(torch.randn(1, 2, t, d, dtype=dtype, device="cuda"), 4, group) for _ in range(2))
    q = torch.randn(1, 8, s, d, dtype=dtype, device="cuda")
    reason = kv_int4_attention.unsupported_reason(q, k, v, 4)
    assert reason is not None
    assert_close(torch.ops.qcompile.kv_attention(q, *k, *v, 256, 4), kv_attention_reference(q, k, v, 4, 256), dtype)
    key = kv_ops.tuning_key(4, group, d, 32 if s > 1 else 16, True, 2, 256, dtype, False)
    rows = case in ("groups of 64", "groups of 128")
    assert kv_ops.chosen[key].kernel == (kv_tiling.INT4_ROWS_KERNEL if rows else "kv_attention")
    assert (kv_int4_attention.rows_unsupported_reason(q, k, v, 4) is None) == rows


@pytest.mark.parametrize("v_layout", ["blocks", "rows"])
def test_8_bit_whole_heads_take_the_rows_kernel_with_v_in_blocks(v_layout):
    """An 8-bit cache in whole heads: the rows kernel first where V's codes are in the cache's
    blocks of 64 tokens (its 8-bit layout), the Triton kernel where they are row-contiguous."""
    torch.manual_seed(5)
    k, v = _cache(1, 2, 256, group=128, bits=8)
    if v_layout == "rows":
        v = (v[0].contiguous(), *v[1:])
    q = torch.randn(1, 8, 1, 128, dtype=torch.float16, device="cuda")
    assert_close(torch.ops.qcompile.kv_attention(q, *k, *v, 250, 8), kv_attention_reference(q, k, v, 8, 250),
                 torch.float16)
    key = kv_ops.tuning_key(8, 128, 128, 16, True, 2, 250, torch.float16, False)
    assert kv_ops.chosen[key].kernel == (kv_tiling.INT4_ROWS_KERNEL if v_layout == "blocks" else "kv_attention")
    assert (kv_int4_attention.rows_unsupported_reason(q, k, v, 8) is None) == (v_layout == "blocks")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("hq, s", [(8, 1), (16, 1), (8, 2)], ids=["gqa4", "gqa8", "gqa4-s2"])
def test_bf16_queries_take_the_rows_kernel_in_whole_heads(bits, hq, s):
    """bf16 queries and scales on the rows kernel in whole heads, 4-bit and 8-bit (each query row
    times a power of two into fp16's range, undone on its scores), 301 tokens of a cache whose
    scales and zeros past them are NaN, against the float32 reference; in groups it refuses them."""
    torch.manual_seed(6)
    k, v = _cache(2, 2, 512, torch.bfloat16, group=128, bits=bits)
    for t in (*k[1:], *v[1:]):
        t[:, :, 301:] = float("nan")
    q = torch.randn(2, hq, s, 128, dtype=torch.bfloat16, device="cuda") * 10
    ref = _fp32_reference(q, k, v, 301, bits)
    for choice in _rows_choices():
        assert_close(kv_ops._attention(q, k, v, 301, bits, None, None, choice), ref, torch.bfloat16)
    assert kv_int4_attention.rows_unsupported_reason(q, k, v, bits) is None
    assert "bf16" in kv_int4_attention.rows_unsupported_reason(q, *(_cache(1, 2, 64, torch.bfloat16, group=32)), 4)
