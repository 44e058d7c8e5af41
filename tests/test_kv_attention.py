"""Quantized KV cache (int8/int4 codes, scale and zero per token and channel group) and the
split-KV decode attention kernel that reads it, against the dequantize + SDPA reference."""
import re

import pytest
import torch
import triton
import triton.language as tl

import qcompile
from conftest import DTYPES, assert_close
from qcompile.codegen import kv_attention, kv_tiling
from qcompile.codegen.tiling import Choice
from qcompile.formats.kv import (append_kv, as_token_blocks, as_token_major, kv_attention_reference, dequantize_kv,
                                 quantize_kv)
from qcompile.runtime import kv_ops  # registers qcompile::kv_attention


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64])
def test_kv_round_trip_within_half_a_step(bits, group):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 64) * torch.linspace(0.1, 4, 64)  # channels of different ranges
    codes, scale, zero = quantize_kv(x, bits, group)
    assert codes.dtype == torch.uint8 and codes.shape == (2, 3, 5, 64 if bits == 8 else 32)
    assert scale.shape == zero.shape == (2, 3, 5, 64 // group)
    err = (dequantize_kv(codes, scale, zero, bits) - x).abs().unflatten(-1, (-1, group)).amax(-1)
    assert (err <= scale * 0.5 + 1e-5 + scale.abs() * 1e-3).all()


@pytest.mark.parametrize("programs,length,waves,expect", [
    (8, 16384, 4, 64),  # 66 programs would want 4 tiles each: 64 of them cover the cache
    (8, 131072, 8, 128),  # past the old cap of 64: 8 programs an SM at batch 1
    (64, 16384, 8, 16),
    (8, 100, 8, 2),  # no more splits than tiles
])
def test_decode_splits_fill_the_sms_and_leave_none_empty(programs, length, waves, expect):
    got = kv_tiling.splits(programs, length, 64, waves, 132)
    chunk = triton.cdiv(triton.cdiv(length, got), 64) * 64  # the kernels' split, in whole tiles
    assert got == expect and (got - 1) * chunk < length


@pytest.mark.parametrize("int4,int4_rows,first", [(True, False, kv_tiling.INT4_KERNEL),
                                                  (False, True, kv_tiling.INT4_ROWS_KERNEL),
                                                  (True, True, kv_tiling.INT4_ROWS_KERNEL)])
def test_the_gluon_kernel_expected_fastest_is_timed_first(int4, int4_rows, first):
    """Both Gluon kernels are offered past 4 query rows a KV head, where the rows kernel is the
    faster: a tuning budget cut short times the first candidates alone."""
    got = kv_tiling.candidates(True, 16, 128, 4, 4, 2, 2, False, torch.device("cpu"), int4, int4_rows)
    assert got[0].kernel == first
    assert {c.kernel for c in got} >= {k for k, ok in ((kv_tiling.INT4_KERNEL, int4),
                                                      (kv_tiling.INT4_ROWS_KERNEL, int4_rows)) if ok}


def test_8_bit_codes_time_their_own_rows_tiles_first():
    """The rows kernel with 8-bit codes fits 6 programs an SM (shared memory), not the 8 of its
    4-bit tiles: its own tiles, then the Triton kernel's."""
    got = kv_tiling.candidates(True, 16, 128, 1, 8, 2, 2, False, torch.device("cpu"), False, True)
    rows = [c.config for c in got if c.kernel == kv_tiling.INT4_ROWS_KERNEL]
    assert rows == kv_tiling.INT8_ROWS_TILES and got[0].kernel == kv_tiling.INT4_ROWS_KERNEL
    assert max(c.kwargs["WAVES"] for c in rows) <= 6


def test_kv_arguments_are_checked():
    x = torch.randn(1, 1, 2, 64)
    with pytest.raises(ValueError, match="bits=3: allowed values for a KV cache are 4 and 8"):
        quantize_kv(x, 3, 32)
    with pytest.raises(ValueError, match="group=48: allowed values are even divisors of head_dim=64"):
        quantize_kv(x, 8, 48)


GPU_CONFIGS = [triton.Config({"BLOCK_T": bt, "WAVES": 2}, num_warps=w, num_stages=st)
               for bt, w, st in ((32, 4, 1), (64, 8, 3), (128, 4, 1), (128, 8, 3), (64, 1, 3))] + [
    triton.Config({"BLOCK_T": 128, "WAVES": 4, "REGS": 96}, num_warps=4, num_stages=1)]  # registers capped: spills


def cache(b, hkv, t, d, bits, group, dtype, device):
    k, v = (torch.randn(b, hkv, t, d, dtype=dtype, device=device) for _ in range(2))
    return quantize_kv(k, bits, group), quantize_kv(v, bits, group)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits, group", [(8, 64), (4, 32), (8, 8)])
@pytest.mark.parametrize("s, length", [(1, 1), (1, 37), (3, 80), (21, 50), (40, 40)])
def test_attention_kernel_matches_the_reference(dtype, bits, group, s, length, device, monkeypatch):
    """GQA (8 query heads on 2 KV heads), a cache longer than what is filled, several splits of
    the cache combined (some empty), S > 1 new tokens each seeing up to itself, and prefills
    (of a whole prompt, and of a chunk after 29 cached tokens) in several blocks of query rows;
    each tile configuration here (the interpreter's two; on a GPU, tiles of 32-128 tokens, 1, 4
    and 8 warps, 1 and 3 stages, and registers capped), the cache dequantized for torch's SDPA
    (a prefill's first choice), and the tuned op. The merge takes the splits one or two at a time
    here (its running maximum carried over several blocks of splits)."""
    monkeypatch.setattr(kv_ops, "COMBINE_ELEMENTS", 256)  # 2 splits of 4 rows x 32 channels, 1 of 16 rows
    torch.manual_seed(length)
    k, v = cache(2, 2, 80, 64, bits, group, dtype, device)
    q = torch.randn(2, 8, s, 64, dtype=dtype, device=device)
    ref = kv_attention_reference(q, k, v, bits, length)
    for config in kv_tiling.INTERPRETED if device == "cpu" else GPU_CONFIGS:
        assert_close(kv_ops._attention(q, k, v, length, bits, None, None, Choice("kv_attention", config)), ref, dtype)
    dequantized = Choice(kv_tiling.DEQUANT_SDPA, kv_tiling.DEQUANT_TILE)
    assert_close(kv_ops._attention(q, k, v, length, bits, None, None, dequantized), ref, dtype)
    assert_close(torch.ops.qcompile.kv_attention(q, *k, *v, length, bits), ref, dtype)
    rows = kv_ops._row_block(4 * s)
    decode = rows >= 4 * s
    chosen = kv_ops.chosen[kv_ops.tuning_key(bits, group, 64, rows, decode, 4, length, dtype, False)]
    if chosen.kernel == kv_tiling.DEQUANT_SDPA:
        assert not decode, "a decode step's candidates are the Triton kernel's tiles"
    else:
        tiles = {c.kwargs["BLOCK_T"] for c in kv_tiling.INTERPRETED} if device == "cpu" else {32, 64, 128}
        assert chosen.config.kwargs["BLOCK_T"] in tiles, "the tuner chose among the candidates"
    if device == "cpu" and not decode:
        assert chosen.kernel == kv_tiling.DEQUANT_SDPA, "untuned, a prefill takes its first candidate"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits, group", [(8, 64), (4, 32)])
def test_zero_points_with_a_fraction_are_kept(dtype, bits, group, device):
    """The op takes any (codes, scale, zero) that dequantize_kv does, as the pass matches that
    graph whoever quantized it: zeros between the integers (an unrounded -min / scale) shift
    the values by their fraction, which the kernel keeps (1024 + zero in fp16 would round it
    off), as the reference does. Codes of every value from 0 to the top."""
    torch.manual_seed(3)
    (kc, ks, kz), (vc, vs, vz) = cache(2, 2, 48, 64, bits, group, dtype, device)
    top = 2**bits - 1
    kc = torch.arange(kc.numel(), device=device).remainder(256).to(torch.uint8).view(kc.shape)
    k, v = (kc, ks, (kz + torch.rand_like(kz) * 0.9).clamp(max=top)), (vc, vs * 4, vz + 0.5)
    q = torch.randn(2, 4, 1, 64, dtype=dtype, device=device) * 4  # peaked: the shift shows in the output
    ref = kv_attention_reference(q, k, v, bits, 48)
    rounded = kv_attention_reference(q, (kc, ks, k[2].round()), (vc, vs * 4, v[2].round()), bits, 48)
    assert (ref - rounded).abs().max() > 0.05, "the fraction matters at this size"
    assert_close(torch.ops.qcompile.kv_attention(q, *k, *v, 48, bits), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits, group", [(8, 64), (4, 32)])
def test_k_and_v_codes_are_read_in_their_own_layouts(dtype, bits, group, device, monkeypatch):
    """V codes stored token-contiguous (the layout in which 8-bit codes reach the tensor cores
    along the tokens that p @ V sums over) and K codes a slice of a longer cache, each read
    through its own strides: no copy of either per call, and one fused append writes a new
    token into the token-contiguous V as append_kv writes it into the usual layout."""
    torch.manual_seed(4)
    (kc, ks, kz), (vc, vs, vz) = cache(2, 2, 60, 64, bits, group, dtype, device)
    k, v = (kc[:, :, :50], ks[:, :, :50], kz[:, :, :50]), (as_token_major(vc[:, :, :50]), vs[:, :, :50], vz[:, :, :50])
    assert not k[0].is_contiguous() and v[0].stride()[2:] == (1, 50)
    q = torch.randn(2, 4, 3, 64, dtype=dtype, device=device)
    ref = kv_attention_reference(q, k, v, bits, 50)

    def no_copy(self, *args, **kwargs):
        raise AssertionError("the op copied a cache tensor")
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "contiguous", no_copy)
        out = torch.ops.qcompile.kv_attention(q, *k, *v, 50, bits)
    assert_close(out, ref, dtype)
    new = torch.randn(2, 2, 1, 64, dtype=dtype, device=device)
    pos = torch.tensor([7], device=device)
    expect = tuple(t.clone() for t in v)
    append_kv(new, pos, *expect, bits)
    torch.ops.qcompile.kv_append(new, pos, *v, bits)
    assert all(torch.equal(a, b) for a, b in zip(v, expect))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits, group", [(8, 64), (8, 32), (4, 32)])
def test_v_codes_in_blocks_of_tokens_are_read_as_dequantize_kv_reads_them(dtype, bits, group, device):
    """V's codes in blocks of 8 tokens (as_token_blocks: token-contiguous within a block, each
    block one run), the interpreter's tiles of 16 or 32 tokens straddling blocks and the last
    one cut by the length: the op and the reference agree on what V holds."""
    torch.manual_seed(5)
    (kc, ks, kz), (vc, vs, vz) = cache(2, 2, 64, 64, bits, group, dtype, device)
    v = (as_token_blocks(vc, 8), vs, vz)
    assert v[0].shape == (2, 2, 8, 8, vc.shape[-1]) and v[0].stride()[2:] == (8 * vc.shape[-1], 1, 8)
    assert torch.equal(dequantize_kv(*v, bits), dequantize_kv(vc, vs, vz, bits))
    q = torch.randn(2, 4, 3, 64, dtype=dtype, device=device)
    ref = kv_attention_reference(q, (kc, ks, kz), (vc, vs, vz), bits, 50)
    assert_close(torch.ops.qcompile.kv_attention(q, kc, ks, kz, *v, 50, bits), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits, group", [(8, 64), (4, 32)])
@pytest.mark.parametrize("v_blocks", [False, True], ids=["rows", "v-in-blocks"])
def test_the_dequantized_cache_is_dequantize_kv_bit_for_bit(dtype, bits, group, v_blocks, device):
    """kv_dequant_kernel (a prefill's way to torch's SDPA) rounds as the reference does, bf16
    under the interpreter too; V in blocks of 8 tokens; a length off its 64-token tile."""
    torch.manual_seed(6)
    (kc, ks, kz), (vc, vs, vz) = cache(2, 3, 96, 64, bits, group, dtype, device)
    codes = as_token_blocks(vc, 8) if v_blocks else vc
    out = kv_ops._dequantized(codes, vs, vz, 70, bits, dtype, kv_tiling.DEQUANT_TILE)
    assert torch.equal(out, dequantize_kv(vc, vs, vz, bits)[:, :, :70].to(dtype))


@pytest.mark.parametrize("heads", [1, 4])
def test_a_decode_step_splits_only_what_the_mask_shows(heads, device, monkeypatch):
    """kv_live_kernel: per sequence, one past the last token the mask shows to any query (the
    written part of a static cache, here 37 and 5 of 100, in blocks the kernel scans apart);
    with more distinct mask rows than it scans (heads x new tokens > 32) the split covers it all."""
    seen = torch.arange(100, device=device) < torch.tensor([[37], [5]], device=device)  # [B, T]
    mask = seen[:, None, None, :].expand(2, heads, 2, 100).clone()
    mask[0, -1, 0, 36] = False  # one query sees less: the other still sees token 36
    additive = torch.zeros(mask.shape, device=device).masked_fill(~mask, float("-inf"))
    monkeypatch.setattr(kv_ops, "LIVE_SCAN", 64)  # blocks of 32 or 16 tokens
    live = kv_ops._live_ends(additive, 2, 100)
    assert live.shape[1] > 1, "several blocks of the mask scanned"
    assert live.amax(1).tolist() == [37, 5]
    assert kv_ops._live_ends(additive[:, :1].expand(2, 32, 2, 100).contiguous(), 2, 100) is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("mask_dtype", [torch.bool, "additive"])
@pytest.mark.parametrize("s", [2, 20])
@pytest.mark.parametrize("group", [16, 32])
def test_an_explicit_mask_decides_what_each_query_sees(dtype, mask_dtype, s, group, device):
    """As transformers' static cache calls SDPA: the whole cache length with a mask [B, 1, S, T]
    that hides the unwritten tail and here a hole, and its own softmax scale; a decode step of
    2 tokens (its cache split up to the last token the mask shows) and a prefill of 20 (two
    blocks of rows, skipping the tiles the mask hides); int4 codes in groups of 16 and of 32."""
    torch.manual_seed(5)
    k, v = cache(2, 2, 48, 32, 4, group, dtype, device)
    q = torch.randn(2, 4, s, 32, dtype=dtype, device=device)
    seen = torch.arange(48, device=device) <= torch.arange(32 - s, 32, device=device)[:, None]  # [S, T]
    seen = seen.expand(2, 1, s, 48).clone()
    seen[1, :, :, 5:9] = False
    mask = seen if mask_dtype == torch.bool else torch.zeros(seen.shape, dtype=dtype, device=device).masked_fill(
        ~seen, float("-inf"))
    out = torch.ops.qcompile.kv_attention(q, *k, *v, 48, 4, mask, 0.3)
    assert_close(out, kv_attention_reference(q, k, v, 4, 48, mask, 0.3), dtype)
    if s == 20:  # the op's prefill took the dequantized cache to SDPA: the Triton kernel's too
        triton_tile = Choice("kv_attention", kv_tiling.INTERPRETED[0] if device == "cpu" else kv_tiling.SMALLEST)
        assert_close(kv_ops._attention(q, k, v, 48, 4, mask, 0.3, triton_tile),
                     kv_attention_reference(q, k, v, 4, 48, mask, 0.3), dtype)
    assert not torch.allclose(out, kv_attention_reference(q, k, v, 4, 48, None, 0.3)), "the mask matters"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits, group", [(8, 32), (4, 16)])
def test_append_quantizes_and_writes_new_tokens_as_the_reference(dtype, bits, group, device):
    """The fused append gives quantize_kv's codes, scales and zeros bit for bit at the given
    positions (states transposed, as attention layers pass them) and leaves the rest alone."""
    torch.manual_seed(3)
    states = (torch.randn(2, 19, 3, 64, dtype=dtype, device=device) * 4).transpose(1, 2)  # [B, H, S, D]
    position = torch.arange(5, 24, device=device)
    codes = torch.full((2, 3, 32, 64 * bits // 8), 7, dtype=torch.uint8, device=device)
    scale, zero = (torch.full((2, 3, 32, 64 // group), 9.0, dtype=dtype, device=device) for _ in range(2))
    torch.ops.qcompile.kv_append(states, position, codes, scale, zero, bits)
    for got, want, fill in zip((codes, scale, zero), quantize_kv(states, bits, group), (7, 9, 9)):
        assert torch.equal(got[:, :, 5:24], want)
        assert (got[:, :, :5] == fill).all() and (got[:, :, 24:] == fill).all()


def test_caches_past_2_to_the_31_elements(device, monkeypatch):
    """Codes whose two sequences lie 2^31 bytes apart (the memory between never touched): the
    batch's offsets are int64, so the kernels read and append there as the reference does. A
    sequence that itself spans 2^31 elements (int32 offsets within one) gets the reference, and
    the append append_kv, no kernel launched."""
    torch.manual_seed(0)
    k, v = (quantize_kv(torch.randn(2, 2, 64, 64, device=device), 8, 64) for _ in range(2))
    far = torch.empty_strided((2, 2, 64, 64), (2**31, 64 * 64, 64, 1), dtype=torch.uint8, device=device)
    k = (far.copy_(k[0]), *k[1:])
    q = torch.randn(2, 4, 1, 64, device=device)
    assert kv_ops.span_unsupported_reason(q, *k, *v) is None
    assert_close(torch.ops.qcompile.kv_attention(q, *k, *v, 64, 8), kv_attention_reference(q, k, v, 8, 64),
                 torch.float32)
    states, position = torch.randn(2, 2, 1, 64, device=device), torch.tensor([40], device=device)
    want = [t.clone() for t in k]
    append_kv(states, position, *want, 8)
    torch.ops.qcompile.kv_append(states, position, *k, 8)
    for got, ref in zip(k, want):
        assert torch.equal(got, ref)
    long = torch.empty_strided((1, 2, 64, 64), (2 * 2**31, 2**31, 64, 1), dtype=torch.uint8, device=device)
    k = (long.copy_(k[0][:1]), k[1][:1], k[2][:1])
    v, q = tuple(t[:1] for t in v), q[:1]
    assert "int32" in kv_ops.span_unsupported_reason(q, *k)
    monkeypatch.setattr(kv_ops, "_attention", lambda *args: pytest.fail("a kernel launched"))
    assert_close(torch.ops.qcompile.kv_attention(q, *k, *v, 64, 8), kv_attention_reference(q, k, v, 8, 64),
                 torch.float32)
    monkeypatch.setattr(kv_ops, "kv_append_kernel", None)  # launching it would fail
    torch.ops.qcompile.kv_append(states[:1], position, *k, 8)


def test_append_past_the_cache_names_the_allowed_positions():
    states = torch.randn(1, 2, 2, 32)
    codes = torch.zeros(1, 2, 4, 32, dtype=torch.uint8)
    scale, zero = torch.zeros(1, 2, 4, 1), torch.zeros(1, 2, 4, 1)
    with pytest.raises(IndexError, match=r"position holds 3..4, allowed values are 0..3"):
        torch.ops.qcompile.kv_append(states, torch.tensor([3, 4]), codes, scale, zero, 8)
    assert not codes.any(), "nothing written"


@pytest.mark.parametrize("d, k_group, v_group", [(96, 32, 32), (64, 32, 16)], ids=["head_dim-96", "groups-differ"])
def test_shapes_the_kernel_cannot_take_get_the_reference(d, k_group, v_group, device):
    """head_dim 96 (not a power of two) and K and V in different groups: the op answers with
    the reference instead of failing in Triton, and a compiled dequantize + SDPA over such a
    cache is left to Inductor, the reason recorded."""
    torch.manual_seed(0)
    k = quantize_kv(torch.randn(1, 2, 24, d, device=device), 8, k_group)
    v = quantize_kv(torch.randn(1, 2, 24, d, device=device), 8, v_group)
    q = torch.randn(1, 4, 1, d, device=device)
    assert kv_ops.shape_unsupported_reason(d, d // k_group, d // v_group)
    assert_close(torch.ops.qcompile.kv_attention(q, *k, *v, 24, 8), kv_attention_reference(q, k, v, 8, 24),
                 torch.float32)

    def attend(q, kc, ks, kz, vc, vs, vz):
        kv = (dequantize_kv(kc, ks, kz, 8).to(q.dtype), dequantize_kv(vc, vs, vz, 8).to(q.dtype))
        return torch.nn.functional.scaled_dot_product_attention(q, *kv)

    q4 = q[:, :2]  # as many query heads as KV heads: SDPA without GQA
    torch._dynamo.reset()
    with qcompile.backend.listen(qcompile.Report()) as report:
        out = torch.compile(attend, backend="qcompile")(q4, *k, *v)
    assert not report.matched and len(report.fallbacks) == 1, str(report)
    assert ("head_dim=96" if d == 96 else "K in 2 scale groups and V in 4") in report.fallbacks[0].reason
    assert_close(out, kv_attention_reference(q4, k, v, 8, 24), torch.float32)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_an_unknown_dequantization_of_codes_is_reported(dynamic, device):
    """SDPA over K and V made from uint8 codes other than by formats.kv (here a scale and no
    zero point) is left to Inductor with the reason recorded, not passed over in silence: so
    a cache layout the pass misses shows in explain() (8-bit V in several blocks of tokens
    once did, unreported). Dynamic shapes put sizes among the graph's inputs."""
    k, v = (quantize_kv(torch.randn(1, 2, 24, 64, device=device), 8, 64) for _ in range(2))
    q = torch.randn(1, 2, 1, 64, device=device)

    def attend(q, kc, ks, vc, vs):
        return torch.nn.functional.scaled_dot_product_attention(q, kc.to(q.dtype) * ks, vc.to(q.dtype) * vs)

    torch._dynamo.reset()
    with qcompile.backend.listen(qcompile.Report()) as report:
        out = torch.compile(attend, backend="qcompile", dynamic=dynamic)(q, k[0], k[1], v[0], v[1])
    assert not report.matched and len(report.fallbacks) == 1, str(report)
    reason = report.fallbacks[0].reason
    assert re.fullmatch(r"K computed from uint8 codes \(.+\), not as formats\.kv\.dequantize_kv; "
                        r"V computed from uint8 codes \(.+\), not as formats\.kv\.dequantize_kv", reason), reason
    assert dynamic or "(1, 2, 24, 64)" in reason  # dynamic: the sizes' symbols
    assert_close(out, attend(q, k[0], k[1], v[0], v[1]), torch.float32)


@triton.jit
def _nibbles_kernel(byte_ptr, low_ptr, high_ptr, DEQ: tl.constexpr, N: tl.constexpr):
    byte = tl.load(byte_ptr + tl.arange(0, N))
    low, high = kv_attention._biased_nibbles(byte, DEQ)
    tl.store(low_ptr + tl.arange(0, N), low)
    tl.store(high_ptr + tl.arange(0, N), high)


@pytest.mark.parametrize("dtype, bias", [(torch.float16, 1024), (torch.bfloat16, 128)], ids=str)
def test_nibbles_become_a_power_of_two_plus_the_nibble(dtype, bias, device):
    """Each byte's two nibbles as 2^e + nibble in the dots' dtype, exactly: the bit operations the
    4-bit codes take instead of an integer-to-float conversion (PTX on a GPU, integer arithmetic
    under the interpreter), for every byte value."""
    byte = torch.arange(256, dtype=torch.uint8, device=device)
    low, high = (torch.empty(256, dtype=dtype, device=device) for _ in range(2))
    _nibbles_kernel[(1,)](byte, low, high, DEQ={torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype],
                          N=256)
    assert torch.equal(low.float(), (byte & 15).float() + bias)
    assert torch.equal(high.float(), (byte >> 4).float() + bias)


def test_a_gluon_int4_choice_for_a_step_it_cannot_take_is_refused(device):
    """The benchmark hands _attention its own choices: the Gluon kernel's, for a step it cannot
    take (32 query rows a KV head; on CPU, where the interpreter's blocks hold 16 rows, a
    prefill), raises before any launch."""
    k, v = cache(1, 2, 64, 128, 4, 32, torch.float16, device)
    q = torch.randn(1, 64, 1, 128, dtype=torch.float16, device=device)
    gluon = Choice(kv_tiling.INT4_KERNEL, kv_tiling.INT4_TILES[0])
    with pytest.raises(ValueError, match=r"the Gluon int4 kernel cannot take this step \((32 query rows|a prefill)"):
        kv_ops._attention(q, k, v, 64, 4, None, None, gluon)
