"""python -m bench.profile NxK M [--config affine:4:128] [--launches 3]: launch the tuned W-only
kernel of one layer a few times and nothing else, for Nsight Compute to profile the last launch
(bench/gpu.sh's profile stage: a first run tunes and fills the autotune cache, then
``ncu --launch-skip 2 --launch-count 1 -k regex:wq_`` profiles the chosen config).
"""
import argparse

import torch

import qcompile
import qcompile.runtime.ops as ops
from qcompile.formats import get_format


def main():
    p = argparse.ArgumentParser()
    p.add_argument("shape", help="NxK")
    p.add_argument("m", type=int)
    p.add_argument("--config", default="affine:4:128", help="format:bits:group")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    p.add_argument("--launches", type=int, default=3)
    a = p.parse_args()
    n, k = map(int, a.shape.split("x"))
    fmt, bits, group = a.config.split(":")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=False, dtype=dtype, device="cuda")
    q = qcompile.QuantLinear.from_linear(lin, get_format(fmt), int(bits), int(group))
    x = torch.randn(a.m, k, dtype=dtype, device="cuda")
    for _ in range(a.launches):
        torch.ops.qcompile.wq_linear(x, q.qweight, q.scale, q.zero, None, fmt, int(bits), int(group))
    torch.cuda.synchronize()
    g = k if int(group) == -1 else int(group)
    print(a.shape, "M =", a.m, ops.chosen[ops.tuning_key(fmt, int(bits), g, a.m, n, k, dtype)])


if __name__ == "__main__":
    main()
