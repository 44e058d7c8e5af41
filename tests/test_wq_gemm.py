"""The qcompile::wq_linear op (the Triton template) against each format's reference forward."""
import pytest
import torch

from conftest import DTYPES, assert_close
from qcompile.codegen.tiling import DEQUANT_MIN_M, GEMV_MAX_M, m_bucket, smem_bytes
from qcompile.formats import FORMATS, QuantLinear
from qcompile.runtime.ops import launches


def reference_and_op(name, bits, group, dtype, device, k=96, n=17, m=3, bias=True):
    torch.manual_seed(bits)
    q = QuantLinear.from_linear(torch.nn.Linear(k, n, bias=bias).to(dtype), FORMATS[name], bits, group).to(device)
    x = torch.randn(m, k, dtype=dtype, device=device)
    out = torch.ops.qcompile.wq_linear(x, q.qweight, q.scale, q.zero, q.bias, name, bits, group)
    return out, q(x)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("kernel, m", [("gemv", GEMV_MAX_M), ("gemm", GEMV_MAX_M + 3), ("dequant", DEQUANT_MIN_M)])
def test_every_format_and_width(name, bits, dtype, kernel, m, device):
    # group 32: deferred dequantization; 24: per-element dequantization (a K tile spans groups)
    launches.clear()
    for group in (32, 24, -1):
        assert_close(*reference_and_op(name, bits, group, dtype, device, m=m), dtype)
    assert launches == {(kernel, name, bits): 3}


@pytest.mark.parametrize("group", [32, 16])  # 16: a GEMM K tile spans groups, dequantized per weight
@pytest.mark.parametrize("kernel, m", [("gemv", 1), ("gemm", 5), ("dequant", DEQUANT_MIN_M)])
def test_fractional_zero_points_stay_exact(kernel, m, group, device):
    """affine zero points need not be integers (checkpoints from other quantizers store float
    zeros): 2**23 + 7.37 would round to 2**23 + 7 inside a float32 mantissa trick."""
    torch.manual_seed(3)
    q = QuantLinear.from_linear(torch.nn.Linear(128, 24), FORMATS["affine"], 4, group).to(device)
    q.zero += torch.rand_like(q.zero)
    x = torch.randn(m, 128, device=device)
    launches.clear()
    out = torch.ops.qcompile.wq_linear(x, q.qweight, q.scale, q.zero, q.bias, "affine", 4, group)
    assert launches == {(kernel, "affine", 4): 1}
    assert_close(out, q(x), torch.float32)


@pytest.mark.parametrize("m", [1, 17, 40])
@pytest.mark.parametrize("name", ["affine", "bcq"])
def test_odd_shapes(name, m, device):
    assert_close(*reference_and_op(name, 3, 16, torch.float16, device, k=80, n=33, m=m, bias=False), torch.float16)


def test_shared_memory_model_counts_every_operand():
    cfg = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128}
    # 3 stages x (x tile 16*128*2 + 4-bit weights 128*64/2 + scale and zero rows 2*64*2) + dot operand 128*64*2
    assert smem_bytes(cfg, 3, 2, 4, 0, 2) == 3 * (4096 + 4096 + 256) + 16384 + 32768
    # bcq reads a scale row per plane, planes store exactly bits/8 bytes per weight
    assert smem_bytes(cfg, 1, 2, 3, 3, 2) == 4096 + 3072 + 3 * 128 + 16384 + 32768
    # 3-bit fields hold 10 codes a word, which fill 16 K positions of the tile (6 meet zeros)
    assert smem_bytes(cfg, 1, 2, 3, 1, 2) == 4096 + 128 // 16 * 64 * 4 + 128 + 16384 + 32768


SPLIT_CONFIGS = {"gemm": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32},
                 "gemv": {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_KW": 2}}


@pytest.mark.parametrize("kernel", SPLIT_CONFIGS)
@pytest.mark.parametrize("split", [2, 3])
@pytest.mark.parametrize("name, group", [("affine", 32), ("bcq", 24), ("symmetric", -1)])
def test_split_k_sums_every_k_range_once(name, group, split, kernel, device):
    """Split-K: the last program of a tile adds every K range's partial sum (bias once),
    the same sum on a second call, and leaves the tile counters at zero for the next launch."""
    import triton
    from qcompile.runtime.ops import _locks, _run
    torch.manual_seed(0)
    q = QuantLinear.from_linear(torch.nn.Linear(192, 40).half(), FORMATS[name], 4, group).to(device)
    x = torch.randn(2, 192, dtype=torch.float16, device=device)
    config = triton.Config({**SPLIT_CONFIGS[kernel], "SPLIT_K": split}, num_stages=1, num_warps=4)
    g = 192 if group == -1 else group
    out = _run(x, q.qweight, q.scale, q.zero, q.bias, name, 4, g, config, kernel)
    assert_close(out, q(x), torch.float16)
    assert torch.equal(out, _run(x, q.qweight, q.scale, q.zero, q.bias, name, 4, g, config, kernel))
    assert not _locks[x.device].any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autotuning times compiled kernels on a CUDA device")
@pytest.mark.parametrize("m, kernel", [(1, "gemv"), (200, "gemm")])
def test_autotuned_config_fits_shared_memory_and_is_correct(m, kernel, monkeypatch, tmp_path):
    from qcompile.runtime.device import max_shared_mem
    from qcompile.runtime.ops import chosen, compiled
    monkeypatch.setenv("QCOMPILE_AUTOTUNE", "1")
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path))
    launches.clear()
    out, ref = reference_and_op("affine", 4, 128, torch.float16, "cuda", k=1024, n=512, m=m)
    assert_close(out, ref, torch.float16)
    assert launches == {(kernel, "affine", 4): 1}
    (key,) = [key for key in chosen if key[-3:] == (512, 1024, "float16") and key[3] == m_bucket(m)]
    assert chosen[key].kernel == kernel
    best = chosen[key].config
    assert compiled[key].metadata.shared <= max_shared_mem(0), "Triton's own count of the shared memory used"
    if kernel == "gemm":
        assert smem_bytes(best.kwargs, best.num_stages, 2, 4, 0, 2) <= max_shared_mem(0)
        assert best.kwargs["SPLIT_K"] == 1, "split-K only for small M"


@pytest.mark.parametrize("name, bits, group, k", [("affine", 4, 16, 208), ("bcq", 3, 32, 320),
                                                   ("symmetric", 8, 8, 200), ("bipolar", 2, 64, 448)])
@pytest.mark.parametrize("split", [1, 2])
def test_gemv_tile_spanning_groups_scales_each_word(name, bits, group, k, split, device):
    """A GEMV tile wider than the group (the wide one-round-trip tiles) keeps deferred
    dequantization: each word's dot product is scaled by its own group's scale."""
    import triton
    from qcompile.runtime.ops import _run
    torch.manual_seed(1)
    q = QuantLinear.from_linear(torch.nn.Linear(k, 40).half(), FORMATS[name], bits, group).to(device)
    x = torch.randn(1, k, dtype=torch.float16, device=device)
    config = triton.Config({"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_KW": 8, "SPLIT_K": split}, num_stages=1, num_warps=4)
    assert_close(_run(x, q.qweight, q.scale, q.zero, q.bias, name, bits, group, config, "gemv"), q(x), torch.float16)


@pytest.mark.parametrize("m, block_m", [(3, 4), (5, 4), (8, 8), (2, 2)])
@pytest.mark.parametrize("name, bits, group", [("affine", 4, 16), ("bcq", 2, 32), ("symmetric", 3, -1)])
def test_gemv_with_several_rows_per_program(name, bits, group, m, block_m, device):
    """The small-batch GEMV dequantizes each tile once for BLOCK_M rows (rows past M masked)."""
    import triton
    from qcompile.runtime.ops import _run
    torch.manual_seed(2)
    q = QuantLinear.from_linear(torch.nn.Linear(160, 24).half(), FORMATS[name], bits, group).to(device)
    x = torch.randn(m, 160, dtype=torch.float16, device=device)
    config = triton.Config({"BLOCK_M": block_m, "BLOCK_N": 16, "BLOCK_KW": 2, "SPLIT_K": 2}, num_stages=1, num_warps=2)
    g = 160 if group == -1 else group
    assert_close(_run(x, q.qweight, q.scale, q.zero, q.bias, name, bits, g, config, "gemv"), q(x), torch.float16)


def test_small_batches_tune_between_gemm_and_gemv_alternately():
    from qcompile.codegen.tiling import candidates
    # K wide enough for several GEMV tiles on a GPU too
    args = dict(x=torch.empty(5, 1024, dtype=torch.float16), s=torch.empty(1, 32, 8, dtype=torch.float16),
                M_BUCKET=8, K=1024, BITS=4, GROUP=32, FMT=0, CODES=8)
    kinds = [c.kernel for c in candidates(5, args)]
    assert kinds[:4] == ["gemm", "gemv", "gemm", "gemv"] and set(kinds) == {"gemm", "gemv"}
    assert {c.kernel for c in candidates(2, args)} == {"gemv"} and {c.kernel for c in candidates(17, args)} == {"gemm"}
