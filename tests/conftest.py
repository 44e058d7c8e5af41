"""CPU runs test the Triton kernels through the interpreter; on a GPU they run compiled.
TRITON_INTERPRET must be set before triton is imported, hence here."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("QCOMPILE_AUTOTUNE", "0")  # one heuristic config per shape in tests

import pytest  # noqa: E402

# The shared models are compiled once per dtype and input rank, plus explain()'s compiles.
torch._dynamo.config.recompile_limit = 64

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The kernel dequantizes exactly and scales in fp32; the reference rounds each dequantized
# weight to the activation dtype. Relative to the output's magnitude:
TOL = {torch.float16: 1e-2, torch.bfloat16: 3e-2, torch.float32: 1e-4}


def assert_close(out, ref, dtype):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = (out.float() - ref.float()).abs().max().item() / max(ref.float().abs().max().item(), 1e-6)
    assert err <= TOL[dtype], f"relative error {err:.2e} > {TOL[dtype]:.0e}"


@pytest.fixture(scope="session")
def device():
    return DEVICE
