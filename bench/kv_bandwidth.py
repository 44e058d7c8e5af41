"""python -m bench.kv_bandwidth: how fast the GPU reads an 8-bit KV cache in each layout of V,
with the decode kernel's access pattern but none of its arithmetic.

Why: the int8 decode kernel stops near 75% of the copy roofline at large batches, and a tile
with 24% fewer instructions ran no faster (README, fourth H200 run). Its K codes are read as
contiguous 8 KB tiles ([T, 128] bytes a head), but V's are token-contiguous ([128, T]: a tile
of 64 tokens is 128 runs of 64 bytes, T bytes apart), the order the tensor cores want. This
probe reads K with V in three layouts, tiles and splits as the kernel has them (one program a
split of a head, BLOCK_T tokens a step, loads pipelined in ``stages``), and sums the bytes so
that nothing is skipped:
- ``rows``: V like K, [T, 128];
- ``tokens``: V token-contiguous, [128, T], as QuantizedStaticCache stored it before it took
  ``blocks`` on this probe's word (README, fifth H200 run);
- ``blocks``: V in blocks of BLOCK_T tokens, [T / BLOCK_T, 128, BLOCK_T]: token-contiguous
  within a tile, each tile one contiguous run.
If ``tokens`` reads slower than the other two, V's layout caps the kernel, and ``blocks`` is
the layout to store. The loads are plain 16-byte loads (Triton moves through cp.async only
loads that feed a dot), K and V summed apart so that neither changes layout; four one-warp
programs an SM keep about 64 KB an SM in flight. Reports GB/s and % of the copy bandwidth,
to $OUT as JSON.
"""
import argparse
import datetime
import json
import os

import torch
import triton
import triton.language as tl

LAYOUTS = ("rows", "tokens", "blocks")
D = 128


@triton.jit
def kv_read_kernel(k_ptr, v_ptr, out_ptr, T, chunk, LAYOUT: tl.constexpr, BLOCK_T: tl.constexpr,
                   D: tl.constexpr):
    """Grid (heads, splits): the sum of K's and V's bytes over this split's tokens."""
    h, split, splits = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    base = h.to(tl.int64) * T * D  # 256 heads of 128k tokens pass 2^31 bytes
    start = split * chunk
    rd = tl.arange(0, D)
    acc_k = tl.zeros((BLOCK_T, D), tl.int32)  # one sum each, in its load's layout: no conversion
    acc_v = tl.zeros((BLOCK_T, D), tl.int32)
    for t0 in range(start, tl.minimum(start + chunk, T), BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        k = tl.load(k_ptr + base + rt[:, None] * D + rd[None, :])
        if LAYOUT == "rows":
            voff = rt[:, None] * D + rd[None, :]
        elif LAYOUT == "tokens":
            voff = rt[:, None] + rd[None, :] * T
        else:
            voff = t0 * D + rd[None, :] * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]
        v = tl.load(v_ptr + base + voff)
        acc_k += k.to(tl.int32)
        acc_v += v.to(tl.int32)
    tl.store(out_ptr + h * splits + split, tl.sum(tl.sum(acc_k, 1), 0) + tl.sum(tl.sum(acc_v, 1), 0))


def v_in(layout: str, v: torch.Tensor, block_t: int) -> torch.Tensor:
    """V [heads, T, D] bytes stored in ``layout`` (contiguous)."""
    h, t, d = v.shape
    if layout == "rows":
        return v.contiguous()
    if layout == "tokens":
        return v.transpose(1, 2).contiguous()
    return v.reshape(h, t // block_t, block_t, d).transpose(2, 3).contiguous()


def read_sums(k, v_stored, layout, splits, block_t, warps, stages):
    """Per head and split, the byte sums kv_read_kernel computes (int32 [heads, splits])."""
    heads, t, _ = k.shape
    chunk = triton.cdiv(triton.cdiv(t, splits), block_t) * block_t
    out = torch.empty(heads, splits, dtype=torch.int32, device=k.device)
    kv_read_kernel[(heads, splits)](k, v_stored, out, t, chunk, LAYOUT=layout, BLOCK_T=block_t, D=D,
                                    num_warps=warps, num_stages=stages)
    return out


def main():
    from bench.linear import copy_bandwidth
    from triton.testing import do_bench_cudagraph

    p = argparse.ArgumentParser()
    p.add_argument("--contexts", default="16384,131072")
    p.add_argument("--heads", default="64,256", help="batch x KV heads: 64 is batch 8 of 8 KV heads")
    p.add_argument("--tiles", default="64,1,3;64,4,3;128,4,3", help='"BLOCK_T,warps,stages;..."')
    p.add_argument("--programs-per-sm", type=int, default=4)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    bw = copy_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s, {sms} SMs")
    rows = []
    for t in map(int, args.contexts.split(",")):
        for heads in map(int, args.heads.split(",")):
            k = torch.randint(0, 256, (heads, t, D), dtype=torch.uint8, device="cuda")
            v = torch.randint(0, 256, (heads, t, D), dtype=torch.uint8, device="cuda")
            want = k.sum(dtype=torch.int64) + v.sum(dtype=torch.int64)  # a program's int32 sum may wrap: mod 2^32
            splits = max(1, args.programs_per_sm * sms // heads)
            for tile in args.tiles.split(";"):
                block_t, warps, stages = map(int, tile.split(","))
                for layout in LAYOUTS:
                    vs = v_in(layout, v, block_t)
                    got = read_sums(k, vs, layout, splits, block_t, warps, stages).sum(dtype=torch.int64)
                    assert (got - want) % 2**32 == 0, (layout, tile, got.item(), want.item())
                    ms = do_bench_cudagraph(lambda: read_sums(k, vs, layout, splits, block_t, warps, stages))
                    rate = 2 * k.numel() / (ms * 1e-3)
                    rows.append({"context": t, "heads": heads, "splits": splits, "block_t": block_t, "warps": warps,
                                 "stages": stages, "layout": layout, "us": ms * 1e3, "bytes_per_s": rate,
                                 "roofline": rate / bw})
                    print(f"T {t:6d} heads {heads:3d} splits {splits:3d} tile {tile:9s} V {layout:6s}: "
                          f"{ms * 1e3:8.1f} us {rate / 1e12:5.2f} TB/s ({rate / bw:.0%})", flush=True)
                    del vs
            del k, v
    date = datetime.date.today().isoformat()
    gpu = torch.cuda.get_device_name().split()[-1].lower()
    path = os.path.join(args.out, f"{date}-{gpu}-kv-bandwidth.json")
    with open(path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "triton": triton.__version__, "copy_bw": bw, "rows": rows}, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
