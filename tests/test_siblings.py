"""Sibling linears: quantize() stores the QuantLinears of one parent as column blocks of one
buffer per tensor, and ``qcompile::wq_linear_siblings`` runs those that read one input as one
kernel; it stays correct, one kernel per linear, when the buffers were copied apart."""
import pytest
import torch
from torch import nn

import qcompile
from conftest import assert_close
from qcompile.runtime import ops


class Projections(nn.Module):
    """q, k, v reading one input, as an attention block holds them."""

    def __init__(self, dtype, device, fmt="affine", bits=4):
        super().__init__()
        torch.manual_seed(0)
        for name, n in (("q", 48), ("k", 16), ("v", 24)):
            setattr(self, name, nn.Linear(64, n, bias=name == "k").to(device=device, dtype=dtype))
        qcompile.quantize(self, bits=bits, group_size=32, format=fmt)

    def forward(self, x):
        return self.q(x), self.k(x), self.v(x)


def _lists(mod):
    linears = [mod.q, mod.k, mod.v]
    return ([m.qweight for m in linears], [m.scale for m in linears],
            [m.zero for m in linears] if linears[0].zero is not None else [])


@pytest.mark.parametrize("fmt, bits", [("affine", 4), ("bipolar", 2), ("symmetric", 3)])
def test_quantize_joins_siblings_and_one_launch_serves_them(fmt, bits, device):
    mod = Projections(torch.float16, device, fmt, bits)
    qweights, scales, zeros = _lists(mod)
    assert all(ops.joined_view(ts) is not None for ts in (qweights, scales, zeros) if ts)
    assert qweights[1].untyped_storage().data_ptr() == qweights[0].untyped_storage().data_ptr()
    x = torch.randn(3, 64, dtype=torch.float16, device=device)
    # the linears have different biases (only k has one), so the op gets none and adds them here
    ref = torch.cat([m(x) - (0 if m.bias is None else m.bias) for m in (mod.q, mod.k, mod.v)], -1)
    ops.launches.clear()
    out = torch.ops.qcompile.wq_linear_siblings(x, qweights, scales, zeros, [], fmt, bits, 32)
    assert sum(ops.launches.values()) == 1
    assert_close(out, ref, torch.float16)


def test_copied_buffers_run_one_kernel_each_and_join_siblings_rejoins_them(device):
    mod = Projections(torch.float32, device)
    mod._apply(lambda t: t.clone())  # what a move to another device does to views of one buffer
    qweights, scales, zeros = _lists(mod)
    assert ops.joined_view(qweights) is None
    x = torch.randn(1, 64, device=device)
    ref = torch.cat([mod.q(x), mod.k(x) - mod.k.bias, mod.v(x)], -1)
    ops.launches.clear()
    with pytest.warns(UserWarning, match="join_siblings"):
        out = torch.ops.qcompile.wq_linear_siblings(x, qweights, scales, zeros, [], "affine", 4, 32)
    assert sum(ops.launches.values()) == 3
    assert_close(out, ref, torch.float32)
    assert qcompile.join_siblings(mod) == 1
    assert all(ops.joined_view(ts) is not None for ts in _lists(mod))


def test_compiled_siblings_share_one_kernel_only_when_joined(device):
    """The pass joins q, k, v only when their tensors are column blocks of one buffer (the fake
    tensors say so at compile time); k's bias alone keeps them apart, so it is dropped here."""
    mod = Projections(torch.float16, device)
    mod.k.bias = None
    x = torch.randn(5, 64, dtype=torch.float16, device=device)
    with torch.no_grad():
        ref = torch.cat(mod(x), -1)
        report = qcompile.explain(mod, x)
        assert [(f.columns, len(f.nodes)) for f in report.fused] == [([48, 16, 24], 3)], str(report)
        ops.launches.clear()
        out = torch.cat(torch.compile(mod, backend="qcompile")(x), -1)
        assert sum(ops.launches.values()) == 1
        assert_close(out, ref, torch.float16)
        mod._apply(lambda t: t.clone())
        torch._dynamo.reset()
        assert not qcompile.explain(mod, x).fused
