"""w4a8: QServe's progressive quantization. Weights are first int8 per output channel (a float32
scale each, codes kept within +-119), then 4-bit per group of ``group_size`` input features with
an integer scale and zero point that map the codes back to those int8 values:
w_int8 = (q - zero) * scale_int, exactly, inside int8's range. Activations are int8 per token
at run time, as in w8a8, so the product runs on int8 tensor cores.

``forward`` is the specification: rebuild the int8 weight with integer arithmetic, quantize
each row of x, multiply the two int8 tensors in float32, scale by the row's and the channel's
scale, add the bias, return x's dtype.
"""
import torch
from torch import nn

from .base import check_args, groups_view
from .packing import pack_fields, unpack_fields
from .scaled import quantize_rows

PROTECT = 119  # int8 codes within +-119: the 4-bit step of at most 16 then rounds back inside +-127


def int8_weight(qweight, zero, scale_int, k: int) -> torch.Tensor:
    """The int8 weight [K, N] the 4-bit codes stand for: (q - zero) * scale_int per group."""
    q = unpack_fields(qweight, 4, k)
    q = q.reshape(scale_int.shape[0], -1, q.shape[-1])
    w8 = (q - zero.int().unsqueeze(1)) * scale_int.int().unsqueeze(1)
    return w8.reshape(k, -1).to(torch.int8)


def w4a8_forward(x, qweight, zero, scale_int, channel_scale, bias=None, k=None):
    """The format's forward as a function of its tensors (the benchmarks call it too). ``k``:
    in_features, as a plain int (x's last size may be symbolic under dynamic shapes, and the
    pass reads the weight's shapes)."""
    xq, xs = quantize_rows(x, torch.int8)
    w8 = int8_weight(qweight, zero, scale_int, k or x.shape[-1])
    y = (xq.float() @ w8.float()) * xs * channel_scale
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


class W4A8Linear(nn.Module):
    """qweight int32 [K/8, N] (4-bit codes, K-major as the weight-only formats), scale_int and
    zero uint8 [K/group, N], channel_scale float32 [N]."""
    format_name, code_dtype, bits = "w4a8", torch.int8, 4

    def __init__(self, qweight, scale_int, zero, channel_scale, bias, in_features, group_size):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, channel_scale.shape[0], group_size
        for name, t in (("qweight", qweight), ("scale_int", scale_int), ("zero", zero),
                        ("channel_scale", channel_scale)):
            self.register_buffer(name, t)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128) -> "W4A8Linear":
        w = linear.weight.detach()
        check_args(w, 4, group_size)
        k = w.shape[1]
        group = k if group_size == -1 else group_size
        channel_scale = (w.float().abs().amax(1) / PROTECT).clamp(min=1e-12)
        w8 = (w.float() / channel_scale[:, None]).round().clamp(-PROTECT, PROTECT)
        g = groups_view(w8.t(), group)  # [G, group, N]
        lo, hi = g.amin(1, keepdim=True), g.amax(1, keepdim=True)
        scale_int = ((hi - lo) / 15).ceil().clamp(min=1)
        zero = (-lo / scale_int).round().clamp(0, 15)
        q = ((g / scale_int).round() + zero).clamp(0, 15).to(torch.int32)
        return cls(pack_fields(q.reshape(k, -1), 4), scale_int.squeeze(1).to(torch.uint8),
                   zero.squeeze(1).to(torch.uint8), channel_scale, linear.bias, k, group_size)

    def int8_weight(self) -> torch.Tensor:
        """int8 [K, N]: (q - zero) * scale_int per group, in integers."""
        return int8_weight(self.qweight, self.zero, self.scale_int, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """The float weight as nn.Linear stores it, [out_features, in_features]."""
        return self.int8_weight().float().t() * self.channel_scale[:, None]

    def forward(self, x):
        return w4a8_forward(x, self.qweight, self.zero, self.scale_int, self.channel_scale, self.bias,
                            self.in_features)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, format=w4a8, "
                f"group_size={self.group_size}")
