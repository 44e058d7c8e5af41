"""python -m bench.scaled: activation-quantized linears (w8a8, fp8, w4a8, and w8a8 with
LLM.int8()'s outlier split, the input having 0.1% outlier features) on the GPU, end to end (the activation
quantization included), against fp16 cuBLAS and the peers, in one run.

Each implementation is a function of (x, weight tensors) timed inside one CUDA graph with the
weights rotated past L2 (bench/linear.py's method). Peers: cuBLAS fp16 (``F.linear``);
``torch._int_mm`` with the quantization and dequantization around it compiled by Inductor (what
torchao's int8 dynamic quantization does); ``torch._scaled_mm`` with row-wise scales for fp8;
plain torch.compile (Inductor) of the format's reference forward. Every qcompile row is checked
against the eager reference in the same run. Rows use bench/linear.py's JSON layout, so
``python -m bench.plot`` draws them.
"""
import argparse
import datetime
import json
import os

import torch
import torch.nn.functional as F

from bench.linear import SHAPES, _copies, _nbytes, copy_bandwidth, time_rotated
from qcompile.formats.scaled import quantize_rows, scaled_forward
from qcompile.formats.w4a8 import W4A8Linear, w4a8_forward

MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 8192]
CODES = {"w8a8": torch.int8, "fp8": torch.float8_e4m3fn, "w8a8-outliers": torch.int8, "w4a8": torch.int8}
OUTLIER_THRESHOLD = {"w8a8-outliers": 6.0}  # LLM.int8()'s
OUTLIER_EVERY = 1000  # input features: one in 1000 (0.1%) is an outlier, x20


def reference(fmt):
    """The format's forward (qcompile/formats/) as a function of its tensors."""
    if fmt == "w4a8":
        return w4a8_forward
    return lambda x, qw, s: scaled_forward(x, qw, s, None, CODES[fmt], OUTLIER_THRESHOLD.get(fmt))


def quantized(w, fmt):
    """The tensors the format stores for a weight: (codes [N, K], scale [N]); w4a8's (qweight,
    zero, scale_int, channel_scale), group 128."""
    if fmt == "w4a8":
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype, device=w.device)
        lin.weight.data = w
        q = W4A8Linear.from_linear(lin, 128)
        return q.qweight, q.zero, q.scale_int, q.channel_scale
    codes, scale = quantize_rows(w, CODES[fmt])
    return codes, scale.squeeze(1)


def int_mm(x, qw, s):
    xq, xs = quantize_rows(x, torch.int8)
    return (torch._int_mm(xq, qw.t()).float() * xs * s).to(x.dtype)


def scaled_mm(x, qw, s):
    xq, xs = quantize_rows(x, torch.float8_e4m3fn)
    return torch._scaled_mm(xq, qw.t(), scale_a=xs, scale_b=s.view(1, -1), out_dtype=x.dtype)


def _profile(fn, path):
    """GPU time per kernel of three calls: what the activation quantization and the outlier
    split cost next to the GEMM."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=90))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="all", help="NxK,... or all")
    p.add_argument("--m", default=",".join(map(str, MS)))
    p.add_argument("--formats", default="w8a8,fp8,w8a8-outliers,w4a8")
    p.add_argument("--profile", action="store_true",
                   help="kernel time per name of each qcompile format at the largest M of each shape")
    p.add_argument("--name", default="scaled", help="results file suffix")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    a = p.parse_args()
    shapes = SHAPES if a.shapes == "all" else [tuple(map(int, s.split("x"))) for s in a.shapes.split(",")]
    bw = copy_bandwidth()
    rows = []
    gpu = torch.cuda.get_device_name().split()[1].lower()
    path = os.path.join(a.out, f"{datetime.date.today()}-{gpu}-{a.name}.json")
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bw": bw, "rows": rows}
    for n, k in shapes:
        torch.manual_seed(0)
        w = torch.randn(n, k, dtype=torch.float16, device="cuda") / k**0.5
        dense = _copies((w,))
        weights = {f: _copies(quantized(w, f)) for f in a.formats.split(",")}
        impls = {}
        # compiled afresh per shape: recompiled for a new shape, a function's weight sizes turn
        # symbolic (automatic dynamic shapes), and w4a8's weight rebuild is then not matched
        torch._dynamo.reset()
        for f in weights:
            impls[f"qcompile {f}"] = torch.compile(reference(f), backend="qcompile")
            impls[f"inductor {f}"] = torch.compile(reference(f))
        peers = {"w8a8": [("torch._int_mm w8a8", torch.compile(int_mm))], "fp8": [("torch._scaled_mm fp8", scaled_mm)],
                 "w8a8-outliers": [], "w4a8": []}
        for m in map(int, a.m.split(",")):
            x = torch.randn(m, k, dtype=torch.float16, device="cuda")
            x[:, ::OUTLIER_EVERY] *= 20
            t_dense = time_rotated(lambda wi: F.linear(x, wi), dense)
            io = (m * k + m * n) * 2
            row = {"N": n, "K": k, "M": m, "dtype": "fp16", "cublas_us": t_dense,
                   "cublas_roofline": (n * k * 2 + io) / (t_dense * 1e-6) / bw, "impl": {}}
            for f, copies in weights.items():
                nbytes = _nbytes(copies[0])
                ref = reference(f)(x, *copies[0])
                for name, fn in ((f"qcompile {f}", impls[f"qcompile {f}"]), (f"inductor {f}", impls[f"inductor {f}"]),
                                 *peers[f]):
                    try:
                        out = fn(x, *copies[0])  # compiles outside the graph capture
                        t = time_rotated(lambda *ws: fn(x, *ws), copies)
                    except Exception as e:  # noqa: BLE001  a peer that cannot take this shape
                        row.setdefault("errors", {})[name] = f"{type(e).__name__}: {str(e)[:200]}"
                        continue
                    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                    row["impl"][name] = {"us": t, "speedup": t_dense / t, "rel_err": err,
                                         "roofline": (nbytes + io) / (t * 1e-6) / bw}
            rows.append(row)
            with open(path, "w") as fh:
                json.dump(res, fh, indent=1)
            if a.profile and m == max(map(int, a.m.split(","))):
                for f, copies in weights.items():
                    _profile(lambda: impls[f"qcompile {f}"](x, *copies[0]),
                             os.path.join(a.out, f"scaled-profile-{f}-{n}x{k}-m{m}.txt"))
            print(f"{n}x{k} M={m:5d} cuBLAS {t_dense:8.1f}us " + "  ".join(
                f"{name} {v['speedup']:.2f}x ({v['roofline']:.0%})" for name, v in row["impl"].items()), flush=True)
    print("wrote", path)


if __name__ == "__main__":
    main()
