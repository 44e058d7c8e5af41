"""The ``qcompile::`` custom ops the pass inserts. They launch the Triton kernels; where no
kernel can run they compute the format's reference instead, so a call never crashes."""
import warnings
from collections import Counter

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from qcompile.codegen import tiling
from qcompile.codegen.scaled_gemm import scaled_gemm_kernel
from qcompile.codegen.wq_gemm import FMT_CODES, wq_gemm_kernel
from qcompile.codegen.wq_dequant import wq_dequant_kernel
from qcompile.codegen.wq_gemv import wq_gemv_kernel
from qcompile.formats import Packed, get_format
from qcompile.formats.w4a8 import int8_weight as w4a8_int8_weight

from .autotune import TUNER
from .device import interpreting, kernel_unavailable_reason

KERNELS = {"gemm": wq_gemm_kernel, "gemv": wq_gemv_kernel, "scaled": scaled_gemm_kernel}
SCALED_FORMATS = {torch.int8: ("w8a8", tl.int32), torch.float8_e4m3fn: ("fp8", tl.float32)}  # name, accumulator

launches = Counter()  # kernel launches per (kernel, format, bits): tests assert which kernel ran
chosen = {}  # tuning_key(...) -> the tiling.Choice (kernel and config) that ran
compiled = {}  # tuning_key(...) -> its Triton CompiledKernel (IR in .asm, shared memory in .metadata)

_DOT = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_locks = {}  # device -> int32 counters of split-K tiles; each launch leaves them at zero


def dot_dtype(dtype):
    """The Triton dtype a kernel computes ``dtype``'s values in (dots, and the KV kernel's
    dequantization): ``dtype`` itself, but fp32 for bf16 under the interpreter, whose bf16 dot
    and arithmetic are wrong."""
    return tl.float32 if dtype == torch.bfloat16 and interpreting() else _DOT[dtype]


def reserve_tile_locks(device: torch.device, n: int) -> None:
    """Allocate, at compile time, the split-K tile counters a layer of N columns may need (M up
    to the largest split bucket). Allocated first inside a launch under mode="reduce-overhead",
    they would land in the CUDA-graph pool, where a tensor that outlives the graph is an error."""
    if device.type == "cuda":
        _tile_locks(device, max(tiling.SPLIT_M_BUCKET, tiling.MULTIROW_MAX_M) * triton.cdiv(n, 16))


def _tile_locks(device, count):
    locks = _locks.get(device)
    if locks is None or locks.numel() < count:
        locks = _locks[device] = torch.zeros(max(count, 4096), dtype=torch.int32, device=device)
    return locks


def tuning_key(fmt, bits, group, m, n, k, dtype) -> tuple:
    """What the best kernel and config depend on: format and shape, M's bucket, activation
    dtype. ``chosen[tuning_key(...)]`` is the tiling.Choice that ran."""
    return (fmt, bits, group, tiling.m_bucket(m), n, k, str(dtype).replace("torch.", ""))


def _launch(x2, qweight, scale, zero, bias, fmt, bits, group, out, choice=None):
    """Launch the tuner's choice of kernel and config for this shape (runtime/autotune.py), or
    ``choice`` (a tiling.Choice)."""
    m, k = x2.shape
    n = out.shape[1]
    w3 = qweight if qweight.dim() == 3 else qweight.unsqueeze(0)
    s3 = scale if scale.dim() == 3 else scale.unsqueeze(0)
    fmt_code = FMT_CODES[fmt]
    kernels = (choice.kernel,) if choice else tiling.kernels_for(m)
    # split-K partial sums and one counter per output tile (sized for the smallest tiles)
    split = "gemv" in kernels or tiling.m_bucket(m) <= tiling.SPLIT_M_BUCKET
    ws = x2.new_empty(max(tiling.MAX_SPLIT_K[kn] for kn in kernels) * m * n if split else 1, dtype=torch.float32)
    locks = _tile_locks(x2.device, m * triton.cdiv(n, 16) if split else 1)
    args = (x2, w3, s3, zero if zero is not None else s3, bias if bias is not None else s3, out, ws, locks,
            m, n, k, tiling.m_bucket(m),
            x2.stride(0), x2.stride(1), w3.stride(0), w3.stride(1), w3.stride(2),
            s3.stride(0), s3.stride(1), s3.stride(2), out.stride(0), out.stride(1))
    consts = dict(BITS=bits, GROUP=group, FMT=fmt_code, HAS_BIAS=bias is not None,
                  CODES=tiling.codes_per_word_padded(bits, fmt_code >= 2))
    dot = dot_dtype(x2.dtype)
    per = tiling.codes_per_word(bits, fmt_code >= 2)
    own = {"gemm": dict(DOT=dot, PRECISION="ieee" if dot == tl.float32 else "tf32"), "gemv": dict(EVEN_K=k % per == 0)}

    def run(c: tiling.Choice):
        cfg = c.config.kwargs
        grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT_K"])
        return KERNELS[c.kernel][grid](*args, **consts, **own[c.kernel], **cfg, num_warps=c.config.num_warps,
                                       num_stages=c.config.num_stages)

    args_of = dict(x=x2, s=s3, M_BUCKET=tiling.m_bucket(m), K=k, **consts)
    choice = _run_tuned("wq_linear", tuning_key(fmt, bits, group, m, n, k, x2.dtype),
                        lambda: tiling.candidates(m, args_of), run, x2.device, choice)
    launches[choice.kernel, fmt, bits] += 1


def _run_tuned(op, key, candidates, run, device, choice=None) -> tiling.Choice:
    """Launch the tuner's choice for ``key`` (or ``choice``) through ``run`` and record what
    ran in ``chosen`` and ``compiled``; returns it."""
    if choice is None:
        choice = TUNER.pick(op, key, candidates, run, device)
    try:
        binary = run(choice)
    except OutOfResources as e:  # the shared-memory model let an oversized tile through
        warnings.warn(f"qcompile: {e}; retrying with the smallest tile (please report the shape)")
        choice = tiling.Choice(choice.kernel, tiling.SMALLEST[choice.kernel])
        binary = run(choice)
    chosen[key] = choice
    if binary is not None:  # compiled Triton (the interpreter returns none)
        compiled[key] = binary
    return choice


@torch.library.custom_op("qcompile::wq_linear", mutates_args=())
def wq_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
              bias: torch.Tensor | None, fmt: str, bits: int, group_size: int) -> torch.Tensor:
    """y = x @ dequant(qweight, scale, zero) (+ bias) for a W-only format's layout."""
    return _linear(x, qweight, scale, zero, bias, fmt, bits, group_size)


def _linear(x, qweight, scale, zero, bias, fmt, bits, group_size):
    k, n = x.shape[-1], qweight.shape[-1]
    x2 = x.reshape(-1, k)
    if kernel_unavailable_reason(x.device) is not None:
        w = get_format(fmt).dequantize(Packed(qweight, scale, zero), bits, k).to(x.dtype)
        out = x2 @ w
        return (out if bias is None else out + bias).reshape(*x.shape[:-1], n)
    return _run(x2, qweight, scale, zero, bias, fmt, bits, k if group_size == -1 else group_size,
                None).reshape(*x.shape[:-1], n)


@torch.library.custom_op("qcompile::wq_linear_siblings", mutates_args=())
def wq_linear_siblings(x: torch.Tensor, qweights: list[torch.Tensor], scales: list[torch.Tensor],
                       zeros: list[torch.Tensor], biases: list[torch.Tensor], fmt: str, bits: int,
                       group_size: int) -> torch.Tensor:
    """The linears of one input x and one format, their outputs joined along the last dim:
    [x @ W_0 | x @ W_1 | ...]. zeros and biases are empty lists when the linears have none.
    One launch over the joined columns when each tensor list is adjacent column blocks of one
    buffer (qcompile/siblings.py stores them so), else one launch per linear."""
    lists = (qweights, scales, zeros, biases)
    if kernel_unavailable_reason(x.device) is None:
        joined = [joined_view(ts) if ts else None for ts in lists]
        if all(j is not None for j, ts in zip(joined, lists) if ts):
            return _linear(x, *joined, fmt, bits, group_size)
        warnings.warn("qcompile: sibling linears whose tensors are not column blocks of one buffer run one "
                      "kernel each; qcompile.join_siblings(model) joins them (after model.to(), for one)")
    return torch.cat([_linear(x, q, s, z, b, fmt, bits, group_size) for q, s, z, b in
                      zip(qweights, scales, zeros or [None] * len(qweights), biases or [None] * len(qweights))], -1)


@wq_linear_siblings.register_fake
def _(x, qweights, scales, zeros, biases, fmt, bits, group_size):
    return x.new_empty(*x.shape[:-1], sum(q.shape[-1] for q in qweights))


def joined_view(ts: list[torch.Tensor]) -> torch.Tensor | None:
    """One view over tensors that are adjacent column blocks (along the last dim) of one
    buffer, or None when they are not. Works on fake tensors too (the pass asks it)."""
    first = ts[0]
    sizes = (*first.shape[:-1], sum(t.shape[-1] for t in ts))
    overlap = any(first.stride(d) < sizes[d + 1] * first.stride(d + 1) for d in range(first.dim() - 1))
    if first.stride(-1) != 1 or overlap or any(
            t.untyped_storage()._cdata != first.untyped_storage()._cdata or t.dtype != first.dtype
            or t.stride() != first.stride() or t.shape[:-1] != first.shape[:-1] for t in ts):
        return None
    if any(b.storage_offset() != a.storage_offset() + a.shape[-1] for a, b in zip(ts, ts[1:])):
        return None
    return first.as_strided(sizes, first.stride())


def _run(x2, qweight, scale, zero, bias, fmt, bits, group, config=None, kernel=None):
    """y in the activation dtype from the kernel tuning picks for M (or ``kernel`` with
    ``config``, a triton.Config: tests and benchmarks force one)."""
    m, n = x2.shape[0], qweight.shape[-1]
    kernel = kernel or tiling.kernels_for(m)[0]
    if kernel == "dequant":
        return _dequant_mm(x2, qweight, scale, zero, bias, fmt, bits, group)
    out = x2.new_empty(m, n)
    if out.numel():
        _launch(x2, qweight, scale, zero, bias, fmt, bits, group, out, config and tiling.Choice(kernel, config))
    return out


def _dequant_mm(x2, qweight, scale, zero, bias, fmt, bits, group):
    """Large M: the dense weight, written once by wq_dequant, then torch's GEMM (cuBLAS)."""
    k, n = x2.shape[1], qweight.shape[-1]
    w3 = qweight if qweight.dim() == 3 else qweight.unsqueeze(0)
    s3 = scale if scale.dim() == 3 else scale.unsqueeze(0)
    w = x2.new_empty(k, n)
    fmt_code = FMT_CODES[fmt]
    codes = tiling.codes_per_word_padded(bits, fmt_code >= 2)
    per = tiling.codes_per_word(bits, fmt_code >= 2)
    cfg = {"BLOCK_N": tiling.DEQUANT_TILE["BLOCK_N"], "BLOCK_KW": tiling.DEQUANT_TILE["BLOCK_KW"] * 32 // codes}
    launches["dequant", fmt, bits] += 1
    chosen[tuning_key(fmt, bits, group, x2.shape[0], n, k, x2.dtype)] = tiling.Choice(
        "dequant", triton.Config(cfg, num_warps=4))
    grid = (triton.cdiv(triton.cdiv(k, per), cfg["BLOCK_KW"]), triton.cdiv(n, cfg["BLOCK_N"]))
    wq_dequant_kernel[grid](w3, s3, zero if zero is not None else s3, w, n, k,
                            w3.stride(0), w3.stride(1), w3.stride(2), s3.stride(0), s3.stride(1), s3.stride(2),
                            w.stride(0), w.stride(1), BITS=bits, GROUP=group, FMT=fmt_code, CODES=codes,
                            **cfg, num_warps=4)
    return torch.addmm(bias, x2, w) if bias is not None else x2 @ w


@wq_linear.register_fake
def _(x, qweight, scale, zero, bias, fmt, bits, group_size):
    return x.new_empty(*x.shape[:-1], qweight.shape[-1])


def scaled_key(dtype, m, n, k, group=None) -> tuple:
    """scaled_mm's tuning key (``group``: w4a8's, whose weight the kernel unpacks);
    ``chosen[scaled_key(...)]`` is the Choice that ran."""
    return ("scaled", str(dtype).replace("torch.", ""), tiling.m_bucket(m), n, k, *((group,) if group else ()))


def _check_vectors(row_scale, col_scale, bias, m, n):
    for name, v, size in (("row_scale", row_scale, m), ("col_scale", col_scale, n), ("bias", bias, n)):
        if v is not None and (v.dim() != 1 or v.numel() not in (1, size)):
            raise ValueError(f"{name} must have shape [{size}] or [1], got {list(v.shape)}")


def _scaled_reference(a, b, row_scale, col_scale, bias, out_dtype):
    y = a.float() @ b.float()
    for v, shape in ((row_scale, (-1, 1)), (col_scale, (1, -1))):
        y = y if v is None else y * v.float().view(shape)
    return (y if bias is None else y + bias.float()).to(out_dtype)


def _scaled_launch(a, b, row_scale, col_scale, bias, out_dtype, packed=None):
    """The scaled GEMM template on 8-bit a and b [K, N] (b's strides as given), or, with
    ``packed`` = (zero, scale_int, group), on w4a8's 4-bit codes b [K/8, N]."""
    (m, k), n = a.shape, b.shape[1]
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if not out.numel():
        return out
    vectors = [out if v is None else v for v in (row_scale, col_scale, bias)]
    zero, scale_int, group = packed or (out, out, 1)
    strides = [0 if v.numel() == 1 else v.stride(0) for v in vectors]  # one value for all: broadcast
    args = (a, b, *vectors, out, zero, scale_int, m, n, k, tiling.m_bucket(m), a.stride(0), a.stride(1),
            b.stride(1), b.stride(0), out.stride(0), out.stride(1), *strides, zero.stride(0), zero.stride(1))
    fmt, acc = ("w4a8", tl.int32) if packed else SCALED_FORMATS[a.dtype]
    consts = dict(ACC=acc, HAS_ROW=row_scale is not None, HAS_COL=col_scale is not None, HAS_BIAS=bias is not None,
                  B_PACKED=packed is not None, GROUP=group)

    def run(c: tiling.Choice):
        cfg = c.config.kwargs
        return scaled_gemm_kernel[(triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))](
            *args, **consts, **cfg, TILE_IN_GROUP=group % cfg["BLOCK_K"] == 0 or group >= k,
            num_warps=c.config.num_warps, num_stages=c.config.num_stages)

    _run_tuned("scaled_mm", scaled_key(a.dtype, m, n, k, packed and group),
               lambda: tiling.scaled_candidates(m, a.device), run, a.device)
    launches["scaled", fmt, 4 if packed else 8] += 1
    return out


@torch.library.custom_op("qcompile::scaled_mm", mutates_args=())
def scaled_mm(a: torch.Tensor, b: torch.Tensor, row_scale: torch.Tensor | None, col_scale: torch.Tensor | None,
              bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """((a @ b) * row_scale[:, None] * col_scale[None, :] + bias), computed in float32 and
    returned in ``out_dtype``, for 8-bit a [M, K] and b [K, N] of one dtype, int8 or
    float8_e4m3fn (any strides: the weight arrives as its transposed [N, K] storage).
    row_scale: [M] or [1]; col_scale and bias: [N] or [1] (one value for all)."""
    _check_vectors(row_scale, col_scale, bias, a.shape[0], b.shape[1])
    if kernel_unavailable_reason(a.device) is not None:
        return _scaled_reference(a, b, row_scale, col_scale, bias, out_dtype)
    return _scaled_launch(a, b, row_scale, col_scale, bias, out_dtype)


@torch.library.custom_op("qcompile::w4a8_mm", mutates_args=())
def w4a8_mm(a: torch.Tensor, qweight: torch.Tensor, zero: torch.Tensor, scale_int: torch.Tensor,
            row_scale: torch.Tensor | None, col_scale: torch.Tensor | None, bias: torch.Tensor | None,
            out_dtype: torch.dtype) -> torch.Tensor:
    """scaled_mm with w4a8's weight: int8 activations a [M, K] times the int8 weight that the
    4-bit codes qweight [K/8, N] and the uint8 zero and scale_int [K/group, N] stand for
    (qcompile/formats/w4a8.py), rebuilt inside the kernel."""
    k, n = a.shape[1], qweight.shape[1]
    _check_vectors(row_scale, col_scale, bias, a.shape[0], n)
    if kernel_unavailable_reason(a.device) is not None:
        return _scaled_reference(a, w4a8_int8_weight(qweight, zero, scale_int, k), row_scale, col_scale, bias,
                                 out_dtype)
    return _scaled_launch(a, qweight, row_scale, col_scale, bias, out_dtype, (zero, scale_int, k // scale_int.shape[0]))


@w4a8_mm.register_fake
def _(a, qweight, zero, scale_int, row_scale, col_scale, bias, out_dtype):
    return a.new_empty(a.shape[0], qweight.shape[1], dtype=out_dtype)


@scaled_mm.register_fake
def _(a, b, row_scale, col_scale, bias, out_dtype):
    return a.new_empty(a.shape[0], b.shape[1], dtype=out_dtype)
