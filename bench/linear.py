"""python -m bench.linear: W-only linear speed on the GPU against fp16 cuBLAS (peers: issue 4).

Kernel time per call inside one CUDA graph (triton.testing.do_bench_cudagraph), each call
reading a different copy of the weights so that together they exceed L2, as a real model's
layers do. Reports us, speed-up over fp16 cuBLAS and % of the HBM roofline (bytes moved /
measured copy bandwidth); checks every configuration against the format's reference.
"""
import argparse
import datetime
import json
import math
import os

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

import qcompile
import qcompile.runtime.ops  # noqa: F401  registers the qcompile:: ops

L2_BYTES = 50e6
SHAPES = [(4096, 4096), (6144, 4096), (14336, 4096), (4096, 14336), (28672, 8192)]
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]


def copy_bandwidth():
    src = torch.empty(2**28, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = do_bench_cudagraph(lambda: dst.copy_(src))
    return 2 * src.numel() / (t * 1e-3)


def _copies(nbytes):
    return max(1, math.ceil(2 * L2_BYTES / nbytes))


def time_rotated(fn, args_list):
    """us per call, calls rotating over args_list inside one graph."""
    t = do_bench_cudagraph(lambda: [fn(*a) for a in args_list])
    return t * 1e3 / len(args_list)


def run(shapes, ms, configs, dtype):
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    rows = []
    for n, k in shapes:
        torch.manual_seed(0)
        w = torch.randn(n, k, dtype=dtype, device="cuda") / k**0.5
        fp16_w = [w.clone() for _ in range(_copies(w.numel() * 2))]
        layers = {}
        for fmt, bits, group in configs:
            lin = torch.nn.Linear(k, n, bias=False, dtype=dtype, device="cuda")
            lin.weight.data = w
            q = qcompile.QuantLinear.from_linear(lin, qcompile.formats.get_format(fmt), bits, group)
            nbytes = sum(t.numel() * t.element_size() for t in (q.qweight, q.scale, q.zero) if t is not None)
            copies = [tuple(None if t is None else t.clone() for t in (q.qweight, q.scale, q.zero))
                      for _ in range(_copies(nbytes))]
            layers[fmt, bits, group] = (q, nbytes, copies)
        for m in ms:
            x = torch.randn(m, k, dtype=dtype, device="cuda")
            t16 = time_rotated(lambda wi: F.linear(x, wi), [(wi,) for wi in fp16_w])
            io = (m * k + m * n) * 2
            row = {"N": n, "K": k, "M": m, "dtype": str(dtype), "fp16_us": t16,
                   "fp16_roofline": (n * k * 2 + io) / (t16 * 1e-6) / bw, "impl": {}}
            for (fmt, bits, group), (q, nbytes, copies) in layers.items():
                out = torch.ops.qcompile.wq_linear(x, q.qweight, q.scale, q.zero, None, fmt, bits, group)
                ref = q(x)
                err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                t = time_rotated(lambda qw, s, z: torch.ops.qcompile.wq_linear(x, qw, s, z, None, fmt, bits, group),
                                 copies)
                row["impl"][f"qcompile {fmt} w{bits} g{group}"] = {
                    "us": t, "speedup": t16 / t, "roofline": (nbytes + io) / (t * 1e-6) / bw, "rel_err": err}
            rows.append(row)
            print(f"{n}x{k} M={m:5d} fp16 {t16:8.1f}us ({row['fp16_roofline']:.0%}) " + "  ".join(
                f"{name.split(' ', 1)[1]} {v['speedup']:.2f}x ({v['roofline']:.0%})" for name, v in row["impl"].items()))
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bw": bw, "rows": rows}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="all")
    p.add_argument("--m", default=",".join(map(str, MS)))
    p.add_argument("--configs", default="affine:4:128,bipolar:4:128,affine:2:128,affine:8:128")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    a = p.parse_args()
    shapes = SHAPES if a.shapes == "all" else [tuple(map(int, s.split("x"))) for s in a.shapes.split(",")]
    configs = [(f, int(b), int(g)) for f, b, g in (c.split(":") for c in a.configs.split(","))]
    res = run(shapes, [int(m) for m in a.m.split(",")], configs, torch.float16)
    gpu = torch.cuda.get_device_name().split()[1].lower()
    path = os.path.join(a.out, f"{datetime.date.today()}-{gpu}-linear.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
