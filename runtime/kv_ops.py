"""``qcompile::kv_attention``: attention reading a quantized KV cache, decode and prefill
(codegen/kv_attention.py, codegen/kv_int4_attention.py; a prefill may also take the cache
dequantized into torch's SDPA); where no kernel can run, the reference (qcompile/formats/kv.py)."""
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from qcompile.codegen import kv_int4_attention, kv_tiling
from qcompile.codegen.kv_attention import (kv_append_kernel, kv_attention_kernel, kv_combine_kernel, kv_dequant_kernel,
                                           kv_live_kernel)
from qcompile.formats.kv import append_kv, attend, kv_attention_reference

from .autotune import TUNER
from .device import interpreting, kernel_unavailable_reason
from .ops import dot_dtype

LIVE_MAX_ROWS = 32  # distinct mask rows (heads x new tokens) up to which a decode step scans the mask
LIVE_SCAN = 8192  # mask elements one kv_live_kernel program reads
COMBINE_CHANNELS = 32  # channels of a head one kv_combine_kernel program merges
COMBINE_ELEMENTS = 8192  # partial values it loads at once: all 64 splits of a GQA-4 step's 32 channels
# and a warp per 2048 of them (up to 4): on the H200, batch 8 at 16k (16 splits) took 50.1 us with
# one warp against 51.2 with four, batch 1 (64 splits) 15.6 against 13.9 (-attention-combine-ab.json)
COMBINE_WARP_ELEMENTS = 2048
chosen = {}  # tuning key -> the tiling.Choice that ran: tests assert what was tuned


def _row_block(rows: int) -> int:
    """Query rows per program: all of a decode step's (its cache is split instead), 64 for a
    prefill (16 under the interpreter: small tests still take several blocks)."""
    limit = 16 if interpreting() else 64
    return max(16, triton.next_power_of_2(rows)) if rows <= limit else limit


def _sms(device) -> int:
    """SMs to fill (the interpreter counts 8, so that tests on CPU split and combine too)."""
    return 8 if device.type == "cpu" else torch.cuda.get_device_properties(device).multi_processor_count


def _dependent_launches(device) -> bool:
    """Whether the kernels are launched as programmatic dependents (PDL, sm_90 and later; not
    under the interpreter): the merge of the attention kernel, whose run its launch then
    overlaps, and the attention kernel of whatever ran before it, whose end its launch
    overlaps (it waits, griddepcontrol.wait, before its first read)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def _live_ends(mask: torch.Tensor, s: int, length: int):
    """kv_live_kernel's partial ends [B, nlive] of a decode step's mask [B, Hq, S, T] (heads
    broadcast or not), or None when it has more distinct rows than LIVE_MAX_ROWS."""
    mrows = (mask.shape[1] if mask.stride(1) else 1) * s
    if mrows > LIVE_MAX_ROWS:
        return None
    mp2 = triton.next_power_of_2(mrows)
    block = max(16, LIVE_SCAN // mp2)
    nlive = triton.cdiv(length, block)
    live = torch.empty(mask.shape[0], nlive, dtype=torch.int32, device=mask.device)
    kv_live_kernel[(mask.shape[0], nlive)](mask, live, length, mrows, *mask.stride(), nlive, S=s, MROWS=mp2,
                                           BLOCK=block, num_warps=4)
    return live


def shape_unsupported_reason(d: int, groups: int, v_groups: int | None = None) -> str | None:
    """Why the kernel cannot take heads of ``d`` channels in ``groups`` scale groups (its tiles
    span a head and its groups, in powers of two; V's groups, when given, must be K's), or None."""
    p2 = triton.next_power_of_2
    if v_groups not in (None, groups):
        return f"K in {groups} scale groups and V in {v_groups}: the KV kernel takes one grouping"
    if d < 16 or d != p2(d) or groups != p2(groups):
        return (f"head_dim={d} in {groups} scale groups: the KV kernel takes head_dim a power of two from 16 "
                f"and a power-of-two number of groups")
    return None


def span_unsupported_reason(*tensors) -> str | None:
    """Why the kernels cannot address one of ``tensors`` (None ones skipped; dim 0 the batch),
    or None: their offsets within a sequence are int32 products of program ids and strides (the
    batch's are int64), so a tensor whose sequence spans 2^31 elements or more would be read at
    wrapped offsets."""
    for t in tensors:
        if t is not None and t.numel() and sum((n - 1) * st for n, st in zip(t.shape[1:], t.stride()[1:])) >= 2**31:
            return (f"a tensor of shape {tuple(t.shape)} strided {tuple(t.stride())} spans 2^31 elements or more a "
                    "sequence: the KV kernels' offsets within one are int32")
    return None


def tuning_key(bits, group, d, rows, decode, programs, length, dtype, mask) -> tuple:
    """What the best tile depends on: the cache's format, the rows of a block, decode (split)
    or prefill, the programs and the cache length (powers of two), the dtype, a mask."""
    p2 = triton.next_power_of_2
    return ("kv_attention", bits, group, d, rows, decode, p2(programs), p2(length), str(dtype).replace("torch.", ""),
            mask)


@torch.library.custom_op("qcompile::kv_attention", mutates_args=())
def kv_attention(q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor,
                 v_codes: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor, length: int,
                 bits: int, attn_mask: torch.Tensor | None = None,
                 sm_scale: float | None = None) -> torch.Tensor:
    """Attention of q [B, Hq, S, D] (the last S of ``length`` cached tokens) over the cache's
    first ``length`` tokens; K and V as (codes, scale, zero) of formats.kv.quantize_kv. With
    ``attn_mask`` (bool or additive, broadcasting to [B, Hq, S, length]) the mask says what each
    query sees; ``sm_scale`` defaults to 1/sqrt(D). Where no kernel can take it (the device, the
    head's shape, a sequence too long for int32 offsets) the reference computes it."""
    if (kernel_unavailable_reason(q.device) or shape_unsupported_reason(q.shape[-1], k_scale.shape[-1],
                                                                         v_scale.shape[-1])
            or span_unsupported_reason(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, attn_mask)):
        return kv_attention_reference(q, (k_codes, k_scale, k_zero), (v_codes, v_scale, v_zero), bits, length,
                                      attn_mask, sm_scale)
    return _attention(q, (k_codes, k_scale, k_zero), (v_codes, v_scale, v_zero), length, bits, attn_mask, sm_scale)


def _v_layout(v_codes) -> tuple[tuple, int]:
    """V's codes' strides as the kernel takes them (batch, head, token, channel, then block) and
    VB: the tokens a block, when V is in blocks ([B, H, T / VB, VB, C]:
    formats.kv.as_token_blocks), else 0 with a block stride of 0."""
    if v_codes.dim() == 5:
        sb, sh, sk, st, sd = v_codes.stride()
        return (sb, sh, st, sd, sk), v_codes.shape[3]
    return (*v_codes.stride(), 0), 0


def _attention(q, k, v, length, bits, attn_mask, sm_scale, choice=None):
    """Launch the tuner's choice of tile for this shape (runtime/autotune.py), or ``choice``
    (a tiling.Choice: the benchmark's sweep)."""
    (k_codes, k_scale, k_zero), (v_codes, v_scale, v_zero) = k, v
    b, hq, s, d = q.shape
    hkv = k_codes.shape[1]
    group = d // k_scale.shape[-1]
    if not (k_scale.stride() == v_scale.stride() == k_zero.stride() == v_zero.stride()):
        k_scale, v_scale, k_zero, v_zero = (t.contiguous() for t in (k_scale, v_scale, k_zero, v_zero))
    rows = _row_block(hq // hkv * s)
    blocks = triton.cdiv(hq // hkv * s, rows)
    decode = blocks == 1
    dot = tl.float32 if interpreting() else dot_dtype(q.dtype)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill_(~attn_mask, float("-inf"))
        attn_mask = attn_mask.expand(b, hq, s, length)  # stride 0 where it broadcasts
    live = _live_ends(attn_mask, s, length) if attn_mask is not None and decode else None
    mask = attn_mask if attn_mask is not None else q
    out = torch.empty_like(q)
    sms = _sms(q.device)
    args = (q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, mask, live if live is not None else q, out)
    v_strides, vb = _v_layout(v_codes)
    mask_and_out = (*(mask.stride() if attn_mask is not None else (0,) * 4), *out.stride())
    strides = (*q.stride(), *k_codes.stride(), *v_strides, *k_scale.stride(), *mask_and_out)
    consts = dict(REP=hq // hkv, S=s, ROWS=rows, D=d, PDL=_dependent_launches(q.device))
    pdl = {"launch_pdl": True} if consts["PDL"] else {}
    own = dict(BITS=bits, GROUP=group, DEQ=dot_dtype(k_scale.dtype), DOT=dot,
               PRECISION="ieee" if dot == tl.float32 else "tf32",
               HAS_MASK=attn_mask is not None, LIVE=0 if live is None else triton.next_power_of_2(live.shape[1]),
               SKIP_HIDDEN=attn_mask is not None and not decode, VB=vb)

    why_not = "a prefill" if not decode else kv_int4_attention.unsupported_reason(q, k, v, bits)
    int4 = why_not is None
    why_not_rows = "a prefill" if not decode else kv_int4_attention.rows_unsupported_reason(q, k, v, bits)
    # the rows kernel where the decode kernel cannot go, or must take several programs a KV head:
    # at 4 rows in groups of 32 the decode kernel ran 6-11% faster on the H200 (16k and 32k,
    # batch 8 and 32: -attention-ab-rows-32.json), yet the tuner's short timings took the rows
    # kernel there (58.4 us at 16k, batch 8 in -attention-8.json; the decode kernel's 50.6 in the A/B)
    int4_rows = why_not_rows is None and (not int4 or hq // hkv * s > kv_int4_attention.R.value)
    scale, nlive = 1 / math.sqrt(d) if sm_scale is None else sm_scale, live.shape[1] if live is not None else 0

    def run(c):
        if c.kernel == kv_tiling.DEQUANT_SDPA:
            return out.copy_(_dequant_sdpa(q, k, v, length, bits, attn_mask, sm_scale, c.config))
        cfg = c.config
        row_blocks = triton.cdiv(hq // hkv * s, kv_int4_attention.R.value) if c.kernel == kv_tiling.INT4_KERNEL else 1
        splits = (kv_tiling.splits(b * hkv * row_blocks, length, cfg.kwargs["BLOCK_T"], cfg.kwargs["WAVES"], sms)
                  if decode else 1)
        acc = q.new_empty(b * hkv * splits * rows * d if splits > 1 else 0, dtype=torch.float32)
        stat = q.new_empty(b * hkv * splits * rows * 2 if splits > 1 else 0, dtype=torch.float32)
        # the Gluon kernels take the strides but the cache's token and channel ones (constants there)
        gluon_args = (*args, acc, stat, length, scale, splits, nlive, *q.stride(), *k_codes.stride()[:2],
                      *v_codes.stride()[:2], *k_scale.stride()[:2], *mask_and_out)
        gluon_consts = dict(REP=consts["REP"], S=s, ROWS=rows, HAS_MASK=own["HAS_MASK"], LIVE=own["LIVE"],
                            STAGES=cfg.num_stages, PDL=consts["PDL"], num_warps=1, maxnreg=cfg.kwargs.get("REGS"),
                            **pdl)
        if c.kernel == kv_tiling.INT4_ROWS_KERNEL:
            if why_not_rows is not None:  # a choice given from outside (the benchmark's)
                raise ValueError(f"choice={c}: the Gluon int4 rows kernel cannot take this step ({why_not_rows})")
            binary = kv_int4_attention.kv_int4_rows_kernel[(b, hkv, splits)](*gluon_args, **gluon_consts,
                                                                           G=k_scale.shape[-1], BITS=bits,
                                                                           FP16_RANGE=q.dtype == torch.bfloat16)
        elif c.kernel == kv_tiling.INT4_KERNEL:
            if not int4:  # a choice given from outside (the benchmark's)
                raise ValueError(f"choice={c}: the Gluon int4 kernel cannot take this step ({why_not})")
            binary = kv_int4_attention.kv_int4_decode_kernel[(b, hkv * row_blocks, splits)](
                *gluon_args, **gluon_consts, FP16_RANGE=q.dtype == torch.bfloat16, ROW_BLOCKS=row_blocks)
        else:
            binary = kv_attention_kernel[(b, hkv, blocks * splits)](
                *args, acc, stat, length, scale, splits, nlive, *strides, **consts, **own,
                BLOCK_T=cfg.kwargs["BLOCK_T"], num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                maxnreg=cfg.kwargs.get("REGS"), **pdl)
        if splits > 1:
            block_d, mrows = min(d, COMBINE_CHANNELS), triton.next_power_of_2(hq // hkv * s)
            block_s = max(1, min(triton.next_power_of_2(splits), COMBINE_ELEMENTS // (mrows * block_d)))
            warps = min(4, max(1, block_s * mrows * block_d // COMBINE_WARP_ELEMENTS))
            kv_combine_kernel[(b, hkv, d // block_d)](acc, stat, out, splits, *out.stride(), **consts, MROWS=mrows,
                                                      BLOCK_D=block_d, BLOCK_S=block_s, num_warps=warps,
                                                      **pdl)
        return binary

    key = tuning_key(bits, group, d, rows, decode, b * hkv, length, q.dtype, attn_mask is not None)
    if choice is None:  # the Gluon kernel's choices only where it applies
        choice = TUNER.pick("kv_attention", (*key, int4, int4_rows), lambda: kv_tiling.candidates(
            decode, rows, d, d // group, bits, k_scale.element_size(), 4 if dot == tl.float32 else 2,
            attn_mask is not None, q.device, int4, int4_rows), run, q.device, graphed=True)
    run(choice)
    chosen[key] = choice
    return out


def _dequantized(codes, scale, zero, length: int, bits: int, dtype, cfg) -> torch.Tensor:
    """The cache's first ``length`` tokens [B, H, length, D] in ``dtype`` (kv_dequant_kernel)."""
    b, h, _, groups = scale.shape
    d = codes.shape[-1] * 8 // bits
    out = torch.empty(b, h, length, d, dtype=dtype, device=codes.device)
    strides, vb = _v_layout(codes)
    block_t = cfg.kwargs["BLOCK_T"]
    kv_dequant_kernel[(b * h, triton.cdiv(length, block_t))](
        codes, scale, zero, out, length, h, *strides, *scale.stride(), *out.stride(), D=d, BITS=bits,
        GROUP=d // groups, DEQ=dot_dtype(scale.dtype), VB=vb, BLOCK_T=block_t, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return out


def _dequant_sdpa(q, k, v, length, bits, attn_mask, sm_scale, cfg) -> torch.Tensor:
    """kv_attention_reference's computation, the cache dequantized by kv_dequant_kernel: a
    prompt attending to itself alone is causal for torch's SDPA (flash, GQA without copies); a
    mask, or cached tokens before the new ones, goes through the reference's own SDPA
    (formats.kv.attend: K and V repeated per query head)."""
    k, v = (_dequantized(*t, length, bits, q.dtype, cfg) for t in (k, v))
    if attn_mask is None and q.shape[2] == length:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=sm_scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    return attend(q, k, v, attn_mask, sm_scale)


@kv_attention.register_fake
def _(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, length, bits, attn_mask=None, sm_scale=None):
    return torch.empty_like(q)


@torch.library.custom_op("qcompile::kv_append", mutates_args=("codes", "scale", "zero"))
def kv_append(states: torch.Tensor, position: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
              zero: torch.Tensor, bits: int) -> None:
    """formats.kv.append_kv in one kernel (where none can run, append_kv itself). A position past
    the cache raises on CPU; on a GPU the kernel drops that token, as a check would cost a
    synchronization."""
    length = scale.shape[2]  # the cache's tokens, whatever the codes' layout
    if position.device.type == "cpu" and position.numel():
        first, last = int(position.min()), int(position.max())
        if first < 0 or last >= length:
            raise IndexError(f"kv_append: position holds {first}..{last}, allowed values are "
                             f"0..{length - 1} (the cache's length)")
    if kernel_unavailable_reason(states.device) is not None or span_unsupported_reason(states, codes, scale, zero):
        return append_kv(states, position, codes, scale, zero, bits)
    b, h, s, d = states.shape
    group = d // scale.shape[-1]
    block_s = min(16, triton.next_power_of_2(s))
    strides, vb = _v_layout(codes)
    kv_append_kernel[(b * h, triton.cdiv(s, block_s))](
        states, position, codes, scale, zero, h, s, length, *states.stride(), *strides,
        *scale.stride(), D=d, BITS=bits, GROUP=group, BLOCK_S=block_s, VB=vb)
