"""python -m bench.attention: decode attention over a quantized KV cache on the GPU, against
fp16 SDPA (flash) and plain torch.compile of the eager dequantize + SDPA, in one run.

One new token per sequence, 32 query heads (--q-heads) on 8 KV heads, head_dim 128; contexts 1k-128k,
batch 1/8/32 (pairs whose fp16 cache exceeds --max-gb are skipped). Caches smaller than twice
the L2 are rotated across copies, as bench/linear.py does with weights. Reports us, speed-up
over fp16 SDPA, % of the HBM roofline (cache bytes read / copy bandwidth), cache memory, and
the max abs error of the output against fp16 SDPA on the unquantized K and V. ``--dtype bf16``
runs it all in bf16 instead, flash SDPA in bf16 the baseline (the JSON's fields keep their
"fp16_" names).

Also, with ``--prefill``: causal prefill of a whole prompt (batch 1) against fp16 flash SDPA;
``--tail``: a decode step over a static cache of ``--tail`` tokens of which only the context
is written, the rest hidden by the mask as transformers passes it (the kernel splits only
what the mask shows), against the same context without a tail; ``--append``: quantizing and writing one new
token per sequence (``qcompile::kv_append``) against Inductor's compiled quantize + index_copy;
``--sweep``: every candidate tile of the decode kernel (codegen/kv_tiling.py) timed, and with
``--kernels`` other versions of that kernel on the same caches (an A/B in one run); ``--ncu``:
only a few plain launches, for Nsight Compute. The qcompile rows record the tuned tile. With
``--v-layout`` V's codes as QuantizedStaticCache stores them (8-bit in blocks of 64 tokens,
token-contiguous within a block: formats.kv.v_block), or all row- or token-contiguous, or in
blocks of 64 tokens (formats.kv.as_token_blocks).
"""
import argparse
import contextlib
import datetime
import importlib.util
import json
import os

import torch
import torch.nn.functional as F

import triton
from triton.runtime.errors import OutOfResources

from qcompile.codegen import kv_attention, kv_int4_attention, kv_tiling
from qcompile.codegen.tiling import Choice
from qcompile.runtime import kv_ops  # registers qcompile::kv_attention
from bench.linear import L2_BYTES, copy_bandwidth, time_rotated
from qcompile.formats.kv import (append_kv, as_token_blocks, as_token_major, kv_attention_reference, quantize_kv,
                                 v_block, v_token_major)

HQ, HKV, D = 32, 8, 128
CONTEXTS = [1024, 4096, 16384, 32768, 131072]
BATCHES = [1, 8, 32]
KV = {"int8": (8, 128), "int4": (4, 32), "int4-g128": (4, 128)}  # bits, group (int4-g128: whole heads, as int8)


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def copies_of(tensors):
    n = max(1, min(8, int(2 * L2_BYTES // nbytes(tensors)) + 1))
    return [tensors] + [tuple(t.clone() for t in tensors) for _ in range(n - 1)]


class _launchable:
    """A kernel launched as the package launches its own: one of before V's blocks (no svk, VB
    arguments) without them, for strided V; one of before dependent launches without PDL (its
    merge then waits, launched dependent, for the whole of it to end); one that does not wait
    for the kernel before it (no gdc_wait) not launched dependent itself."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.drop = None if "svk" in kernel.arg_names else kv_attention.kv_attention_kernel.arg_names.index("svk")
        self.dependent = "gdc_wait" in kernel.src  # it waits for the kernel before: launched dependent

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            if "PDL" not in self.kernel.arg_names:
                kwargs.pop("PDL")
            if not self.dependent:
                kwargs.pop("launch_pdl", None)
            if self.drop is not None:
                assert not kwargs.pop("VB"), "a kernel of before V's blocks reads V through its strides alone"
                args = (*args[:self.drop], *args[self.drop + 1:])
            return launch(*args, **kwargs)
        return run


def kernel_module(path: str | None):
    """The module defining the KV kernels: the package's, or a file of another version of it
    (``git show REV:codegen/kv_attention.py > FILE``) to compare against."""
    if path is None:
        return kv_attention
    spec = importlib.util.spec_from_file_location("kv_attention_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE = torch.float16  # --dtype: of the queries, the unquantized K/V and the scales (the "fp16_*" fields' baseline)
V_LAYOUTS = ("cache", "rows", "tokens", "blocks")
V_LAYOUT = "cache"  # --v-layout: V's codes as QuantizedStaticCache stores them, or "rows" / "tokens" / "blocks" for all
V_LAYOUT_HELP = ("V's codes as the cache stores them (formats.kv.v_token_major), row- or token-contiguous, or in "
                 "blocks of 64 tokens (formats.kv.as_token_blocks)")


def v_tokens_first(layout: str, bits: int) -> bool:
    """Whether V's codes are token-contiguous in ``layout`` (one of V_LAYOUTS; in blocks too)."""
    return layout in ("tokens", "blocks") or layout == "cache" and v_token_major(bits)


def quantized_kv(k, v, bits, group):
    """K and V quantized, V's codes in the layout the run measures."""
    (vc, vs, vz) = quantize_kv(v, bits, group)
    if V_LAYOUT == "blocks" or V_LAYOUT == "cache" and v_token_major(bits):
        vc = as_token_blocks(vc, v_block(vc.shape[2]))
    elif V_LAYOUT == "tokens":
        vc = as_token_major(vc)
    return quantize_kv(k, bits, group), (vc, vs, vz)


def random_cache(b, t, bits, group):
    """K and V of ``t`` random tokens per sequence, quantized: two (codes, scale, zero)."""
    return quantized_kv(*(torch.randn(b, HKV, t, D, dtype=DTYPE, device="cuda") for _ in range(2)), bits, group)


def prefill(lengths):
    """Causal prefill of one prompt: us and speed-up over fp16 flash SDPA."""
    rows = []
    for n in lengths:
        torch.manual_seed(0)
        k, v = (torch.randn(1, HKV, n, D, dtype=DTYPE, device="cuda") for _ in range(2))
        q = torch.randn(1, HQ, n, D, dtype=DTYPE, device="cuda")
        t_fp16 = time_rotated(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), [()])
        exact = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        row = {"length": n, "fp16_us": t_fp16, "impl": {}}
        for name, (bits, group) in KV.items():
            kq, vq = quantized_kv(k, v, bits, group)
            cache = (*kq, *vq)
            out = torch.ops.qcompile.kv_attention(q, *cache, n, bits)
            t = time_rotated(lambda: torch.ops.qcompile.kv_attention(q, *cache, n, bits), [()])
            key = kv_ops.tuning_key(bits, group, D, kv_ops._row_block(HQ // HKV * n), False, HKV, n, q.dtype, False)
            row["impl"][f"qcompile {name}"] = {"config": str(kv_ops.chosen[key]), "us": t, "speedup": t_fp16 / t,
                                              "max_abs_err_vs_fp16": (out - exact).abs().max().item()}
        rows.append(row)
        print(f"prefill {n:6d} fp16 {t_fp16:8.1f}us " + "  ".join(
            f"{i} {r['us']:.1f}us {r['speedup']:.2f}x (err {r['max_abs_err_vs_fp16']:.1e}, {r['config']})"
            for i, r in row["impl"].items()), flush=True)
    return rows


def tail(cache_len, contexts, batches):
    """One decode step over a static cache of ``cache_len`` with ``context`` tokens written, the
    tail hidden by a bool mask [B, 1, 1, T]: us against the same context without a tail."""
    rows = []
    for ctx in map(int, contexts.split(",")):
        for b in map(int, batches.split(",")):
            if ctx >= cache_len:
                continue
            torch.manual_seed(0)
            q = torch.randn(b, HQ, 1, D, dtype=DTYPE, device="cuda")
            row = {"context": ctx, "cache": cache_len, "batch": b, "impl": {}}
            for name, (bits, group) in KV.items():
                k, v = random_cache(b, cache_len, bits, group)
                cache = (*k, *v)
                mask = (torch.arange(cache_len, device="cuda") < ctx).expand(b, 1, 1, cache_len)
                masked = time_rotated(lambda: torch.ops.qcompile.kv_attention(q, *cache, cache_len, bits, mask), [()])
                exact = time_rotated(lambda: torch.ops.qcompile.kv_attention(q, *cache, ctx, bits), [()])
                row["impl"][f"qcompile {name}"] = {"masked_us": masked, "context_only_us": exact}
            rows.append(row)
            print(f"tail ctx {ctx} of {cache_len} batch {b}: " + "  ".join(
                f"{i} {r['masked_us']:.1f}us masked, {r['context_only_us']:.1f}us without the tail"
                for i, r in row["impl"].items()), flush=True)
    return rows


def append(batches):
    """One new token per sequence into a 4k cache: the fused append against Inductor compiling
    its reference, quantize_kv + index_copy_ (what the cache did before)."""
    compiled = torch.compile(append_kv)
    rows = []
    for b in map(int, batches.split(",")):
        x = torch.randn(b, HKV, 1, D, dtype=DTYPE, device="cuda")
        pos = torch.tensor([100], device="cuda")
        row = {"batch": b, "impl": {}}
        for name, (bits, group) in KV.items():
            bufs = quantize_kv(torch.randn(b, HKV, 4096, D, dtype=DTYPE, device="cuda"), bits, group)
            fused = time_rotated(lambda: torch.ops.qcompile.kv_append(x, pos, *bufs, bits), [()])
            ind = time_rotated(lambda: compiled(x, pos, *bufs, bits), [()])
            row["impl"][f"qcompile {name}"] = {"fused_us": fused, "inductor_us": ind}
        rows.append(row)
        print(f"append batch {b}: " + "  ".join(f"{i} fused {r['fused_us']:.1f}us, inductor {r['inductor_us']:.1f}us"
                                               for i, r in row["impl"].items()), flush=True)
    return rows


def tiles(spec: str) -> list:
    """Choices from ``--tiles``: "BLOCK_T,WAVES,warps,stages[,REGS]" entries separated by ";",
    prefixed "int4:" for the Gluon int4 kernel's, "rows:" for its rows kernel's."""
    out = []
    prefixes = {"int4:": kv_tiling.INT4_KERNEL, "rows:": kv_tiling.INT4_ROWS_KERNEL}
    for entry in spec.split(";"):
        kernel = prefixes.get(entry[:5], "kv_attention")
        entry = entry[5:] if entry[:5] in prefixes else entry
        bt, waves, warps, stages, *regs = map(int, entry.split(","))
        config = triton.Config({"BLOCK_T": bt, "WAVES": waves} | ({"REGS": regs[0]} if regs else {}),
                               num_warps=warps, num_stages=stages)
        out.append(Choice(kernel, config))
    return out


def refused_kernels(q, k, v, bits) -> set:
    """The Gluon kernels that cannot take this decode step (kv_int4_attention's reasons): their
    ``--tiles`` entries are skipped for it."""
    reasons = {kv_tiling.INT4_KERNEL: kv_int4_attention.unsupported_reason,
               kv_tiling.INT4_ROWS_KERNEL: kv_int4_attention.rows_unsupported_reason}
    return {kernel for kernel, why in reasons.items() if why(q, k, v, bits)}


@contextlib.contextmanager
def version_of_kernels(module):
    """kv_ops launching ``module``'s kernel (a file of another version of codegen/kv_attention.py
    or of codegen/kv_int4_attention.py), or the package's with None."""
    saved = kv_ops.kv_attention_kernel, kv_ops.kv_int4_attention
    if module is not None and hasattr(module, "kv_int4_decode_kernel"):
        if "griddepcontrol.wait" not in open(module.__file__).read():  # its first reads would race the kernel before
            raise ValueError(f"{module.__file__}: Gluon kernels of before dependent launches (no griddepcontrol.wait), "
                             "which the op now launches dependent")
        kv_ops.kv_int4_attention = module
    elif module is not None:
        kv_ops.kv_attention_kernel = _launchable(module.kv_attention_kernel)
    try:
        yield
    finally:
        kv_ops.kv_attention_kernel, kv_ops.kv_int4_attention = saved


def sweep(contexts, batches, kernels=(), only=None):
    """Every tile the tuner may choose (codegen/kv_tiling.py), timed on decode steps (caches
    rotated as in the main sweep): the landscape behind the tuned choice, and how far the
    untuned first guess is from it. With ``kernels`` (files of other versions of
    codegen/kv_attention.py or codegen/kv_int4_attention.py), each of them too on the same
    caches, after the package's: an A/B in one run, its best tiles compared at the end.
    ``only``: these Choices instead of the tuner's candidates (tiles it does not try)."""
    rows = []
    versions = {"package": None} | {f: kernel_module(f) for f in kernels}
    for ctx in map(int, contexts.split(",")):
        for b in map(int, batches.split(",")):
            torch.manual_seed(0)
            q = torch.randn(b, HQ, 1, D, dtype=DTYPE, device="cuda")
            for name, (bits, group) in KV.items():
                k, v = random_cache(b, ctx, bits, group)
                refused = refused_kernels(q, k, v, bits)
                cands = ([c for c in only if c.kernel not in refused] if only else
                         kv_tiling.candidates(True, 16, D, D // group, bits, 2, 2, False, q.device,
                                              kv_tiling.INT4_KERNEL not in refused,
                                              kv_tiling.INT4_ROWS_KERNEL not in refused))
                copies = copies_of((*k, *v))
                ref = kv_attention_reference(q, k, v, bits, ctx)
                for version, module in versions.items():
                    with version_of_kernels(module):
                        err = (kv_ops._attention(q, k, v, ctx, bits, None, None, cands[0]) - ref).abs().max().item()
                        times = {}
                        for c in cands:
                            try:
                                times[str(c)] = time_rotated(
                                    lambda *kv: kv_ops._attention(q, kv[:3], kv[3:], ctx, bits, None, None, c), copies)
                            except OutOfResources:
                                times[str(c)] = None
                    done = {c: t for c, t in times.items() if t is not None}
                    best = min(done, key=done.get)
                    rows.append({"context": ctx, "batch": b, "kv": name, "kernel": version, "us": times, "best": best,
                                 "first": str(cands[0]), "max_abs_err_vs_reference": err})
                    fastest = sorted(done.items(), key=lambda x: x[1])[:6]
                    print(f"sweep ctx {ctx} batch {b} {name} {version} (err {err:.1e}): best {best} "
                          f"{done[best]:.1f}us, first guess "
                          f"{done.get(str(cands[0]), float('nan')):.1f}us; "
                          + ", ".join(f"{c.replace('kv_attention ', '')} {t:.1f}" for c, t in fastest), flush=True)
    for row in rows if kernels else []:
        base = next(r for r in rows
                    if r["kernel"] == "package" and all(r[x] == row[x] for x in ("context", "batch", "kv")))
        row["best_vs_package"] = base["us"][base["best"]] / row["us"][row["best"]]
        if row["kernel"] != "package":
            print(f"A/B ctx {row['context']} batch {row['batch']} {row['kv']}: {row['kernel']} "
                  f"{row['best_vs_package']:.2f}x the package's best tile")
    return rows


def ncu_target(contexts, batches, only=None):
    """A few plain decode launches per case, for Nsight Compute to profile (no timing loop):
    the op's own choice, or each of ``only`` (Choices, ``--tiles``) that the kernel takes."""
    for ctx in map(int, contexts.split(",")):
        for b in map(int, batches.split(",")):
            q = torch.randn(b, HQ, 1, D, dtype=DTYPE, device="cuda")
            for bits, group in KV.values():
                k, v = random_cache(b, ctx, bits, group)
                refused = refused_kernels(q, k, v, bits)
                for c in [c for c in only if c.kernel not in refused] if only else [None]:
                    for _ in range(3):
                        kv_ops._attention(q, k, v, ctx, bits, None, None, c)
    torch.cuda.synchronize()


def plot(path):
    """Speed-up over fp16 SDPA against context, one line per batch and cache width, beside the JSON."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = json.load(open(path))["rows"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for impl in sorted({i for r in rows for i in r["impl"] if i.startswith("qcompile")}, reverse=True):  # int8 first
        for b in sorted({r["batch"] for r in rows}):
            pts = [(r["context"], r["impl"][impl]["speedup"]) for r in rows if r["batch"] == b]
            ax.plot(*zip(*pts), marker="o", label=f"{impl}, batch {b}", ls="-" if "int8" in impl else "--")
    ax.axhline(1, color="k", lw=0.8)
    ax.set(xscale="log", xlabel="context (tokens)", ylabel="speed-up over fp16 SDPA",
           title="decode attention over a quantized KV cache (32 q heads, 8 KV heads, D 128)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path.replace(".json", ".png"), dpi=110)


def main():
    global V_LAYOUT, DTYPE, KV, HQ
    p = argparse.ArgumentParser()
    p.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--max-gb", type=float, default=9.0, help="skip fp16 caches larger than this")
    p.add_argument("--prefill", default="", help="prompt lengths for the prefill rows")
    p.add_argument("--tail", type=int, default=0, help="static cache length for the masked-tail rows")
    p.add_argument("--append", action="store_true")
    p.add_argument("--sweep", action="store_true", help="time every candidate tile of the decode kernel")
    p.add_argument("--kernels", default="", help="with --sweep: files of other versions of codegen/kv_attention.py "
                                                "to time against the package's (git show REV:codegen/kv_attention.py)")
    p.add_argument("--tiles", default="", help="with --sweep: time these tiles instead of the tuner's candidates, "
                                               '"BLOCK_T,WAVES,warps,stages[,REGS];..."')
    p.add_argument("--ncu", action="store_true", help="only launch the kernels, for ncu")
    p.add_argument("--v-layout", choices=V_LAYOUTS, default="cache", help=V_LAYOUT_HELP)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16",
                   help="activations, unquantized K/V and scales; the baseline is flash SDPA in this dtype")
    p.add_argument("--kv", default=",".join(KV), help=f"cache widths to run, of {', '.join(KV)}")
    p.add_argument("--q-heads", type=int, default=HQ, help=f"query heads on the {HKV} KV heads (64: GQA 8)")
    p.add_argument("--name", default="attention")
    p.add_argument("--plot", help="only draw the plot of this results JSON")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    a = p.parse_args()
    V_LAYOUT, DTYPE, HQ = a.v_layout, DTYPES[a.dtype], a.q_heads
    if HQ % HKV:
        p.error(f"--q-heads: {HQ} is not a multiple of the {HKV} KV heads")
    unknown = set(a.kv.split(",")) - set(KV)
    if unknown:
        p.error(f"--kv: {', '.join(sorted(unknown))} not among {', '.join(KV)}")
    KV = {name: KV[name] for name in a.kv.split(",")}
    if a.plot:
        return plot(a.plot)
    if a.ncu:
        return ncu_target(a.contexts, a.batches, tiles(a.tiles) if a.tiles else None)
    bw = copy_bandwidth()
    gpu = torch.cuda.get_device_name().split()[1].lower()
    path = os.path.join(a.out, f"{datetime.date.today()}-{gpu}-{a.name}.json")
    rows = []
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bw": bw, "rows": rows,
           "heads": [HQ, HKV, D], "v_layout": V_LAYOUT, "dtype": a.dtype}
    extras = {"prefill": a.prefill and (lambda: prefill(map(int, a.prefill.split(",")))),
              "tail": a.tail and (lambda: tail(a.tail, a.contexts, a.batches)),
              "append": a.append and (lambda: append(a.batches)),
              "sweep": a.sweep and (lambda: sweep(a.contexts, a.batches, a.kernels.split(",") if a.kernels else (),
                                                  tiles(a.tiles) if a.tiles else None))}
    for key, run in extras.items():
        if run:
            res[key] = run()
            with open(path, "w") as f:
                json.dump(res, f, indent=1)
    compiled_ref = torch.compile(kv_attention_reference)
    for ctx in [] if any(extras.values()) else map(int, a.contexts.split(",")):  # those instead of the sweep
        for b in map(int, a.batches.split(",")):
            if 2 * b * HKV * ctx * D * 2 > a.max_gb * 2**30:
                continue
            torch.manual_seed(0)
            k, v = (torch.randn(b, HKV, ctx, D, dtype=DTYPE, device="cuda") for _ in range(2))
            q = torch.randn(b, HQ, 1, D, dtype=DTYPE, device="cuda")
            exact = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            fp16 = copies_of((k, v))
            t_fp16 = time_rotated(lambda kk, vv: F.scaled_dot_product_attention(q, kk, vv, enable_gqa=True), fp16)
            row = {"context": ctx, "batch": b, "fp16_us": t_fp16, "fp16_cache_bytes": nbytes((k, v)),
                   "fp16_roofline": nbytes((k, v)) / (t_fp16 * 1e-6) / bw, "impl": {}}
            for name, (bits, group) in KV.items():
                kq, vq = quantized_kv(k, v, bits, group)
                cache = (*kq, *vq)
                cbytes = nbytes(cache)
                ref = kv_attention_reference(q, kq, vq, bits, ctx)
                for impl, fn in ((f"qcompile {name}", lambda *c: torch.ops.qcompile.kv_attention(q, *c, ctx, bits)),
                                 (f"inductor {name}", lambda *c: compiled_ref(q, c[:3], c[3:], bits, ctx))):
                    out = fn(*cache)
                    t = time_rotated(fn, copies_of(cache))
                    key = kv_ops.tuning_key(bits, group, D, 16, True, b * HKV, ctx, q.dtype, False)
                    row["impl"][impl] = {"config": str(kv_ops.chosen[key]) if "qcompile" in impl else None,
                                         "us": t, "speedup": t_fp16 / t, "roofline": cbytes / (t * 1e-6) / bw,
                                         "cache_bytes": cbytes, "max_abs_err_vs_fp16": (out - exact).abs().max().item(),
                                         "max_abs_err_vs_reference": (out - ref).abs().max().item()}
                del kq, vq, cache
            rows.append(row)
            with open(path, "w") as f:
                json.dump(res, f, indent=1)
            print(f"ctx {ctx:6d} batch {b:2d} {a.dtype} {t_fp16:8.1f}us ({row['fp16_roofline']:.0%}) " + "  ".join(
                f"{n} {r['speedup']:.2f}x ({r['roofline']:.0%}, err {r['max_abs_err_vs_fp16']:.1e})"
                for n, r in row["impl"].items()), flush=True)
            del k, v, fp16
            torch.cuda.empty_cache()
    if rows:
        plot(path)
    print("wrote", path)


if __name__ == "__main__":
    main()
