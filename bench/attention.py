"""python -m bench.attention: decode attention over a quantized KV cache on the GPU, against
fp16 SDPA (flash) and plain torch.compile of the eager dequantize + SDPA, in one run.

One new token per sequence, 32 query heads on 8 KV heads, head_dim 128; contexts 1k-128k,
batch 1/8/32 (pairs whose fp16 cache exceeds --max-gb are skipped). Caches smaller than twice
the L2 are rotated across copies, as bench/linear.py does with weights. Reports us, speed-up
over fp16 SDPA, % of the HBM roofline (cache bytes read / copy bandwidth), cache memory, and
the max abs error of the output against fp16 SDPA on the unquantized K and V.
"""
import argparse
import datetime
import json
import os

import torch
import torch.nn.functional as F

import qcompile.runtime.kv_ops  # noqa: F401  registers qcompile::kv_attention
from bench.linear import L2_BYTES, copy_bandwidth, time_rotated
from qcompile.formats.kv import kv_attention_reference, quantize_kv

HQ, HKV, D = 32, 8, 128
CONTEXTS = [1024, 4096, 16384, 32768, 131072]
BATCHES = [1, 8, 32]
KV = {"int8": (8, 128), "int4": (4, 32)}  # bits, group


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def copies_of(tensors):
    n = max(1, min(8, int(2 * L2_BYTES // nbytes(tensors)) + 1))
    return [tensors] + [tuple(t.clone() for t in tensors) for _ in range(n - 1)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--max-gb", type=float, default=9.0, help="skip fp16 caches larger than this")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    a = p.parse_args()
    bw = copy_bandwidth()
    gpu = torch.cuda.get_device_name().split()[1].lower()
    path = os.path.join(a.out, f"{datetime.date.today()}-{gpu}-attention.json")
    rows = []
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bw": bw, "rows": rows,
           "heads": [HQ, HKV, D]}
    compiled_ref = torch.compile(kv_attention_reference)
    for ctx in map(int, a.contexts.split(",")):
        for b in map(int, a.batches.split(",")):
            if 2 * b * HKV * ctx * D * 2 > a.max_gb * 2**30:
                continue
            torch.manual_seed(0)
            k, v = (torch.randn(b, HKV, ctx, D, dtype=torch.float16, device="cuda") for _ in range(2))
            q = torch.randn(b, HQ, 1, D, dtype=torch.float16, device="cuda")
            exact = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            fp16 = copies_of((k, v))
            t_fp16 = time_rotated(lambda kk, vv: F.scaled_dot_product_attention(q, kk, vv, enable_gqa=True), fp16)
            row = {"context": ctx, "batch": b, "fp16_us": t_fp16, "fp16_cache_bytes": nbytes((k, v)),
                   "fp16_roofline": nbytes((k, v)) / (t_fp16 * 1e-6) / bw, "impl": {}}
            for name, (bits, group) in KV.items():
                kq, vq = quantize_kv(k, bits, group), quantize_kv(v, bits, group)
                cache = (*kq, *vq)
                cbytes = nbytes(cache)
                ref = kv_attention_reference(q, kq, vq, bits, ctx)
                for impl, fn in ((f"qcompile {name}", lambda *c: torch.ops.qcompile.kv_attention(q, *c, ctx, bits)),
                                 (f"inductor {name}", lambda *c: compiled_ref(q, c[:3], c[3:], bits, ctx))):
                    out = fn(*cache)
                    t = time_rotated(fn, copies_of(cache))
                    row["impl"][impl] = {"us": t, "speedup": t_fp16 / t, "roofline": cbytes / (t * 1e-6) / bw,
                                         "cache_bytes": cbytes, "max_abs_err_vs_fp16": (out - exact).abs().max().item(),
                                         "max_abs_err_vs_reference": (out - ref).abs().max().item()}
                del kq, vq, cache
            rows.append(row)
            with open(path, "w") as f:
                json.dump(res, f, indent=1)
            print(f"ctx {ctx:6d} batch {b:2d} fp16 {t_fp16:8.1f}us ({row['fp16_roofline']:.0%}) " + "  ".join(
                f"{n} {r['speedup']:.2f}x ({r['roofline']:.0%}, err {r['max_abs_err_vs_fp16']:.1e})"
                for n, r in row["impl"].items()), flush=True)
            del k, v, fp16
            torch.cuda.empty_cache()
    print("wrote", path)


if __name__ == "__main__":
    main()
