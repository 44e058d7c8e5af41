import pytest
import torch

from qcompile.formats import FORMATS, QuantLinear
from qcompile.formats.packing import pack_fields, pack_planes, unpack_fields, unpack_planes


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("k", [1, 31, 96, 100])
def test_fields_and_planes_round_trip_bit_exactly(bits, k):
    codes = torch.randint(0, 2**bits, (k, 7), dtype=torch.int32)
    fields = pack_fields(codes, bits)
    assert fields.dtype == torch.int32 and fields.shape == (-(-k // (32 // bits)), 7)
    assert torch.equal(unpack_fields(fields, bits, k), codes)
    assert torch.equal(pack_fields(unpack_fields(fields, bits, k), bits), fields)
    planes = pack_planes(codes, bits)
    assert planes.shape == (bits, -(-k // 32), 7)
    bits_back = unpack_planes(planes, k)
    assert torch.equal((bits_back << torch.arange(bits).view(-1, 1, 1)).sum(0).int(), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_formats_produce_their_defined_levels(bits):
    """Per group and column: symmetric q*s with q in [-2^(b-1), 2^(b-1)); bipolar odd multiples
    of s within +-(2^b - 1); affine (q - z)*s with q in [0, 2^b); bcq at most 2^b levels."""
    torch.manual_seed(bits)
    lin = torch.nn.Linear(64, 24)
    levels = {}
    for name in FORMATS:
        q = QuantLinear.from_linear(lin, FORMATS[name], bits, 32)
        w = q.dequantize().t().reshape(2, 32, 24)  # [G, g, N]
        levels[name] = (w, q)
    w, q = levels["symmetric"]
    v = w / q.scale[:, None]
    assert torch.allclose(v, v.round(), atol=1e-4) and v.min() >= -2 ** (bits - 1) and v.max() <= 2 ** (bits - 1) - 1
    w, q = levels["bipolar"]
    v = w / q.scale[:, None]
    assert torch.allclose(v, v.round(), atol=1e-4) and bool((v.round() % 2 == 1).all())
    assert v.abs().max() <= 2**bits - 1
    w, q = levels["affine"]
    v = w / q.scale[:, None] + q.zero[:, None]
    assert torch.allclose(v, v.round(), atol=1e-3) and v.round().min() >= 0 and v.round().max() <= 2**bits - 1
    w, _ = levels["bcq"]
    assert max(len(w[g, :, n].unique()) for g in range(2) for n in range(24)) <= 2**bits


@pytest.mark.parametrize("name", FORMATS)
def test_error_falls_with_bits(name):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64)
    errs = [(QuantLinear.from_linear(lin, FORMATS[name], b, 32).dequantize() - lin.weight).norm().item()
            for b in range(2, 9)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] / lin.weight.norm().item() < 0.01
