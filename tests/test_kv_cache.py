"""qcompile.kv_cache.QuantizedStaticCache in a tiny transformers Llama: what a layer stores and
returns, generate() with it, and a compiled decode loop that gives eager's tokens."""
import pytest
import torch

import qcompile
from conftest import assert_close
from qcompile.formats.kv import dequantize_kv, quantize_kv
from qcompile.runtime.device import kernel_unavailable_reason

transformers = pytest.importorskip("transformers")
from qcompile.kv_cache import QuantizedStaticCache, QuantizedStaticLayer  # noqa: E402
from test_llama import tiny_llama  # noqa: E402


@pytest.mark.parametrize("bits, group", [(8, 16), (4, 8)])
def test_a_layer_stores_codes_and_returns_them_dequantized(bits, group):
    torch.manual_seed(0)
    layer = QuantizedStaticLayer(max_cache_len=10, bits=bits, group=group)
    k1, v1, k2, v2 = (torch.randn(2, 3, t, 16, dtype=torch.float16) for t in (4, 4, 1, 1))
    layer.update(k1, v1)
    k, v = layer.update(k2, v2)  # the next position comes from the layer's own count
    assert int(layer.get_seq_length()) == 5
    t = 64 if bits == 8 else 10  # 8-bit: whole blocks of 64 tokens, which the mask then covers
    assert layer.max_cache_len == t and layer.get_mask_sizes() == (t, 0)
    assert layer.keys.dtype == torch.uint8 and layer.keys.shape == (2, 3, t, 16 * bits // 8)
    assert layer.keys.is_contiguous()
    if bits == 8:  # V token-contiguous (the order of p @ V) in one block of 64 tokens
        assert layer.values.shape == (2, 3, 1, 64, 16) and layer.values.stride()[2:] == (1024, 1, 64)
    else:
        assert layer.values.shape == layer.keys.shape and layer.values.stride()[2:] == (8, 1)
    for got, new in ((k, torch.cat((k1, k2), 2)), (v, torch.cat((v1, v2), 2))):
        assert torch.equal(got[:, :, :5], dequantize_kv(*quantize_kv(new, bits, group), bits))
        assert not got[:, :, 5:].any()
    k, _ = layer.update(k2 * 2, v2, {"cache_position": torch.tensor([7])})  # a position the model gives
    assert torch.equal(k[:, :, 7:8], dequantize_kv(*quantize_kv(k2 * 2, bits, group), bits))
    assert int(layer.get_seq_length()) == 8
    # per token and head: the codes, and an fp16 scale and zero per group; fp16 K and V take 2 * 32 bytes
    assert layer.memory_bytes() == 2 * 2 * 3 * t * (16 * bits // 8 + 2 * 2 * 16 // group)
    assert layer.memory_bytes() <= 2 * 2 * 3 * t * 32 * (0.625 if bits == 8 else 0.5)


@pytest.mark.parametrize("bits", [8, 4])
def test_beam_search_reorders_every_buffer_in_place(bits):
    """reorder_cache (beam search) moves each beam's codes, scales and zeros, V's blocks of
    tokens included, and keeps the buffers' addresses, which compiled steps hold."""
    torch.manual_seed(1)
    layer = QuantizedStaticLayer(max_cache_len=10, bits=bits, group=8)
    k, v = layer.update(*(torch.randn(3, 2, 4, 16, dtype=torch.float16) for _ in range(2)))
    k, v = k.clone(), v.clone()
    addresses = [t.data_ptr() for t in layer._buffers()]
    beams = torch.tensor([2, 0, 0])
    layer.reorder_cache(beams)
    assert [t.data_ptr() for t in layer._buffers()] == addresses
    assert torch.equal(dequantize_kv(layer.keys, layer.key_scale, layer.key_zero, bits), k[beams])
    assert torch.equal(dequantize_kv(layer.values, layer.value_scale, layer.value_zero, bits), v[beams])


def test_the_default_group_is_the_head_for_int8_and_32_channels_for_int4():
    """int8's whole-head groups take the kernel's path that scales the dots, not each code."""
    config = transformers.LlamaConfig(hidden_size=512, num_attention_heads=4, num_hidden_layers=2)  # head_dim 128
    assert [layer.group for layer in QuantizedStaticCache(config, 8).layers] == [128, 128]
    assert [layer.group for layer in QuantizedStaticCache(config, 8, bits=4).layers] == [32, 32]
    assert QuantizedStaticCache(config, 8, bits=8, group=64).layers[0].group == 64
    layer = QuantizedStaticLayer(max_cache_len=64, bits=8)  # a layer alone: once it sees the head size
    layer.update(*(torch.randn(1, 2, 3, 64) for _ in range(2)))
    assert layer.group == 64 and layer.key_scale.shape == (1, 2, 64, 1)
    small = tiny_llama(torch.float32, "cpu").config  # head_dim 16: int4 groups of the whole head
    assert QuantizedStaticCache(small, 8, bits=4).layers[0].group == 16


def test_bad_arguments_name_what_is_allowed():
    model = tiny_llama(torch.float32, "cpu")
    with pytest.raises(ValueError, match="bits=3: allowed values for a KV cache are 4 and 8"):
        QuantizedStaticCache(model.config, 16, bits=3)
    with pytest.raises(ValueError, match="group=12: allowed values are even divisors of head_dim=16"):
        QuantizedStaticCache(model.config, 16, group=12)


def _greedy(forward, model, ids, steps, cache):
    """Prefill, then ``steps`` one-token steps through ``forward`` (compiled or not): the tokens,
    and the logits of the prefill's last position and of the last step."""
    p = ids.shape[1]
    with torch.no_grad():
        logits = model(ids, past_key_values=cache, cache_position=torch.arange(p, device=ids.device),
                       use_cache=True).logits[:, -1]
        tokens, first, last = [logits.argmax(-1, keepdim=True)], logits, logits
        for i in range(steps):
            out = forward(tokens[-1], past_key_values=cache, cache_position=torch.tensor([p + i], device=ids.device),
                          use_cache=True)
            last = out.logits[:, -1]
            tokens.append(last.argmax(-1, keepdim=True))
    return torch.cat(tokens, 1), first, last


@pytest.mark.parametrize("bits, group", [(8, None), (4, 8), (4, None)])
def test_generate_and_a_compiled_decode_loop_agree_with_eager(bits, group, device):
    """generate() runs on the cache; the compiled decode steps (qcompile backend) read and write
    the same buffers, in the attention kernel that reads the codes, and give eager's tokens;
    int8 prefill logits stay close to an fp32 cache. int8 in its default whole-head groups (the
    kernel's path that scales the dots, V stored token-contiguous in two blocks of 64 tokens: a
    cache of several blocks comes to the pass as a copy to flatten, one of one block did not),
    int4 in groups of 8 and in whole heads (its smallest cache)."""
    length = 80  # int8 rounds it up to 128: two blocks of V
    model = tiny_llama(torch.float32, device)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1)).to(device)
    eager, logits, eager_last = _greedy(model, model, ids, 5, QuantizedStaticCache(model.config, length, bits=bits,
                                                                                     group=group))
    if bits == 8:
        _, fp_logits, _ = _greedy(model, model, ids, 0, transformers.StaticCache(config=model.config, max_cache_len=16))
        assert_close(logits, fp_logits, torch.bfloat16)  # int8 K/V: within bf16's tolerance of an fp32 cache
    with torch.no_grad():
        cache = QuantizedStaticCache(model.config, length, bits=bits, group=group)
        generated = model.generate(ids, past_key_values=cache, max_new_tokens=6, do_sample=False)
    assert torch.equal(generated[:, 6:], eager)
    if reason := kernel_unavailable_reason(torch.device(device)):
        pytest.skip(reason)
    torch._dynamo.reset()
    with qcompile.backend.listen(qcompile.Report()) as report:
        compiled, _, compiled_last = _greedy(torch.compile(model, backend="qcompile"), model, ids, 5,
                                             QuantizedStaticCache(model.config, length, bits=bits, group=group))
    assert torch.equal(compiled, eager)
    assert_close(compiled_last, eager_last, torch.float32)
    # each layer's SDPA over the dequantized cache became the kernel reading the codes
    assert [(m.kind, m.bits, m.group_size) for m in report.matched] == [("kv_attention", bits, group or 16)] * 2, \
        str(report)


def test_a_compiled_prefill_reads_the_codes_in_blocks_of_query_rows(device):
    """A 20-token prompt compiled on a fresh cache of 24 (40 query rows per KV head: several
    blocks of rows). transformers attends to the cache's first 20 tokens, causally, through a
    slice of the dequantized cache (5.24), or to all 24 with a mask hiding the last 4 (5.17);
    each layer's attention becomes the KV kernel, reading the codes the fused append wrote,
    and the logits are eager's."""
    if reason := kernel_unavailable_reason(torch.device(device)):
        pytest.skip(reason)
    model = tiny_llama(torch.float32, device)
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        eager = model(ids, past_key_values=QuantizedStaticCache(model.config, 24, bits=4, group=8),
                      use_cache=True).logits
        torch._dynamo.reset()
        with qcompile.backend.listen(qcompile.Report()) as report:
            compiled = torch.compile(model, backend="qcompile")(
                ids, past_key_values=QuantizedStaticCache(model.config, 24, bits=4, group=8), use_cache=True).logits
    found = [(m.kind, m.shapes["S"], m.shapes["T"]) for m in report.matched]
    assert found in ([("kv_attention", 20, 20)] * 2, [("kv_attention", 20, 24)] * 2), str(report)
    assert_close(compiled, eager, torch.float32)
