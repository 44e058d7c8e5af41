"""bcq: binary-coding quantization (LUT-GEMM). W ~ sum_i alpha_i * B_i with B_i in {-1, +1}
stored as bit planes and a float alpha per plane, group and output channel, so the levels
need not be uniform. Fitted by the alternating method (Xu et al. 2018): least-squares alphas
for fixed signs, then the nearest of the 2**bits levels for fixed alphas."""
import itertools

import torch

from .base import Packed, WeightFormat, groups_view
from .packing import pack_planes, unpack_planes

ITERATIONS = 5


def _combos(bits, device):
    """All sign patterns, [2**bits, bits], row c = the signs of code c (bit i -> plane i)."""
    return torch.tensor(list(itertools.product([-1.0, 1.0], repeat=bits)), device=device).flip(1)


def fit_bcq(w: torch.Tensor, bits: int):
    """w: [G, g, N] float32 -> (codes [G, g, N] int, alpha [bits, G, N])."""
    residual, planes, alphas = w, [], []
    for _ in range(bits):  # greedy start: sign of the residual, mean magnitude
        b = torch.where(residual >= 0, 1.0, -1.0)
        a = residual.abs().mean(1, keepdim=True)
        planes.append(b), alphas.append(a)
        residual = residual - a * b
    combos = _combos(bits, w.device)  # [C, P]
    signs = torch.stack(planes, -1)  # [G, g, N, P]
    for _ in range(ITERATIONS):
        # alphas: least squares per (group, column) over the g weights of the group
        bt = signs.permute(0, 2, 1, 3)  # [G, N, g, P]
        gram = bt.transpose(-1, -2) @ bt + 1e-6 * torch.eye(bits, device=w.device)
        rhs = bt.transpose(-1, -2) @ w.permute(0, 2, 1).unsqueeze(-1)
        alpha = torch.linalg.solve(gram, rhs).squeeze(-1)  # [G, N, P]
        # signs: nearest level, by searchsorted over the sorted levels of each (group, column)
        levels = alpha @ combos.t()  # [G, N, C]
        levels, order = levels.sort(-1)
        mids = (levels[..., 1:] + levels[..., :-1]) / 2
        idx = torch.searchsorted(mids.contiguous(), w.permute(0, 2, 1).contiguous())  # [G, N, g]
        code = order.gather(-1, idx)
        signs = combos[code].permute(0, 2, 1, 3)  # [G, g, N, P]
    codes = code.permute(0, 2, 1)  # [G, g, N]
    return codes, alpha.permute(2, 0, 1)


class BCQ(WeightFormat):
    name = "bcq"
    layout = "planes"

    def quantize(self, weight, bits, group_size):
        w = groups_view(weight.t().float(), group_size)
        codes, alpha = fit_bcq(w, bits)
        return Packed(pack_planes(codes.reshape(-1, w.shape[-1]).to(torch.int32), bits),
                      alpha.to(weight.dtype).contiguous())

    def dequantize(self, packed, bits, k):
        scale = packed.scale  # [P, G, N]
        signs = (unpack_planes(packed.qweight, k) * 2 - 1).to(scale.dtype)
        signs = signs.reshape(bits, scale.shape[1], -1, scale.shape[2])
        return (signs * scale.unsqueeze(2)).sum(0).reshape(k, scale.shape[2])
