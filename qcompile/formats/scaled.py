"""Activation-quantized formats: 8-bit weights with a float32 scale per output channel (or one
for the whole tensor: ``weight_scale="tensor"``), and 8-bit activations quantized per token at
run time (dynamic, symmetric), so that the matmul runs on 8-bit tensor cores.

* ``w8a8``: int8 codes, levels -127..127 (LLM.int8()'s vector-wise quantization); with
  ``outlier_threshold`` also its mixed-precision split (``outlier_columns``).
* ``fp8``: float8 e4m3 codes, scaled so that each row's largest magnitude is 448 (e4m3's
  largest finite value).

``forward`` is the specification: quantize each row of x, multiply the two 8-bit tensors in
float32 (the exact products, summed up to float32 rounding), scale by the row's and the
channel's scale, add the bias (and the outlier features' 16-bit product), return x's dtype. The
compiler pass leaves the activation quantization to Inductor (which fuses it into the op before)
and replaces the matmul and its scaling by one GEMM (passes/scaled_linear.py).
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

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 outlier_threshold: float | None = None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.outlier_threshold = outlier_threshold

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_scale: str = "channel",
                    outlier_threshold: float | None = None) -> "ScaledLinear":
        """``weight_scale``: "channel" (a scale per output channel, [out_features]) or "tensor"
        (one scale, [1]: what per-tensor fp8 checkpoints store). ``outlier_threshold`` (w8a8
        only): LLM.int8()'s split, see ``outlier_columns``."""
        w = linear.weight.detach()
        check_args(w, 8, -1)
        check_scaled_args(cls.format_name, weight_scale, outlier_threshold)
        rows = w if weight_scale == "channel" else w.reshape(1, -1)
        codes, scale = quantize_rows(rows, cls.code_dtype)
        return cls(codes.view_as(w), scale.reshape(-1), linear.bias, outlier_threshold)

    def dequantize(self) -> torch.Tensor:
        """The float weight as nn.Linear stores it, [out_features, in_features]."""
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x):
        return scaled_forward(x, self.qweight, self.scale, self.bias, self.code_dtype, self.outlier_threshold)

    def extra_repr(self):
        scale = "" if self.scale.numel() == self.out_features else ", weight_scale=tensor"
        outliers = "" if self.outlier_threshold is None else f", outlier_threshold={self.outlier_threshold}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format_name}"
                f"{scale}{outliers}")


def scaled_forward(x, qweight, scale, bias, code_dtype, outlier_threshold=None):
    """The formats' forward as a function of their tensors (the benchmarks call it too)."""
    outliers = None
    if outlier_threshold is not None:
        x, outliers = outlier_columns(x, outlier_threshold)
    xq, xs = quantize_rows(x, code_dtype)
    y = (xq.float() @ qweight.float().t()) * xs * scale
    if bias is not None:
        y = y + bias.float()
    if outliers is not None:  # after the bias, which the scaled GEMM's epilogue then takes
        y = y + outliers(qweight, scale)
    return y.to(x.dtype)


def outlier_capacity(k: int) -> int:
    """How many input features one call may route to the 16-bit matmul: 1/64 of them, at least 8
    (LLM.int8() reports about 0.1% outlier features in large models)."""
    return min(k, max(8, k // 64))


def outlier_columns(x: torch.Tensor, threshold: float):
    """LLM.int8()'s mixed-precision decomposition, in fixed shapes so that it compiles: the
    ``outlier_capacity`` input features with the largest magnitude over the call's rows, those
    above ``threshold``, leave x for a 16-bit matmul. Returns (x without them, a function of
    the layer's codes and scale that gives their product, float32 [..., N])."""
    k = x.shape[-1]
    peak = x.reshape(-1, k).abs().amax(0)
    value, index = peak.topk(outlier_capacity(k))
    keep = (value > threshold).to(x.dtype)  # [C]: fewer than C outliers leave zero columns
    xo = x[..., index] * keep
    rest = x * (1 - torch.zeros(k, dtype=x.dtype, device=x.device).scatter(0, index, keep))

    def product(qweight, scale):
        w = (qweight[:, index].float() * scale[:, None]).to(x.dtype)  # [N, C] dequantized in 16 bits
        return (xo @ w.t()).float()
    return rest, product


def check_scaled_args(fmt: str, weight_scale: str, outlier_threshold) -> None:
    allowed = ("channel",) if fmt == "w4a8" else WEIGHT_SCALES
    if weight_scale not in allowed:
        raise ValueError(f"weight_scale={weight_scale!r} with format={fmt!r}: allowed values are "
                         f"{', '.join(map(repr, allowed))}")
    if outlier_threshold is None:
        return
    if fmt != "w8a8":
        raise ValueError(f"outlier_threshold={outlier_threshold!r} with format={fmt!r}: LLM.int8()'s outlier split "
                         f"is for format='w8a8' only")
    if isinstance(outlier_threshold, bool) or not isinstance(outlier_threshold, (int, float)) or \
            not outlier_threshold > 0:
        raise ValueError(f"outlier_threshold={outlier_threshold!r}: allowed values are positive numbers "
                         f"(LLM.int8() uses 6.0) or None")


class W8A8Linear(ScaledLinear):
    format_name, code_dtype = "w8a8", torch.int8


class FP8Linear(ScaledLinear):
    format_name, code_dtype = "fp8", torch.float8_e4m3fn
