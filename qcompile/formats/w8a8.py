"""w8a8: int8 weights with a float32 scale per output channel, and int8 activations quantized
per token at run time (dynamic, symmetric, levels -127..127), so the matmul runs on integer
tensor cores (LLM.int8()'s vector-wise quantization, without its outlier split yet).

``W8A8Linear.forward`` is the specification: quantize each row of x, multiply the two int8
tensors (in float32: the int32 sum up to float32 rounding), scale by the row's and the
channel's scale, add the bias, return x's dtype. The compiler pass leaves the activation
quantization to Inductor (which fuses it into the op before) and replaces the matmul and its
scaling by one int8 GEMM.
"""
import torch
from torch import nn

from .base import check_args

LEVELS = 127


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes of x and the float32 scale of each row ([..., 1]): x ~ codes * scale."""
    scale = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / LEVELS
    return (x.float() / scale).round().clamp(-LEVELS, LEVELS).to(torch.int8), scale


class W8A8Linear(nn.Module):
    """int8 weight [out_features, in_features], per-channel scale [out_features] (float32)."""
    format_name = "w8a8"
    bits, group_size = 8, -1

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "W8A8Linear":
        w = linear.weight.detach()
        check_args(w, 8, -1)
        codes, scale = quantize_rows(w)
        return cls(codes, scale.squeeze(1), linear.bias)

    def dequantize(self) -> torch.Tensor:
        """The float weight as nn.Linear stores it, [out_features, in_features]."""
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x):
        xq, xs = quantize_rows(x)
        y = (xq.float() @ self.qweight.float().t()) * xs * self.scale
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, format=w8a8"
