"""w8a8: int8 weights per channel and int8 activations per token. The int8 GEMM op against the
float reference, and torch.compile of W8A8Linear (the specification) against eager."""
import pytest
import torch
from torch import nn

import qcompile
from conftest import DTYPES, assert_close
from qcompile.formats import W8A8Linear
from qcompile.runtime.ops import launches


@pytest.mark.parametrize("m, k, n", [(1, 40, 24), (3, 100, 33), (37, 64, 17)])
@pytest.mark.parametrize("scales", ["row,col", "row", "none"])
def test_int8_mm_against_the_float_product(m, k, n, scales, device):
    torch.manual_seed(m)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=device)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)  # [N, K]: read transposed
    row = torch.rand(m, device=device) if "row" in scales else None
    col = torch.rand(n, device=device) if "col" in scales else None
    out = torch.ops.qcompile.int8_mm(a, w.t(), row, col)
    ref = a.double() @ w.double().t() * (1 if row is None else row.double()[:, None]) * (1 if col is None else col.double())
    assert out.dtype == torch.float32 and torch.allclose(out.double(), ref, rtol=1e-6, atol=1e-3)


def test_quantize_checks_w8a8_arguments():
    model = nn.Sequential(nn.Linear(64, 8))
    with pytest.raises(ValueError, match="bits=4 with format='w8a8': the allowed value is 8"):
        qcompile.quantize(model, bits=4, format="w8a8")
    with pytest.raises(ValueError, match="group_size=32 with format='w8a8': the allowed value is -1"):
        qcompile.quantize(model, group_size=32, format="w8a8")
    with pytest.raises(ValueError, match="allowed values are 'affine', 'symmetric', 'bipolar', 'bcq', 'w8a8'"):
        qcompile.quantize(model, format="int8")
    qcompile.quantize(model, format="w8a8", bits=8, group_size=-1)
    layer = model[0]
    assert isinstance(layer, W8A8Linear) and layer.qweight.dtype == torch.int8 and layer.scale.shape == (8,)
    lin = nn.Linear(64, 8)
    q = W8A8Linear.from_linear(lin)
    assert (q.dequantize() - lin.weight).abs().max() <= lin.weight.abs().max() / 127 / 2 * 1.01


class TwoLayers(nn.Module):
    def __init__(self, dtype, device):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(96, 40), nn.Linear(40, 24, bias=False)
        self.to(dtype)
        qcompile.quantize(self, format="w8a8")
        self.to(device)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compiled_w8a8_matches_eager_with_one_int8_gemm_per_layer(dtype, device):
    model = TwoLayers(dtype, device)
    compiled = torch.compile(model, backend="qcompile")
    for shape in [(3, 96), (1, 96), (2, 5, 96)]:
        x = torch.randn(shape, dtype=dtype, device=device)
        with torch.no_grad():
            if shape == (3, 96):
                report = qcompile.explain(model, x)
                assert [(m.kind, m.format) for m in report.matched] == [("int8_linear", "w8a8")] * 2, str(report)
                assert not report.fallbacks and all(m.kernel == "int8_mm[col,row]" for m in report.matched)
            launches.clear()
            out, ref = compiled(x), model(x)
        assert launches == {("int8", "w8a8", 8): 2}
        assert_close(out, ref, dtype)


def test_int8_operands_cast_to_half_fall_back_with_a_reason(device):
    w = torch.randint(-127, 128, (8, 32), dtype=torch.int8, device=device)

    def f(x):
        return x.to(torch.int8).half() @ w.half().t()
    x = torch.randint(-5, 5, (4, 32), device=device).half()
    report = qcompile.explain(f, x)
    assert not report.matched and "converted to torch.float16" in report.fallbacks[0].reason
    assert torch.equal(torch.compile(f, backend="qcompile")(x), f(x))
