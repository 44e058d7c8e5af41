"""Bit packing shared by every format.

Two layouts, both K-major (a word holds consecutive K positions of one output column, words
of neighbouring columns are adjacent in memory) so that the GEMM kernel loads weight tiles
coalesced along N and unpacks them with one shift and one mask per value:

* fields: ``32 // bits`` codes per int32 word, code ``k`` at bit ``(k % per) * bits`` of word
  ``k // per``; shape ``[ceil(K / per), N]``.
* planes: bit ``i`` of every code in its own 1-bit field plane; shape ``[bits, ceil(K / 32), N]``.

``unpack_*`` are part of the formats' reference forwards (the specification the compiler
pass matches), so they are plain tensor arithmetic with no data-dependent Python.
"""
import torch


def codes_per_word(bits: int) -> int:
    return 32 // bits


def pack_fields(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: [K, N] integers in [0, 2**bits) -> int32 [ceil(K / per), N]."""
    per = codes_per_word(bits)
    k, n = codes.shape
    kw = -(-k // per)
    padded = torch.zeros(kw * per, n, dtype=torch.int64, device=codes.device)
    padded[:k] = codes.to(torch.int64)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int64) * bits
    words = (padded.view(kw, per, n) << shifts.view(1, per, 1)).sum(1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement wrap
    return words.to(torch.int32)


def unpack_fields(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """int32 [Kw, N] -> int32 codes [K, N] in [0, 2**bits)."""
    per = codes_per_word(bits)
    shifts = torch.arange(per, device=qweight.device, dtype=torch.int32) * bits
    codes = (qweight.unsqueeze(1) >> shifts.view(1, per, 1)) & (2**bits - 1)
    return codes.reshape(-1, qweight.shape[-1])[:k]


def pack_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: [K, N] in [0, 2**bits) -> int32 [bits, ceil(K / 32), N], plane i = bit i."""
    return torch.stack([pack_fields((codes >> i) & 1, 1) for i in range(bits)])


def unpack_planes(qweight: torch.Tensor, k: int) -> torch.Tensor:
    """int32 [P, Kw, N] -> int32 bits [P, K, N] in {0, 1}."""
    shifts = torch.arange(32, device=qweight.device, dtype=torch.int32)
    planes = (qweight.unsqueeze(2) >> shifts.view(1, 1, 32, 1)) & 1
    return planes.reshape(qweight.shape[0], -1, qweight.shape[-1])[:, :k]
