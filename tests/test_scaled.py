"""Activation-quantized formats (w8a8: int8, fp8: float8 e4m3): the scaled GEMM op against the
float reference, and torch.compile of their modules (the specification) against eager."""
import pytest
import torch
from torch import nn

import qcompile
from qcompile.backend import listen
from conftest import DTYPES, TOL as TOL_MODEL
from qcompile.formats import ACTIVATION_FORMATS
from qcompile.formats.packing import unpack_fields
from qcompile.formats.scaled import quantize_rows
from qcompile.runtime.ops import launches

CODES = {"w8a8": torch.int8, "fp8": torch.float8_e4m3fn}
# Error relative to the output's range. int8 accumulates exactly in int32, so only the output's
# rounding (half a unit in its last place) shows; Hopper's fp8 tensor cores add their products
# with fewer mantissa bits than float32 (H100: 7.5e-5 seen at K=17), hence FP8_MMA on a GPU.
TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
FP8_MMA = 3e-4


def random_codes(shape, dtype, device):
    return torch.randn(shape, device=device).mul(40).clamp(-127, 127).to(dtype)


@pytest.mark.parametrize("m, k, group, n", [(1, 40, 8, 24), (3, 200, 40, 33), (37, 64, 64, 17)])
def test_w4a8_mm_rebuilds_the_int8_weight_in_the_kernel(m, k, group, n, device):
    torch.manual_seed(m)
    model = nn.Sequential(nn.Linear(k, n))
    qcompile.quantize(model, format="w4a8", group_size=group)
    q = model[0].to(device)
    a, row = random_codes((m, k), torch.int8, device), torch.rand(m, device=device)
    launches.clear()
    out = torch.ops.qcompile.w4a8_mm(a, q.qweight, q.zero, q.scale_int, row, q.channel_scale, q.bias, torch.float32)
    ref = (a.double() @ q.int8_weight().double()) * row.double()[:, None] * q.channel_scale.double() + q.bias.double()
    assert (out.double() - ref).abs().max() / ref.abs().max() <= 1e-6
    assert launches == {("scaled", "w4a8", 4): 1}


@pytest.mark.parametrize("fmt", CODES)
@pytest.mark.parametrize("m, k, n", [(1, 40, 24), (3, 100, 33), (37, 64, 17)])
@pytest.mark.parametrize("scales, out_dtype", [("row,col", torch.float32), ("row,col,bias", torch.float16),
                                               ("row", torch.bfloat16), ("none", torch.float32),
                                               ("row,tensor", torch.float16)])
def test_scaled_mm_against_the_float_product(fmt, m, k, n, scales, out_dtype, device):
    torch.manual_seed(m)
    a, w = random_codes((m, k), CODES[fmt], device), random_codes((n, k), CODES[fmt], device)  # w: [N, K]
    row = torch.rand(m, device=device) if "row" in scales else None
    col = (torch.rand(n, device=device) if "col" in scales
           else torch.rand(1, device=device) if "tensor" in scales else None)
    launches.clear()
    bias = torch.randn(n, device=device) if "bias" in scales else None
    out = torch.ops.qcompile.scaled_mm(a, w.t(), row, col, bias, out_dtype)
    ref = a.double() @ w.double().t() * (1 if row is None else row.double()[:, None]) * (1 if col is None else col.double())
    ref = ref if bias is None else ref + bias.double()
    assert out.dtype == out_dtype
    err = (out.double() - ref.to(out_dtype).double()).abs().max() / ref.abs().max()
    assert err <= TOL[out_dtype] + (FP8_MMA if fmt == "fp8" and device == "cuda" else 0)
    assert launches == {("scaled", fmt, 8): 1}


@pytest.mark.parametrize("fmt", CODES)
def test_quantize_checks_the_fixed_arguments_and_rounds_within_half_a_step(fmt):
    model = nn.Sequential(nn.Linear(64, 8))
    with pytest.raises(ValueError, match=f"bits=4 with format='{fmt}': the allowed value is 8"):
        qcompile.quantize(model, bits=4, format=fmt)
    with pytest.raises(ValueError, match=f"group_size=32 with format='{fmt}': the allowed value is -1"):
        qcompile.quantize(model, group_size=32, format=fmt)
    with pytest.raises(ValueError, match="allowed values are 'affine', 'symmetric', 'bipolar', 'bcq', 'w8a8', 'fp8'"):
        qcompile.quantize(model, format="int4")
    lin = model[0]
    qcompile.quantize(model, format=fmt, bits=8, group_size=-1)
    q = model[0]
    assert isinstance(q, ACTIVATION_FORMATS[fmt]) and q.qweight.dtype == CODES[fmt] and q.scale.shape == (8,)
    err = (q.dequantize() - lin.weight).abs() / lin.weight.abs().amax(1, keepdim=True)
    assert err.max() <= (0.5 / 127 if fmt == "w8a8" else 2 ** -4) * 1.01  # e4m3: 3 mantissa bits
    codes, scale = quantize_rows(torch.tensor([[0.0, 1.0, -2.0]]), CODES[fmt])
    assert codes.float().abs().max() == (127 if fmt == "w8a8" else 448) and scale.item() > 0


def test_weight_scale_per_tensor_is_one_value_and_checked():
    model = nn.Sequential(nn.Linear(64, 8), nn.Linear(8, 8))
    lin = model[0]
    with pytest.raises(ValueError, match="weight_scale='row' with format='fp8': allowed values are 'channel', 'tensor'"):
        qcompile.quantize(model, format="fp8", weight_scale="row")
    with pytest.raises(ValueError, match="weight_scale='tensor' with format='affine'.*'w8a8', 'fp8' only"):
        qcompile.quantize(model, weight_scale="tensor")
    qcompile.quantize(model, format="fp8", weight_scale="tensor", config={"1": {"format": "affine", "group_size": 8}})
    q = model[0]
    assert q.scale.shape == (1,) and isinstance(model[1], qcompile.QuantLinear)
    assert q.qweight.float().abs().max() == 448  # the largest weight takes e4m3's largest value
    err = (q.dequantize() - lin.weight).abs().max() / lin.weight.abs().max()
    assert err <= 2 ** -4 * 1.01


class TwoLayers(nn.Module):
    def __init__(self, fmt, dtype, device, weight_scale="channel"):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(96, 40), nn.Linear(40, 24, bias=False)
        self.to(dtype)
        qcompile.quantize(self, format=fmt, weight_scale=weight_scale)
        self.to(device)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("fmt, weight_scale", [("w8a8", "channel"), ("fp8", "channel"), ("fp8", "tensor")])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compiled_matches_eager_with_one_scaled_gemm_per_layer(fmt, weight_scale, dtype, device):
    model = TwoLayers(fmt, dtype, device, weight_scale)
    compiled = torch.compile(model, backend="qcompile")
    for shape in [(3, 96), (1, 96), (2, 5, 96)]:
        x = torch.randn(shape, dtype=dtype, device=device)
        with torch.no_grad():
            if shape == (3, 96):
                report = qcompile.explain(model, x)
                assert [(m.kind, m.format) for m in report.matched] == [("scaled_linear", fmt)] * 2, str(report)
                assert not report.fallbacks, str(report)
                kernels = [m.kernel for m in report.matched]  # the bias, where there is one, and the cast folded in
                cast = "" if dtype == torch.float32 else "," + str(dtype).replace("torch.", "")  # fp32: no cast
                assert kernels == [f"scaled_mm[row,col,bias{cast}]", f"scaled_mm[row,col{cast}]"], kernels
            launches.clear()
            out, ref = compiled(x), model(x)
        assert launches == {("scaled", fmt, 8): 2}
        # Layer a's output may differ from eager's by one bf16 unit (the kernel's float32 sum is
        # not torch's); layer b's e4m3 activation quantization can turn that into a code step
        # (1/8 relative), so fp8 in bf16 is held to 6e-2 instead of 3e-2.
        err = (out.float() - ref.float()).abs().max() / ref.float().abs().max()
        assert err <= (6e-2 if (fmt, dtype) == ("fp8", torch.bfloat16) else TOL_MODEL[dtype]), err


def test_8bit_operands_cast_to_half_fall_back_with_a_reason(device):
    w = torch.randint(-127, 128, (8, 32), dtype=torch.int8, device=device)

    def f(x):
        return x.to(torch.int8).half() @ w.half().t()
    x = torch.randint(-5, 5, (4, 32), device=device).half()
    report = qcompile.explain(f, x)
    assert not report.matched and len(report.fallbacks) == 1, str(report)
    assert "converted to torch.float16" in report.fallbacks[0].reason
    assert torch.equal(torch.compile(f, backend="qcompile")(x), f(x))


def test_outlier_threshold_is_checked():
    model = nn.Sequential(nn.Linear(64, 8))
    for kw, message in [(dict(format="fp8", outlier_threshold=6.0), "is for format='w8a8' only"),
                        (dict(format="w8a8", outlier_threshold=0), "allowed values are positive numbers"),
                        (dict(outlier_threshold=6.0), "outlier_threshold applies to 'w8a8' only")]:
        with pytest.raises(ValueError, match=message):
            qcompile.quantize(model, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_llm_int8_outlier_features_take_the_16_bit_path_compiled_as_eager(dtype, device):
    """Two input features 40-60x larger than the rest: without the split they set every row's
    int8 scale and the other features lose their precision; with it they go through a 16-bit
    matmul. Compiled, the int8 part is one scaled GEMM (bias folded) and the outlier matmul
    stays with Inductor. Its weight rows are gathered by an index computed from x, so it is no
    stored quantized weight and no fallback, also where x comes from an embedding's integer ids
    (which once made it look like an unmatched integer subgraph)."""
    torch.manual_seed(0)
    dense = nn.Linear(256, 48).to(dtype=dtype, device=device)
    x = torch.randn(2, 3, 256, dtype=dtype, device=device)
    x[..., 7] *= 60
    x[..., 100] *= -40
    exact = dense(x).float()
    errors = {}
    for threshold in (None, 6.0):
        model = nn.Sequential(nn.Linear(256, 48).to(dtype=dtype, device=device))
        model[0].load_state_dict(dense.state_dict())
        qcompile.quantize(model, format="w8a8", outlier_threshold=threshold)
        with torch.no_grad():
            ref = model(x)
            errors[threshold] = ((ref.float() - exact).abs().max() / exact.abs().max()).item()
            if threshold is None:
                continue
            report = qcompile.explain(model, x)
            embedded = nn.Sequential(nn.Embedding(16, 256).to(dtype=dtype, device=device), model[0])
            from_ids = qcompile.explain(embedded, torch.arange(5, device=device)[None])
            launches.clear()
            out = torch.compile(model, backend="qcompile")(x)
        assert [m.kernel for m in report.matched] == ["scaled_mm[row,col,bias]"], str(report)
        assert not report.fallbacks, str(report)
        assert len(from_ids.matched) == 1 and not from_ids.fallbacks, str(from_ids)
        assert launches == {("scaled", "w8a8", 8): 1}
        assert ((out.float() - ref.float()).abs().max() / ref.float().abs().max()) <= TOL_MODEL[dtype]
    assert errors[6.0] * 3 < errors[None], errors


def test_w4a8_rebuilds_int8_weights_in_range_and_checks_its_arguments():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 48))
    for kw, message in [(dict(bits=8), "bits=8 with format='w4a8': the allowed value is 4"),
                        (dict(weight_scale="tensor"), "allowed values are 'channel'"),
                        (dict(group_size=100), "group_size=100 does not divide")]:
        with pytest.raises(ValueError, match=message):
            qcompile.quantize(model, format="w4a8", **kw)
    lin = model[0]
    model[0].weight.data[3, 5] = 1.0  # one large weight: its row's int8 codes reach the protected range
    qcompile.quantize(model, format="w4a8")
    q = model[0]
    assert q.group_size == 128 and q.scale_int.dtype == q.zero.dtype == torch.uint8
    w8 = q.int8_weight()
    assert w8.dtype == torch.int8 and w8.shape == (256, 48)
    # the same product in int32: nothing wrapped around in the cast to int8
    codes = unpack_fields(q.qweight, 4, 256).reshape(2, 128, 48)
    w32 = ((codes - q.zero.int().unsqueeze(1)) * q.scale_int.int().unsqueeze(1)).reshape(256, 48)
    assert w32.abs().max() <= 127 and torch.equal(w32.to(torch.int8), w8)
    # error: half an int8 step, plus one 4-bit step (scale_int int8 units; the top code may clamp)
    bound = q.channel_scale[:, None] * (0.5 + q.scale_int.float().t().repeat_interleave(128, 1))
    assert ((q.dequantize() - lin.weight.detach()).abs() <= bound * 1.001).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_w4a8_compiles_to_one_fused_int8_gemm_per_layer(dtype, device):
    """The int8 weight's rebuilding from 4-bit codes is found in the graph and moves into the
    scaled GEMM (w4a8_mm), with the int8 product and its scales."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 48), nn.ReLU(), nn.Linear(48, 16, bias=False)).to(dtype)
    qcompile.quantize(model, format="w4a8", config={"2": {"format": "w4a8", "group_size": 16}})
    model.to(device)
    x = torch.randn(2, 3, 256, dtype=dtype, device=device)
    with torch.no_grad():
        report = qcompile.explain(model, x)
        launches.clear()
        out, ref = torch.compile(model, backend="qcompile")(x), model(x)
    cast = "" if dtype == torch.float32 else "," + str(dtype).replace("torch.", "")
    assert [(m.format, m.group_size, m.kernel) for m in report.matched] == [
        ("w4a8", 128, f"w4a8_mm[row,col,bias{cast}]"), ("w4a8", 16, f"w4a8_mm[row,col{cast}]")], str(report)
    assert launches == {("scaled", "w4a8", 4): 2}
    err = (out.float() - ref.float()).abs().max() / ref.float().abs().max()
    assert err <= (6e-2 if dtype == torch.bfloat16 else TOL_MODEL[dtype]), err
    # with symbolic sizes (x's included) the weight's rebuilding is still found
    dynamic = qcompile.Report()
    torch._dynamo.reset()  # or an earlier test's graph of nn.Sequential.forward is reused, uncompiled
    with listen(dynamic), torch.no_grad():
        torch.compile(model, backend="qcompile", dynamic=True)(x)
    assert [m.kernel for m in dynamic.matched] == [m.kernel for m in report.matched], str(dynamic)


def test_a_w4a8_matcher_error_keeps_the_int8_gemm(monkeypatch, device):
    import qcompile.passes.scaled_linear as pass_module

    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(pass_module, "find_w4a8", broken)
    model = nn.Sequential(nn.Linear(64, 24))
    qcompile.quantize(model, format="w4a8", group_size=32)
    model.to(device)
    x = torch.randn(3, 64, device=device)
    with torch.no_grad():
        report = qcompile.explain(model, x)
        out = torch.compile(model, backend="qcompile")(x)
    assert [(m.format, m.kernel) for m in report.matched] == [("w8a8", "scaled_mm[row,col,bias]")], str(report)
    assert [f.reason for f in report.fallbacks] == [
        "int8 weight computed in the graph, rebuilt by Inductor on every call: qcompile matcher error: RuntimeError: boom"]
    assert torch.allclose(out, model(x), rtol=1e-5, atol=1e-5)


def test_w4a8_weights_of_symbolic_size_say_that_inductor_rebuilds_them(device):
    """A function recompiled for new weight sizes gets symbolic ones (automatic dynamic shapes);
    w4a8's rebuild is then not matched, only the int8 GEMM, and explain() says so."""
    from qcompile.formats.w4a8 import w4a8_forward
    torch._dynamo.reset()  # a fresh code cache: the first shape must compile static
    fn, reports = torch.compile(w4a8_forward, backend="qcompile"), []
    for n, k in ((16, 64), (24, 128)):
        q = qcompile.quantize(nn.Sequential(nn.Linear(k, n, bias=False)), format="w4a8", group_size=32)[0].to(device)
        x = torch.randn(2, k, device=device)
        with qcompile.backend.listen(qcompile.Report()) as report, torch.no_grad():
            out = fn(x, q.qweight, q.zero, q.scale_int, q.channel_scale)
        reports.append(report)
        torch.testing.assert_close(out, q(x), rtol=1e-5, atol=1e-5)
    assert [m.format for r in reports for m in r.matched] == ["w4a8", "w8a8"], str(reports[1])
    assert not reports[0].fallbacks and "static weight sizes" in reports[1].fallbacks[0].reason
