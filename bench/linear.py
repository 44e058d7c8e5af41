"""python -m bench.linear: W-only linear speed on the GPU against fp16 cuBLAS and the peers.

Kernel time per call inside one CUDA graph (triton.testing.do_bench_cudagraph), each call
reading a different copy of the weights so that together they exceed L2, as a real model's
layers do. Reports us, speed-up over cuBLAS in the same activation dtype and % of the HBM
roofline (bytes moved / measured copy bandwidth); checks every qcompile configuration
against the format's reference in the same run.

Peers: cuBLAS (x @ w.t()), torch's int4 kernel ``aten._weight_int4pack_mm`` (tinygemm,
what torchao's int4 uses; bf16 activations only, so it is timed against the bf16 cuBLAS
figure), and plain torch.compile (Inductor) of the format's reference forward.
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
import qcompile.runtime.ops as ops  # registers the qcompile:: ops
from qcompile.formats import Packed, get_format

# Every bench compiles one reference function per shape, M and backend: dynamo's default limit of
# 8 recompiles per code object would silently send the rest to eager.
torch._dynamo.config.recompile_limit = torch._dynamo.config.accumulated_recompile_limit = 4096

L2_BYTES = 50e6
SHAPES = [(4096, 4096), (6144, 4096), (14336, 4096), (4096, 14336), (28672, 8192)]
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def copy_bandwidth():
    src = torch.empty(2**28, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = do_bench_cudagraph(lambda: dst.copy_(src))
    return 2 * src.numel() / (t * 1e-3)


def _nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _copies(tensors):
    """Enough clones of ``tensors`` that reading all of them once overflows L2."""
    n = max(1, math.ceil(2 * L2_BYTES / _nbytes(tensors)))
    return [tuple(None if t is None else t.clone() for t in tensors) for _ in range(n)]


def time_rotated(fn, args_list):
    """us per call, calls rotating over args_list inside one graph."""
    t = do_bench_cudagraph(lambda: [fn(*a) for a in args_list])
    return t * 1e3 / len(args_list)


def tinygemm_weights(n, k, group):
    """Random 4-bit weights in tinygemm's packed layout with bf16 scales and zeros."""
    codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
    packed = torch.ops.aten._convert_weight_to_int4pack(codes, 8)
    sz = torch.randn(k // group, n, 2, dtype=torch.bfloat16, device="cuda") * 0.01
    return packed, sz


def reference_fn(fmt, bits, k):
    dequant = get_format(fmt).dequantize
    return lambda x, qw, s, z: x @ dequant(Packed(qw, s, z), bits, k).to(x.dtype)


def run(shapes, ms, configs, dtype_names, inductor, tinygemm, path):
    """Writes the results to ``path`` after every row, so a run cut short keeps what it measured."""
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    rows = []
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": __import__("triton").__version__, "copy_bw": bw, "rows": rows}
    for dname in dtype_names:
        dtype = DTYPES[dname]
        for n, k in shapes:
            torch.manual_seed(0)
            w = torch.randn(n, k, dtype=dtype, device="cuda") / k**0.5
            dense = _copies((w,))
            layers = {}
            for fmt, bits, group in configs:
                lin = torch.nn.Linear(k, n, bias=False, dtype=dtype, device="cuda")
                lin.weight.data = w
                q = qcompile.QuantLinear.from_linear(lin, get_format(fmt), bits, group)
                layers[fmt, bits, group] = (q, _nbytes((q.qweight, q.scale, q.zero)),
                                            _copies((q.qweight, q.scale, q.zero)))
            tiny = _copies(tinygemm_weights(n, k, 128)) if tinygemm and dtype == torch.bfloat16 else None
            compiled = {c: torch.compile(reference_fn(c[0], c[1], k)) for c in inductor if c in layers}
            for m in ms:
                x = torch.randn(m, k, dtype=dtype, device="cuda")
                t_dense = time_rotated(lambda wi: F.linear(x, wi), dense)
                io = (m * k + m * n) * x.element_size()
                row = {"N": n, "K": k, "M": m, "dtype": dname, "cublas_us": t_dense,
                       "cublas_roofline": (n * k * x.element_size() + io) / (t_dense * 1e-6) / bw, "impl": {}}

                def record(name, t, nbytes, **extra):
                    row["impl"][name] = {"us": t, "speedup": t_dense / t,
                                         "roofline": (nbytes + io) / (t * 1e-6) / bw, **extra}

                for (fmt, bits, group), (q, nbytes, copies) in layers.items():
                    g = k if group == -1 else group
                    out = torch.ops.qcompile.wq_linear(x, q.qweight, q.scale, q.zero, None, fmt, bits, group)
                    ref = q(x)
                    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                    t = time_rotated(lambda qw, s, z: torch.ops.qcompile.wq_linear(x, qw, s, z, None, fmt, bits, group), copies)
                    record(f"qcompile {fmt} w{bits} g{group}", t, nbytes, rel_err=err,
                           config=str(ops.chosen[ops.tuning_key(fmt, bits, g, m, n, k, dtype)]))
                    if (fmt, bits, group) in compiled:
                        f = compiled[fmt, bits, group]
                        f(x, *copies[0])  # compile outside the graph capture
                        t = time_rotated(lambda qw, s, z: f(x, qw, s, z), copies)
                        record(f"inductor {fmt} w{bits} g{group}", t, nbytes)
                if tiny is not None:
                    t = time_rotated(lambda wp, sz: torch.ops.aten._weight_int4pack_mm(x, wp, 128, sz), tiny)
                    record("tinygemm w4 g128", t, _nbytes(tiny[0]))
                rows.append(row)
                with open(path, "w") as f:
                    json.dump(res, f, indent=1)
                print(f"{dname} {n}x{k} M={m:5d} cuBLAS {t_dense:8.1f}us ({row['cublas_roofline']:.0%}) " + "  ".join(
                    f"{name} {v['speedup']:.2f}x ({v['roofline']:.0%})" for name, v in row["impl"].items()), flush=True)
    return res


def _configs(text):
    return [(f, int(b), int(g)) for f, b, g in (c.split(":") for c in text.split(",") if c)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="all", help="NxK,... or all")
    p.add_argument("--m", default=",".join(map(str, MS)))
    p.add_argument("--configs", default="affine:4:128,bipolar:4:128", help="format:bits:group,...")
    p.add_argument("--dtypes", default="fp16,bf16")
    p.add_argument("--inductor", default="affine:4:128", help="configs also timed as plain torch.compile")
    p.add_argument("--no-tinygemm", action="store_true")
    p.add_argument("--name", default="linear")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    a = p.parse_args()
    shapes = SHAPES if a.shapes == "all" else [tuple(map(int, s.split("x"))) for s in a.shapes.split(",")]
    gpu = torch.cuda.get_device_name().split()[1].lower()
    path = os.path.join(a.out, f"{datetime.date.today()}-{gpu}-{a.name}.json")
    run(shapes, [int(m) for m in a.m.split(",")], _configs(a.configs), a.dtypes.split(","),
        _configs(a.inductor), not a.no_tinygemm, path)
    print("wrote", path)


if __name__ == "__main__":
    main()
