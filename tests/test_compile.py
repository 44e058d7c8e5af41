"""torch.compile(backend="qcompile") against the eager reference, one compile per dtype for a
model holding every format x bit width, so the suite pays a few compiles, not hundreds."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcompile
from conftest import DTYPES, assert_close
from qcompile.codegen.tiling import GEMV_MAX_M
from qcompile.runtime.ops import launches

K, N = 96, 17  # K not a multiple of most tiles or of 32 // bits; N odd
LAYERS = [(name, bits, group) for name in qcompile.FORMATS for bits in range(1, 9) for group in (32, -1)]


class Zoo(nn.Module):
    """One QuantLinear per (format, bits, group); forward returns every layer's output."""

    def __init__(self, dtype, device):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList()
        for i, (name, bits, group) in enumerate(LAYERS):
            layer = nn.Sequential(nn.Linear(K, N, bias=i % 2 == 0)).to(dtype)
            qcompile.quantize(layer, bits=bits, group_size=group, format=name)
            self.layers.append(layer[0])
        self.to(device)

    def forward(self, x):
        return [layer(x) for layer in self.layers]


INPUTS = {  # name -> (shape maker); automatic dynamic shapes let the 2-D inputs share a graph
    "M=3": lambda d, dev: torch.randn(3, K, dtype=d, device=dev),
    "M=1": lambda d, dev: torch.randn(1, K, dtype=d, device=dev),
    "M=17": lambda d, dev: torch.randn(17, K, dtype=d, device=dev),
    "3D": lambda d, dev: torch.randn(2, 5, K, dtype=d, device=dev),
    "non-contiguous": lambda d, dev: torch.randn(K, 4, dtype=d, device=dev).t(),
}


# One xdist worker per dtype under `pytest -n N --dist loadgroup` (bench/gpu.sh): each worker
# that meets a zoo compiles it, minutes of Triton compiles on a GPU.
@pytest.fixture(scope="module", params=[pytest.param(d, marks=pytest.mark.xdist_group(str(d))) for d in DTYPES],
                ids=str)
def zoo(request, device):
    model = Zoo(request.param, device)
    with torch.no_grad():
        report = qcompile.explain(model, INPUTS["M=3"](request.param, device))
    return model, torch.compile(model, backend="qcompile"), report, request.param


def test_every_layer_matched(zoo):
    model, _, report, dtype = zoo
    assert len(report.matched) == len(LAYERS) and not report.fallbacks, str(report)
    assert [(m.format, m.bits, m.group_size) for m in report.matched] == LAYERS
    assert all(m.kernel.startswith("wq_linear[") for m in report.matched)
    assert report.graph_breaks == 0


@pytest.mark.parametrize("shape", INPUTS)
def test_compiled_equals_eager_reference(zoo, shape, device):
    model, compiled, _, dtype = zoo
    x = INPUTS[shape](dtype, device)
    launches.clear()
    with torch.no_grad():
        outs = compiled(x)
    kernel = "gemv" if x.numel() // K <= GEMV_MAX_M else "gemm"
    assert launches == {(kernel, name, bits): 2 for name, bits, _ in LAYERS}, "every layer ran its qcompile kernel"
    with torch.no_grad():
        refs = model(x)
    for (name, bits, group), out, ref in zip(LAYERS, outs, refs):
        try:
            assert_close(out, ref, dtype)
        except AssertionError as e:
            raise AssertionError(f"{name} bits={bits} group={group} {shape}: {e}") from None


class HandWritten(nn.Module):
    """Dequantizations written outside qcompile: gpt-fast style int8, and one no format knows."""

    def __init__(self, k):
        super().__init__()
        self.register_buffer("w8", torch.randint(-127, 128, (24, k), dtype=torch.int8))
        self.register_buffer("s8", torch.rand(24) / 100)
        self.register_buffer("odd", torch.randint(0, 15, (24, k), dtype=torch.int32))

    def forward(self, x):
        a = F.linear(x, self.w8.to(x.dtype) * self.s8[:, None])
        b = F.linear(x, (self.odd.to(x.dtype) - 7.5) * 0.01)  # no qcompile format: stays as is
        return a, b


def explain_compile_eager(model, x):
    with torch.no_grad():
        return qcompile.explain(model, x), torch.compile(model, backend="qcompile")(x), model(x)


def test_hand_written_int8_matches_and_unknown_dequant_falls_back(device):
    report, outs, refs = explain_compile_eager(HandWritten(64).to(device), torch.randn(5, 64, device=device))
    assert [(m.format, m.bits) for m in report.matched] == [("int8_weight_only", 8)]
    assert len(report.fallbacks) == 1 and "matches no qcompile format" in report.fallbacks[0].reason
    for out, ref in zip(outs, refs):
        assert_close(out, ref, torch.float32)


def test_int8_with_k_not_multiple_of_4_falls_back_with_reason(device):
    report, outs, refs = explain_compile_eager(HandWritten(66).to(device), torch.randn(2, 66, device=device))
    assert not report.matched
    assert any("multiple of 4" in f.reason for f in report.fallbacks), str(report)
    assert_close(outs[0], refs[0], torch.float32)


def test_listen_reports_a_graph_the_caches_would_serve(device):
    """A graph compiled before comes back from Inductor's FX graph cache without running any
    pass; listen() bypasses the caches, so that it still reports the match."""
    model = nn.Sequential(nn.Linear(64, 8))
    qcompile.quantize(model, bits=4, group_size=32)
    model.to(device)
    x = torch.randn(3, 64, device=device)
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=True):
        torch.compile(model, backend="qcompile")(x)  # fills the cache
        torch._dynamo.reset()
        with qcompile.backend.listen(qcompile.Report()) as report:
            torch.compile(model, backend="qcompile")(x)
    assert [(m.format, m.bits) for m in report.matched] == [("affine", 4)], str(report)


def test_autograd_graphs_are_left_to_inductor(device):
    model = nn.Sequential(nn.Linear(64, 8))
    qcompile.quantize(model, group_size=32)
    model.to(device)
    x = torch.randn(3, 64, device=device, requires_grad=True)
    report = qcompile.explain(model, x)
    assert not report.matched and "inference-only" in report.fallbacks[0].reason


def test_debug_dir_dumps_graphs_and_summary(tmp_path, device, monkeypatch):
    monkeypatch.setenv("QCOMPILE_DEBUG_DIR", str(tmp_path))
    model = nn.Sequential(nn.Linear(64, 8))
    qcompile.quantize(model, bits=3, group_size=32, format="bipolar")
    model.to(device)
    with torch.no_grad():
        qcompile.explain(model, torch.randn(2, 4, 64, device=device))
    (folder,) = tmp_path.iterdir()
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["00_before.txt", "01_after_scaled_linear.txt", "01_rewrites_scaled_linear.json",
                     "02_after_wonly_linear.txt", "02_rewrites_wonly_linear.json", "03_after_sibling_linears.txt",
                     "03_rewrites_sibling_linears.json", "04_after_kv_attention.txt", "04_rewrites_kv_attention.json",
                     "summary.json"]
    after = (folder / "02_after_wonly_linear.txt").read_text()
    assert "qcompile.wq_linear" in after and "aten.mm" not in after
    assert "aten.add" not in after, "the bias add is folded into the kernel"
    assert not json.loads((folder / "01_rewrites_scaled_linear.json").read_text())["after"]["nodes"]
    region = json.loads((folder / "02_rewrites_wonly_linear.json").read_text())
    removed = {n["op"] for n in region["before"]["nodes"] if n["role"] == "removed"}
    assert {"mm", "add", "bitwise_and"} <= removed  # the dequantization, the matmul and the bias add
    assert [n["op"] for n in region["after"]["nodes"] if n["role"] == "added"] == ["wq_linear"]
    assert '"format": "bipolar"' in (folder / "summary.json").read_text()


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


def test_backend_found_through_entry_point_without_import():
    r = _run("import torch; print('qcompile' in torch._dynamo.list_backends())")
    assert r.stdout.strip() == "True", r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU without the interpreter only")
def test_cpu_without_interpreter_falls_back_with_reason():
    r = _run("import torch, qcompile\n"
             "m = torch.nn.Sequential(torch.nn.Linear(64, 8)); qcompile.quantize(m, group_size=32)\n"
             "x = torch.randn(2, 64)\n"
             "with torch.no_grad():\n"
             "    rep = qcompile.explain(m, x)\n"
             "    torch.testing.assert_close(torch.compile(m, backend='qcompile')(x), m(x))\n"
             "print(rep.fallbacks[0].reason)", TRITON_INTERPRET="0")
    assert "TRITON_INTERPRET" in r.stdout, r.stderr[-2000:]


class MulSum(nn.Module):
    """An M=1 matmul as Inductor's max-autotune decomposition writes it, upcasts included."""

    def __init__(self):
        super().__init__()
        self.q = qcompile.quantize(nn.Sequential(nn.Linear(64, 24)), bits=5, group_size=32, format="symmetric")[0]

    def forward(self, x):
        w = self.q.fmt.dequantize(self.q.packed, self.q.bits, self.q.in_features)
        return (x.float().unsqueeze(2) * w.float().unsqueeze(0)).sum(1).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_mul_sum_form_of_a_matmul_is_matched(dtype, device):
    model = MulSum().to(device=device, dtype=dtype)
    report, out, ref = explain_compile_eager(model, torch.randn(1, 64, device=device, dtype=dtype))
    assert [(m.format, m.bits) for m in report.matched] == [("symmetric", 5)], str(report)
    assert_close(out, ref, dtype)


def test_a_matcher_error_falls_back_instead_of_failing_the_compile(monkeypatch, device):
    import qcompile.passes.wonly_linear as pass_module

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(pass_module, "find", broken)
    report, outs, refs = explain_compile_eager(HandWritten(64).to(device), torch.randn(3, 64, device=device))
    assert not report.matched and len(report.fallbacks) == 2
    assert all("matcher error: RuntimeError: boom" in f.reason for f in report.fallbacks)
    for out, ref in zip(outs, refs):
        assert_close(out, ref, torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs (mode='reduce-overhead') need a CUDA device")
def test_reduce_overhead_cuda_graphs_replay_the_split_k_kernels(monkeypatch):
    """Split-K kernels keep tile counters across launches: allocated inside the first launch,
    they would sit in the CUDA-graph pool and cudagraph trees would refuse the replay."""
    import qcompile.runtime.ops as ops
    monkeypatch.setattr(ops, "_locks", {})  # none left by earlier tests
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(512, 384), nn.Linear(384, 256)).half().cuda()
    qcompile.quantize(model, bits=4, group_size=128)
    compiled = torch.compile(model, backend="qcompile", mode="reduce-overhead")
    with torch.no_grad():
        for m in (1, 1, 1, 4, 4, 4):  # warm-up, record, replay; the GEMV and the multi-row kernels
            x = torch.randn(m, 512, dtype=torch.float16, device="cuda")
            assert_close(compiled(x).clone(), model(x), torch.float16)
