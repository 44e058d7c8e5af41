"""Where the Triton kernels can run: compiled on CUDA, interpreted on CPU under TRITON_INTERPRET=1."""
import functools
import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def dry_run() -> bool:
    """QCOMPILE_DRY_RUN=1 (``qcompile dump --model`` without a GPU): the pass matches on the CPU
    as it would on a GPU, and the matched ops compute the format's reference instead of a kernel."""
    return os.environ.get("QCOMPILE_DRY_RUN") == "1"


def match_blocked_reason(device: torch.device) -> str | None:
    """Why the pass must leave a matmul on ``device`` to Inductor, or None."""
    reason = kernel_unavailable_reason(device)
    return None if reason is not None and device.type == "cpu" and dry_run() else reason


def kernel_unavailable_reason(device: torch.device) -> str | None:
    """None when the Triton kernels can run on ``device``, else why not (for explain())."""
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        return None if interpreting() else "CPU tensors and TRITON_INTERPRET is not 1 (no Triton backend for CPU)"
    return f"device type {device.type!r} has no Triton backend here"


@functools.lru_cache(maxsize=None)
def max_shared_mem(device_index: int) -> int:
    """Bytes of shared memory one program may use: the bound the tile pruning respects."""
    import triton
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]
