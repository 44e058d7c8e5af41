"""A tiny random transformers Llama (2 layers, GQA) quantized and compiled end to end."""
import pytest
import torch

import qcompile
from qcompile.runtime import ops
from conftest import DTYPES, assert_close

transformers = pytest.importorskip("transformers")


def tiny_llama(dtype, device):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


@pytest.mark.parametrize("dtype", DTYPES[:2], ids=str)
def test_tiny_llama_compiles_with_every_quantized_linear_matched(dtype, device):
    model = tiny_llama(dtype, device)
    qcompile.quantize(model, bits=4, group_size=32, config={"*.mlp.*": {"bits": 3, "format": "bipolar"}})
    n_quantized = sum(isinstance(m, qcompile.QuantLinear) for m in model.modules())
    assert n_quantized == 2 * 7 + 1  # q k v o gate up down per layer, and lm_head
    ids = torch.randint(0, 128, (2, 7), device=device)
    with torch.no_grad():
        report = qcompile.explain(model, ids, use_cache=False)
        compiled = torch.compile(model, backend="qcompile")
        out = compiled(ids, use_cache=False).logits
        ops.launches.clear()
        compiled(ids, use_cache=False)
        ref = model(ids, use_cache=False).logits
    assert len(report.matched) == n_quantized and not report.fallbacks, str(report)
    # q k v, and gate up, run as one kernel each: o, down and lm_head alone
    assert [f.columns for f in report.fused] == [[64, 32, 32], [96, 96]] * 2, str(report)
    assert sum(ops.launches.values()) == 2 * 4 + 1
    assert sorted({(m.format, m.bits) for m in report.matched}) == [("affine", 4), ("bipolar", 3)]
    assert report.graph_breaks == 0 and report.graphs == 1
    assert_close(out, ref, dtype)


def test_regional_compilation_traces_one_layer_for_all(device):
    """compile_regions: the decoder layers share one graph (one Dynamo trace and one qcompile
    rewrite for the whole stack), and the logits equal the eager model's."""
    from torch._dynamo.utils import counters
    model = tiny_llama(torch.float16, device)
    model.config.num_hidden_layers = 3
    layer = type(model.model.layers[0])(model.config, 2)
    model.model.layers.append(layer.to(device=device, dtype=torch.float16).eval())
    qcompile.quantize(model, bits=4, group_size=32, skip=["lm_head"])
    assert qcompile.regional.repeated_blocks(model) == list(model.model.layers)
    ids = torch.randint(0, 128, (1, 5), device=device)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        with qcompile.backend.listen(qcompile.Report()) as report:
            out = qcompile.compile_regions(model)(ids, use_cache=False).logits
    assert counters["stats"]["unique_graphs"] == 1
    assert len(report.matched) == 7, str(report)  # one layer's q k v o gate up down, once
    assert_close(out, ref, torch.float16)
    with pytest.raises(ValueError, match="no nn.ModuleList"):
        qcompile.compile_regions(torch.nn.Linear(4, 4))
