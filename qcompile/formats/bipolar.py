"""bipolar: bipolar-INT from the arbitrary-precision tensor-core paper. bits one-bit planes,
each bit meaning -1 or +1; value = sum_i 2**i * (2 * bit_i - 1), an odd integer in
[-(2**bits - 1), 2**bits - 1]; w = value * scale per group. Symmetric with no zero point."""
import torch

from .base import Packed, WeightFormat, groups_view
from .packing import pack_planes, unpack_planes


class Bipolar(WeightFormat):
    name = "bipolar"
    layout = "planes"

    def quantize(self, weight, bits, group_size):
        top = 2**bits - 1
        w = groups_view(weight.t().float(), group_size)
        scale = (w.abs().amax(1, keepdim=True) / top).clamp(min=1e-8).to(weight.dtype).float()
        q = ((w / scale + top) / 2).round().clamp(0, top).to(torch.int32)  # value = 2q - top
        return Packed(pack_planes(q.reshape(-1, w.shape[-1]), bits), scale.squeeze(1).to(weight.dtype))

    def dequantize(self, packed, bits, k):
        scale = packed.scale
        signs = unpack_planes(packed.qweight, k) * 2 - 1  # [P, K, N] in {-1, +1}
        weights = 2 ** torch.arange(bits, device=signs.device, dtype=torch.int32)
        value = (signs * weights.view(bits, 1, 1)).sum(0).to(scale.dtype)
        value = value.reshape(scale.shape[0], -1, scale.shape[1])
        return (value * scale.unsqueeze(1)).reshape(k, scale.shape[1])
