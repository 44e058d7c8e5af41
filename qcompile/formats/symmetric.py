"""symmetric: signed codes q in [-2**(bits-1), 2**(bits-1) - 1] (two's complement in a
bits-wide field), w = q * scale per group, no zero point."""
import torch

from .base import Packed, WeightFormat, groups_view
from .packing import pack_fields, unpack_fields


class Symmetric(WeightFormat):
    name = "symmetric"
    layout = "fields"

    def quantize(self, weight, bits, group_size):
        half = 2 ** (bits - 1)
        w = groups_view(weight.t().float(), group_size)
        scale = (w.abs().amax(1, keepdim=True) / max(half - 1, 1)).clamp(min=1e-8)
        scale = scale.to(weight.dtype).float()
        q = (w / scale).round().clamp(-half, half - 1).to(torch.int32)
        codes = q.reshape(-1, w.shape[-1]) & (2**bits - 1)
        return Packed(pack_fields(codes, bits), scale.squeeze(1).to(weight.dtype))

    def dequantize(self, packed, bits, k):
        scale, half = packed.scale, 2 ** (bits - 1)
        q = (unpack_fields(packed.qweight, bits, k) ^ half) - half  # sign-extend
        q = q.to(scale.dtype).reshape(scale.shape[0], -1, scale.shape[1])
        return (q * scale.unsqueeze(1)).reshape(k, scale.shape[1])
