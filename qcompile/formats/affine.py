"""affine: unsigned codes q in [0, 2**bits - 1], w = (q - zero) * scale per group."""
import torch

from .base import Packed, WeightFormat, groups_view
from .packing import pack_fields, unpack_fields


class Affine(WeightFormat):
    name = "affine"
    layout = "fields"

    def quantize(self, weight, bits, group_size):
        qmax = 2**bits - 1
        w = groups_view(weight.t().float(), group_size)  # [G, g, N]
        lo, hi = w.amin(1, keepdim=True).clamp(max=0), w.amax(1, keepdim=True).clamp(min=0)
        scale = ((hi - lo) / qmax).clamp(min=1e-8).to(weight.dtype).float()
        zero = (-lo / scale).round().clamp(0, qmax)
        q = (w / scale).round().add(zero).clamp(0, qmax).to(torch.int32)
        return Packed(pack_fields(q.reshape(-1, w.shape[-1]), bits),
                      scale.squeeze(1).to(weight.dtype), zero.squeeze(1).to(weight.dtype))

    def dequantize(self, packed, bits, k):
        scale, zero = packed.scale, packed.zero
        q = unpack_fields(packed.qweight, bits, k).to(scale.dtype)
        q = q.reshape(scale.shape[0], -1, scale.shape[1])
        return ((q - zero.unsqueeze(1)) * scale.unsqueeze(1)).reshape(k, scale.shape[1])
