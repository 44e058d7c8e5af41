"""The ``qcompile::`` custom ops the pass inserts. They launch the Triton kernels; where no
kernel can run they compute the format's reference instead, so a call never crashes."""
import warnings
from collections import Counter

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from qcompile.codegen import tiling
from qcompile.codegen.wq_gemm import FMT_CODES, wq_gemm_kernel
from qcompile.codegen.wq_dequant import wq_dequant_kernel
from qcompile.codegen.wq_gemv import wq_gemv_kernel
from qcompile.formats import Packed, get_format

from .autotune import TUNER
from .device import interpreting, kernel_unavailable_reason

KERNELS = {"gemm": wq_gemm_kernel, "gemv": wq_gemv_kernel}

launches = Counter()  # kernel launches per (kernel, format, bits): tests assert which kernel ran
chosen = {}  # (kernel, format, bits, group, M bucket, N, K, dtype) -> the triton.Config that ran

_DOT = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_locks = {}  # device -> int32 counters of split-K tiles; each launch leaves them at zero


def _dot_dtype(dtype):
    """The dot runs in the activation dtype; the interpreter's bf16 dot is wrong, so fp32 there."""
    return tl.float32 if dtype == torch.bfloat16 and interpreting() else _DOT[dtype]


def _tile_locks(device, count):
    locks = _locks.get(device)
    if locks is None or locks.numel() < count:
        locks = _locks[device] = torch.zeros(max(count, 4096), dtype=torch.int32, device=device)
    return locks


def tuning_key(fmt, bits, group, m, n, k, dtype) -> tuple:
    """What a kernel's best config depends on: format and shape, M's bucket, activation dtype.
    ``chosen[(kernel, *tuning_key(...))]`` is the config that ran."""
    return (fmt, bits, group, tiling.m_bucket(m), n, k, str(dtype).replace("torch.", ""))


def _launch(kernel, x2, qweight, scale, zero, bias, fmt, bits, group, out, config=None):
    """Launch with the tuner's config for this shape (runtime/autotune.py), or ``config``."""
    m, k = x2.shape
    n = out.shape[1]
    w3 = qweight if qweight.dim() == 3 else qweight.unsqueeze(0)
    s3 = scale if scale.dim() == 3 else scale.unsqueeze(0)
    launches[kernel, fmt, bits] += 1
    fmt_code = FMT_CODES[fmt]
    # split-K partial sums and one counter per output tile (sized for the smallest tiles)
    split = kernel == "gemv" or tiling.m_bucket(m) <= tiling.SPLIT_M_BUCKET
    ws = x2.new_empty(tiling.MAX_SPLIT_K[kernel] * m * n if split else 1, dtype=torch.float32)
    locks = _tile_locks(x2.device, m * triton.cdiv(n, 32) if split else 1)
    if kernel == "gemv":
        grid = lambda meta: (m, triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
        consts = {}
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]),  # noqa: E731
                             meta["SPLIT_K"])
        dot = _dot_dtype(x2.dtype)
        consts = dict(DOT=dot, PRECISION="ieee" if dot == tl.float32 else "tf32")
    args = (x2, w3, s3, zero if zero is not None else s3, bias if bias is not None else s3, out, ws, locks,
            m, n, k, tiling.m_bucket(m),
            x2.stride(0), x2.stride(1), w3.stride(0), w3.stride(1), w3.stride(2),
            s3.stride(0), s3.stride(1), s3.stride(2), out.stride(0), out.stride(1))
    consts.update(BITS=bits, GROUP=group, FMT=fmt_code, HAS_BIAS=bias is not None,
                  CODES=tiling.codes_per_word_padded(bits, fmt_code >= 2))

    def run(cfg):
        KERNELS[kernel][grid](*args, **consts, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    key = tuning_key(fmt, bits, group, m, n, k, x2.dtype)
    if config is None:
        cands = tiling.candidates(kernel, dict(x=x2, s=s3, M_BUCKET=tiling.m_bucket(m), K=k, **consts))
        config = TUNER.pick(kernel, key, cands, run, x2.device)
    try:
        run(config)
    except OutOfResources as e:  # the shared-memory model let an oversized tile through
        warnings.warn(f"qcompile: {e}; retrying with the smallest tile (please report the shape)")
        config = tiling.SMALLEST[kernel]
        run(config)
    chosen[(kernel, *key)] = config


@torch.library.custom_op("qcompile::wq_linear", mutates_args=())
def wq_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
              bias: torch.Tensor | None, fmt: str, bits: int, group_size: int) -> torch.Tensor:
    """y = x @ dequant(qweight, scale, zero) (+ bias) for a W-only format's layout."""
    k, n = x.shape[-1], qweight.shape[-1]
    x2 = x.reshape(-1, k)
    if kernel_unavailable_reason(x.device) is not None:
        w = get_format(fmt).dequantize(Packed(qweight, scale, zero), bits, k).to(x.dtype)
        out = x2 @ w
        return (out if bias is None else out + bias).reshape(*x.shape[:-1], n)
    return _run(x2, qweight, scale, zero, bias, fmt, bits, k if group_size == -1 else group_size,
                None).reshape(*x.shape[:-1], n)


def _run(x2, qweight, scale, zero, bias, fmt, bits, group, config, kernel=None):
    """y in the activation dtype from the kernel M calls for (or ``kernel``, with ``config``)."""
    m, n = x2.shape[0], qweight.shape[-1]
    kernel = kernel or tiling.kernel_for(m)
    if kernel == "dequant":
        return _dequant_mm(x2, qweight, scale, zero, bias, fmt, bits, group)
    out = x2.new_empty(m, n)
    if out.numel():
        _launch(kernel, x2, qweight, scale, zero, bias, fmt, bits, group, out, config)
    return out


def _dequant_mm(x2, qweight, scale, zero, bias, fmt, bits, group):
    """Large M: the dense weight, written once by wq_dequant, then torch's GEMM (cuBLAS)."""
    k, n = x2.shape[1], qweight.shape[-1]
    w3 = qweight if qweight.dim() == 3 else qweight.unsqueeze(0)
    s3 = scale if scale.dim() == 3 else scale.unsqueeze(0)
    w = x2.new_empty(k, n)
    fmt_code = FMT_CODES[fmt]
    cfg = tiling.DEQUANT_TILE
    codes = tiling.codes_per_word_padded(bits, fmt_code >= 2)
    per = 32 if fmt_code >= 2 else 32 // bits
    launches["dequant", fmt, bits] += 1
    grid = (triton.cdiv(triton.cdiv(k, per), cfg["BLOCK_KW"] * 32 // codes), triton.cdiv(n, cfg["BLOCK_N"]))
    wq_dequant_kernel[grid](w3, s3, zero if zero is not None else s3, w, n, k,
                            w3.stride(0), w3.stride(1), w3.stride(2), s3.stride(0), s3.stride(1), s3.stride(2),
                            w.stride(0), w.stride(1), BITS=bits, GROUP=group, FMT=fmt_code, CODES=codes,
                            BLOCK_N=cfg["BLOCK_N"], BLOCK_KW=cfg["BLOCK_KW"] * 32 // codes, num_warps=4)
    return torch.addmm(bias, x2, w) if bias is not None else x2 @ w


@wq_linear.register_fake
def _(x, qweight, scale, zero, bias, fmt, bits, group_size):
    return x.new_empty(*x.shape[:-1], qweight.shape[-1])
