"""Activation-quantized formats: 8-bit weights with a float32 scale per output channel (or one
for the whole tensor: ``weight_scale="tensor"``), and
8-bit activations quantized per token at run time (dynamic, symmetric), so that the matmul runs
on 8-bit tensor cores.

* ``w8a8``: int8 codes, levels -127..127 (LLM.int8()'s vector-wise quantization, without its
  outlier split yet).
* ``fp8``: float8 e4m3 codes, scaled so that each row's largest magnitude is 448 (e4m3's
  largest finite value).

``forward`` is the specification: quantize each row of x, multiply the two 8-bit tensors in
float32 (the exact products, summed up to float32 rounding), scale by the row's and the
channel's scale, add the bias, return x's dtype. The compiler pass leaves the activation
quantization to Inductor (which fuses it into the op before) and replaces the matmul and its
scaling by one GEMM (passes/scaled_linear.py).
"""
import torch
from torch import nn

from .base import check_args

LEVELS = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
WEIGHT_SCALES = ("channel", "tensor")


def quantize_rows(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of x in ``dtype`` and the float32 scale of each row ([..., 1]): x ~ codes * scale."""
    levels = LEVELS[dtype]
    scale = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / levels
    y = x.float() / scale
    if not dtype.is_floating_point:
        y = y.round()
    return y.clamp(-levels, levels).to(dtype), scale


class ScaledLinear(nn.Module):
    """8-bit weight [out_features, in_features], float32 scale [out_features] or [1]."""
    format_name: str
    code_dtype: torch.dtype
    bits, group_size = 8, -1

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_scale: str = "channel") -> "ScaledLinear":
        """``weight_scale``: "channel" (a scale per output channel, [out_features]) or "tensor"
        (one scale, [1]: what per-tensor fp8 checkpoints store)."""
        w = linear.weight.detach()
        check_args(w, 8, -1)
        if weight_scale not in WEIGHT_SCALES:
            raise ValueError(f"weight_scale={weight_scale!r}: allowed values are {', '.join(map(repr, WEIGHT_SCALES))}")
        rows = w if weight_scale == "channel" else w.reshape(1, -1)
        codes, scale = quantize_rows(rows, cls.code_dtype)
        return cls(codes.view_as(w), scale.reshape(-1), linear.bias)

    def dequantize(self) -> torch.Tensor:
        """The float weight as nn.Linear stores it, [out_features, in_features]."""
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x):
        xq, xs = quantize_rows(x, self.code_dtype)
        y = (xq.float() @ self.qweight.float().t()) * xs * self.scale
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def extra_repr(self):
        scale = "" if self.scale.numel() == self.out_features else ", weight_scale=tensor"
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format_name}{scale}"


class W8A8Linear(ScaledLinear):
    format_name, code_dtype = "w8a8", torch.int8


class FP8Linear(ScaledLinear):
    format_name, code_dtype = "fp8", torch.float8_e4m3fn
