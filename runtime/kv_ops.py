"""``qcompile::kv_attention``: attention reading a quantized KV cache, decode and prefill
(codegen/kv_attention.py); where no kernel can run, the reference (qcompile/formats/kv.py)."""
import math

import torch
import triton
import triton.language as tl

from qcompile.codegen.kv_attention import kv_append_kernel, kv_attention_kernel, kv_combine_kernel
from qcompile.formats.kv import append_kv, kv_attention_reference

from .device import interpreting, kernel_unavailable_reason

_DOT = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
# Compiled offline for sm_90 (head_dim 128, 64-token tiles), 4 warps spill about 200 registers
# to local memory and 8 spill none; on the H100 that took int8 from 0.32-0.62x of fp16 SDPA to
# 0.64-0.72x (contexts 4k-16k, bench/results/2026-11-25-h100-attention-8warps.json).
WARPS = 8


def _splits(programs: int, length: int, block_t: int, device) -> int:
    """Enough programs to cover every SM twice, each with at least one tile of the cache (the
    interpreter counts 8 SMs, so that tests on CPU split and combine too)."""
    sms = 8 if device.type == "cpu" else torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(length, block_t), 64))


def _row_block(rows: int) -> int:
    """Query rows per program: all of a decode step's (its cache is split instead), 64 for a
    prefill (16 under the interpreter: small tests still take several blocks)."""
    limit = 16 if interpreting() else 64
    return max(16, triton.next_power_of_2(rows)) if rows <= limit else limit


@torch.library.custom_op("qcompile::kv_attention", mutates_args=())
def kv_attention(q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor,
                 v_codes: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor, length: int,
                 bits: int, attn_mask: torch.Tensor | None = None,
                 sm_scale: float | None = None) -> torch.Tensor:
    """Attention of q [B, Hq, S, D] (the last S of ``length`` cached tokens) over the cache's
    first ``length`` tokens; K and V as (codes, scale, zero) of formats.kv.quantize_kv. With
    ``attn_mask`` (bool or additive, broadcasting to [B, Hq, S, length]) the mask says what each
    query sees; ``sm_scale`` defaults to 1/sqrt(D)."""
    if kernel_unavailable_reason(q.device) is not None:
        return kv_attention_reference(q, (k_codes, k_scale, k_zero), (v_codes, v_scale, v_zero), bits, length,
                                      attn_mask, sm_scale)
    b, hq, s, d = q.shape
    hkv = k_codes.shape[1]
    group = d // k_scale.shape[-1]
    if v_codes.stride() != k_codes.stride():
        k_codes, v_codes = k_codes.contiguous(), v_codes.contiguous()
    if not (k_scale.stride() == v_scale.stride() == k_zero.stride() == v_zero.stride()):
        k_scale, v_scale, k_zero, v_zero = (t.contiguous() for t in (k_scale, v_scale, k_zero, v_zero))
    rows = _row_block(hq // hkv * s)
    blocks = triton.cdiv(hq // hkv * s, rows)
    block_t = 16 if interpreting() else 64
    splits = 1 if blocks > 1 else _splits(b * hkv, length, block_t, q.device)
    acc = torch.empty(b * hkv * splits * rows * d if splits > 1 else 0, dtype=torch.float32, device=q.device)
    stat = torch.empty(b * hkv * splits * rows * 2 if splits > 1 else 0, dtype=torch.float32, device=q.device)
    dot = tl.float32 if interpreting() or q.dtype == torch.float32 else _DOT[q.dtype]
    consts = dict(REP=hq // hkv, S=s, ROWS=rows, D=d)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill_(~attn_mask, float("-inf"))
        attn_mask = attn_mask.expand(b, hq, s, length)  # stride 0 where it broadcasts
    mask = attn_mask if attn_mask is not None else q
    out = torch.empty_like(q)
    kv_attention_kernel[(b, hkv, blocks * splits)](
        q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, mask, out, acc, stat, length,
        1 / math.sqrt(d) if sm_scale is None else sm_scale,
        *q.stride(), *k_codes.stride(), *k_scale.stride(), *(mask.stride() if attn_mask is not None else (0,) * 4),
        *out.stride(), **consts, BITS=bits, GROUP=group, DOT=dot, PRECISION="ieee" if dot == tl.float32 else "tf32",
        BLOCK_T=block_t, SPLITS=splits, HAS_MASK=attn_mask is not None, num_warps=WARPS)
    if splits > 1:
        kv_combine_kernel[(b, hkv)](acc, stat, out, *out.stride(), **consts, SPLITS=splits)
    return out


@kv_attention.register_fake
def _(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, length, bits, attn_mask=None, sm_scale=None):
    return torch.empty_like(q)


@torch.library.custom_op("qcompile::kv_append", mutates_args=("codes", "scale", "zero"))
def kv_append(states: torch.Tensor, position: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
              zero: torch.Tensor, bits: int) -> None:
    """formats.kv.append_kv in one kernel (where none can run, append_kv itself). A position past
    the cache raises on CPU; on a GPU the kernel drops that token, as a check would cost a
    synchronization."""
    if position.device.type == "cpu" and position.numel():
        first, last = int(position.min()), int(position.max())
        if first < 0 or last >= codes.shape[2]:
            raise IndexError(f"kv_append: position holds {first}..{last}, allowed values are "
                             f"0..{codes.shape[2] - 1} (the cache's length)")
    if kernel_unavailable_reason(states.device) is not None:
        return append_kv(states, position, codes, scale, zero, bits)
    b, h, s, d = states.shape
    group = d // scale.shape[-1]
    block_s = min(16, triton.next_power_of_2(s))
    kv_append_kernel[(b * h, triton.cdiv(s, block_s))](
        states, position, codes, scale, zero, h, s, codes.shape[2], *states.stride(), *codes.stride(), *scale.stride(),
        D=d, BITS=bits, GROUP=group, BLOCK_S=block_s)
