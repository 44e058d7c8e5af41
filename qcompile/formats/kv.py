"""Quantized KV cache entries (issue 5, first part): K or V of shape [B, H, T, D] stored as
8- or 4-bit codes with a scale and a zero point per token, head and group of ``group``
channels along D (the whole head, 32 or 64), as QServe's KV4 does.

Codes are unsigned (affine, min-max per group): 8-bit codes are one byte each, [B, H, T, D];
4-bit codes are two per byte, [B, H, T, D // 2], channel 2i in the low nibble and 2i + 1 in the
high one. ``dequantize_kv`` and ``kv_attention_reference`` are the specification that the
attention kernel (codegen/kv_attention.py) is tested against.
"""
import math

import torch
import torch.nn.functional as F

KV_BITS = (4, 8)
V_BLOCK = 64  # tokens a block of a cache's 8-bit V codes (v_block)


def check_kv_args(head_dim: int, bits, group) -> None:
    if bits not in KV_BITS:
        raise ValueError(f"bits={bits!r}: allowed values for a KV cache are 4 and 8")
    if not isinstance(group, int) or group <= 0 or head_dim % group or group % 2:
        raise ValueError(f"group={group!r}: allowed values are even divisors of head_dim={head_dim} "
                         f"(the whole head, 32 or 64 are usual)")


def default_group(head_dim: int, bits: int) -> int:
    """8-bit: the whole head, one scale and zero per token, which the attention kernel applies to
    its dots instead of to each code (and 1.94x smaller than fp16 at head_dim 128, against 1.78x
    with groups of 32); 4-bit: 32 channels (or the head, if smaller), QServe's KV4 groups."""
    return head_dim if bits == 8 else min(32, head_dim)


def v_token_major(bits: int) -> bool:
    """Whether a cache stores V's codes token-contiguous, in blocks of v_block tokens
    (as_token_blocks): 8-bit codes reach the attention kernel's p @ V, which sums over tokens,
    in that order (1.1-1.3x on the H200); 4-bit ones, unpacked along channels, were slower so
    (1.2-1.4x)."""
    return bits == 8


def v_block(length: int) -> int:
    """Tokens a block of V's codes in a cache of ``length`` tokens: V_BLOCK, or the largest
    divisor of it that divides ``length``. A block is one contiguous run, where a [B, H, C, T]
    buffer's runs of a tile's tokens lie T bytes apart."""
    return math.gcd(V_BLOCK, length)


def as_token_major(codes: torch.Tensor) -> torch.Tensor:
    """The same codes [B, H, T, C], stored token-contiguous: a [B, H, C, T] buffer seen transposed."""
    return codes.transpose(-1, -2).contiguous().transpose(-1, -2)


def as_token_blocks(codes: torch.Tensor, block: int) -> torch.Tensor:
    """The same codes [B, H, T, C] stored in blocks of ``block`` tokens, token-contiguous within
    a block and each block one run ([B, H, T / block, C, block]), seen as [B, H, T / block,
    block, C]: token-major order for p @ V without runs ``T`` bytes apart (T a multiple of
    ``block``). The attention op and dequantize_kv take this 5D view."""
    b, h, t, c = codes.shape
    return codes.reshape(b, h, t // block, block, c).transpose(-1, -2).contiguous().transpose(-1, -2)


def codes_buffer(b: int, h: int, t: int, d: int, bits: int, block: int = 0, device=None) -> torch.Tensor:
    """Zeroed uint8 codes [B, H, T, D or D/2], or with ``block`` in blocks of that many tokens
    ([B, H, T / block, block, C]: as_token_blocks)."""
    c = d if bits == 8 else d // 2
    if block:
        return torch.zeros(b, h, t // block, c, block, dtype=torch.uint8, device=device).transpose(-1, -2)
    return torch.zeros(b, h, t, c, dtype=torch.uint8, device=device)


def quantize_kv(x: torch.Tensor, bits: int, group: int):
    """x [B, H, T, D] -> (codes uint8, scale, zero) with scale and zero [B, H, T, D // group]
    in x's dtype."""
    check_kv_args(x.shape[-1], bits, group)
    qmax = 2**bits - 1
    g = x.float().unflatten(-1, (-1, group))  # [B, H, T, G, group]
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) * (1 / qmax)).clamp(min=1e-8).to(x.dtype).float()  # as CUDA's tensor / scalar does
    zero = (-lo / scale).round().clamp(0, qmax)
    codes = (g / scale + zero).round().clamp(0, qmax).to(torch.uint8).flatten(-2)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, scale.squeeze(-1).to(x.dtype), zero.squeeze(-1).to(x.dtype)


def append_kv(states: torch.Tensor, position: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
              zero: torch.Tensor, bits: int) -> None:
    """Quantize the new tokens ``states`` [B, H, S, D] (their group read from ``scale``) and write
    them at ``position`` [S] along the cache's token dim: the reference of the fused append."""
    new = quantize_kv(states, bits, states.shape[-1] // scale.shape[-1])
    for buffer, part in zip((codes, scale, zero), new):
        if buffer.dim() == 5:  # in blocks of tokens
            buffer[:, :, position // buffer.shape[3], position % buffer.shape[3]] = part
        else:
            buffer.index_copy_(2, position, part)


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """The [B, H, T, D] tensor in the scale's dtype (codes [B, H, T, C], or in blocks of tokens,
    [B, H, T / block, block, C]: as_token_blocks)."""
    if codes.dim() == 5:
        codes = codes.flatten(2, 3)
    if bits == 4:
        codes = torch.stack((codes & 15, codes >> 4), -1).flatten(-2)
    g = codes.to(scale.dtype).unflatten(-1, (scale.shape[-1], -1))
    return ((g - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).flatten(-2)


def kv_attention_reference(q, k, v, bits: int, length: int, attn_mask=None, scale=None) -> torch.Tensor:
    """Attention of the queries q [B, Hq, S, D], the last S of ``length`` tokens already in the
    cache (S = 1 for decoding, a few for speculative decoding, the prompt for a prefill; query s
    sees the tokens up to its own, unless ``attn_mask`` says otherwise), over the cache's k and v, each a (codes,
    scale, zero) triple with Hkv heads dividing Hq (grouped-query attention)."""
    k, v = (dequantize_kv(*t, bits)[:, :, :length] for t in (k, v))
    return attend(q, k.to(q.dtype), v.to(q.dtype), attn_mask, scale)


def attend(q, k, v, attn_mask=None, scale=None) -> torch.Tensor:
    """kv_attention_reference's SDPA over K and V already dequantized ([B, Hkv, length, D]):
    repeated per query head, and without ``attn_mask`` query s sees the tokens up to its own."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s, length = q.shape[2], k.shape[2]
    if attn_mask is None:
        attn_mask = torch.arange(length, device=q.device) <= torch.arange(length - s, length, device=q.device)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
