"""QuantLinear: the drop-in nn.Linear replacement whose forward is the plain-PyTorch spec."""
import torch
from torch import nn

from .base import Packed, WeightFormat, check_args


class QuantLinear(nn.Module):
    """Holds the packed weight of one format; forward = dequantize, then matmul, then bias."""

    def __init__(self, fmt: WeightFormat, bits: int, group_size: int, packed: Packed,
                 in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.fmt, self.bits, self.group_size = fmt, bits, group_size
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", packed.qweight)
        self.register_buffer("scale", packed.scale)
        self.register_buffer("zero", packed.zero)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: WeightFormat, bits: int, group_size: int):
        w = linear.weight.detach()
        check_args(w, bits, group_size)
        return cls(fmt, bits, group_size, fmt.quantize(w, bits, group_size),
                   linear.in_features, linear.out_features, linear.bias)

    @property
    def packed(self) -> Packed:
        return Packed(self.qweight, self.scale, self.zero)

    def dequantize(self) -> torch.Tensor:
        """The float weight as nn.Linear stores it, [out_features, in_features]."""
        return self.fmt.dequantize(self.packed, self.bits, self.in_features).t()

    def forward(self, x):
        w = self.fmt.dequantize(self.packed, self.bits, self.in_features)
        out = x @ w.to(x.dtype)
        return out if self.bias is None else out + self.bias

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.fmt.name}, bits={self.bits}, group_size={self.group_size}")
