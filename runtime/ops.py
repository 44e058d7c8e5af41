"""The ``qcompile::`` custom ops the pass inserts. They launch the Triton kernels; where no
kernel can run they compute the format's reference instead, so a call never crashes."""
import warnings
from collections import Counter

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from qcompile.codegen.tiling import SMALLEST, SPLIT_M_BUCKET, all_configs, m_bucket, prune
from qcompile.codegen.wq_gemm import FMT_CODES, wq_gemm_kernel
from qcompile.formats import Packed, get_format

from .device import interpreting, kernel_unavailable_reason

wq_gemm = triton.autotune(
    configs=all_configs(), key=["M_BUCKET", "N", "K"], prune_configs_by={"early_config_prune": prune},
    reset_to_zero=["y_ptr"],  # split-K configs add into y: timing runs must not leave sums behind
)(wq_gemm_kernel)

launches = Counter()  # kernel launches per (format, bits): tests assert which kernel ran
chosen = {}  # (format, bits, group, M bucket, N, K, dtype) -> the triton.Config that ran (qcompile dump)

_DOT = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _dot_dtype(dtype):
    """The dot runs in the activation dtype; the interpreter's bf16 dot is wrong, so fp32 there."""
    return tl.float32 if dtype == torch.bfloat16 and interpreting() else _DOT[dtype]


def _launch(x2, qweight, scale, zero, bias, fmt, bits, group, out, config=None):
    """Autotuned launch, or one ``config`` (a triton.Config) when given (tests use this)."""
    m, k = x2.shape
    n = out.shape[1]
    w3 = qweight if qweight.dim() == 3 else qweight.unsqueeze(0)
    s3 = scale if scale.dim() == 3 else scale.unsqueeze(0)
    launches[fmt, bits] += 1
    dot = _dot_dtype(x2.dtype)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]),  # noqa: E731
                         meta["SPLIT_K"])
    args = (x2, w3, s3, zero if zero is not None else s3, bias if bias is not None else s3, out,
            m, n, k, m_bucket(m),
            x2.stride(0), x2.stride(1), w3.stride(0), w3.stride(1), w3.stride(2),
            s3.stride(0), s3.stride(1), s3.stride(2), out.stride(0), out.stride(1))
    consts = dict(BITS=bits, GROUP=group, FMT=FMT_CODES[fmt], HAS_BIAS=bias is not None,
                  DOT=dot, PRECISION="ieee" if dot == tl.float32 else "tf32")
    key = (fmt, bits, group, m_bucket(m), n, k, str(x2.dtype))
    if config is None:
        try:
            wq_gemm[grid](*args, **consts)
            chosen[key] = getattr(wq_gemm, "best_config", None)
            return
        except OutOfResources as e:  # the shared-memory model let an oversized tile through
            warnings.warn(f"qcompile: {e}; retrying with the smallest tile (please report the shape)")
            config = SMALLEST
    wq_gemm_kernel[grid](*args, **consts, **config.kwargs, num_warps=config.num_warps,
                         num_stages=config.num_stages)
    chosen[key] = config


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


def _run(x2, qweight, scale, zero, bias, fmt, bits, group, config):
    """Small M may split K, adding into a zeroed float32 workspace; otherwise y is the output."""
    m, n = x2.shape[0], qweight.shape[-1]
    split = m_bucket(m) <= SPLIT_M_BUCKET
    out = (torch.zeros if split else torch.empty)(m, n, dtype=torch.float32 if split else x2.dtype,
                                                   device=x2.device)
    if out.numel():
        _launch(x2, qweight, scale, zero, bias, fmt, bits, group, out, config)
    return out.to(x2.dtype)


@wq_linear.register_fake
def _(x, qweight, scale, zero, bias, fmt, bits, group_size):
    return x.new_empty(*x.shape[:-1], qweight.shape[-1])
