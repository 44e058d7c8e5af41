"""Where the Triton kernels can run: compiled on CUDA, interpreted on CPU under TRITON_INTERPRET=1."""
import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernel_unavailable_reason(device: torch.device) -> str | None:
    """None when the Triton kernels can run on ``device``, else why not (for explain())."""
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        return None if interpreting() else "CPU tensors and TRITON_INTERPRET is not 1 (no Triton backend for CPU)"
    return f"device type {device.type!r} has no Triton backend here"
