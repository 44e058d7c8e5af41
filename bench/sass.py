"""python -m bench.sass: the machine code of the KV decode kernels (codegen/kv_attention.py's, and
the Gluon int4 one of codegen/kv_int4_attention.py), compiled for a GPU that this machine need
not have, and what their main loop costs per tile. No device time: Triton compiles
for an sm_90 target with the ptxas its wheel carries.

For each width, dtype and launch shape (decode: 32 query heads on 8 KV heads, head_dim 128,
in the tiles the tuner times first for that width: kv_tiling.WINNERS), it counts the
instructions of one iteration of the loop over the cache (the longest backward branch of the
SASS) and sets three bounds on that tile, in cycles of one of the SM's four schedulers, as if
one program had the SM:
- issue: every instruction of every warp takes one issue slot;
- conversion: int-to-float and float-to-float conversions (I2F, F2F, F2FP) run at 16 a clock
  per SM (CUDA's throughput table for compute capability 9.0), 8 cycles a warp;
- memory: the tile's codes, scales and zeros at the copy bandwidth per SM.
When issue or conversion exceeds memory, the kernel cannot reach the bandwidth roofline
whatever its occupancy: the figure ``roofline_bound`` is memory / the largest of the three.
Below that, what is left is latency, hidden by the programs an SM holds at once: its 64K
registers and 228 KB of shared memory (1 KB of it reserved per program) divided by a program's.

The arguments mirror runtime/kv_ops.py's launch of a decode step with Triton's specialization
(integers equal to 1 are constants, pointers and multiples of 16 are marked divisible by 16).
"""
import argparse
import collections
import json
import os
import re
import subprocess
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.experimental.gluon._runtime import GluonASTSource, GluonJITFunction

from bench.attention import (D, HKV, HQ, KV, V_LAYOUT_HELP, V_LAYOUTS,  # the benchmark's shapes
                             kernel_module, v_tokens_first)
from qcompile.codegen import kv_int4_attention, kv_tiling

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
FIRST = 2  # tiles per width: the tuner's first guesses (kv_tiling.WINNERS)
TRITON_WIDTHS = ("int8", "int4")  # the Triton kernel's widths reported (its 4-bit code is one for every group)
CONVERSIONS = ("I2F", "F2F", "F2FP", "I2FP", "F2I")
MIX = ("I2F", "F2FP", "PRMT", "LOP3", "HADD2", "HMUL2", "HFMA2", "IMAD", "LDS", "STS", "LDSM", "LDGSTS", "BAR",
       "HMMA")  # opcodes reported
SM_REGISTERS, SM_SHARED, SM_WARPS = 65536, 233472, 64
GPUS = {"h100": (3.0e12, 132, 1.755e9), "h200": (4.3e12, 132, 1.755e9)}  # copy B/s measured here, SMs, clock


def available() -> str | None:
    """None when this Triton can compile for an NVIDIA target here, else why not."""
    missing = [t for t in ("ptxas", "nvdisasm") if not os.path.exists(os.path.join(BIN, t))]
    return f"no {', '.join(missing)} in {BIN}" if missing else None


def _decode_args(bits: int, group: int, dtype: str, v_token_major: bool, context: int = 16384,
                 v_block: int = 0) -> dict:
    """kv_attention_kernel's arguments in a decode step of batch 1, contiguous tensors (V's codes
    token-contiguous with ``v_token_major``, in blocks of ``v_block`` tokens with it): a type for
    pointers and floats, the value for integers."""
    groups, code_d, ptr = D // group, D * bits // 8, f"*{dtype}"
    head = context * code_d
    v_token = (1, v_block or context, v_block * code_d) if v_token_major else (code_d, 1, 0)
    return {"q_ptr": ptr, "kc_ptr": "*u8", "ks_ptr": ptr, "kz_ptr": ptr, "vc_ptr": "*u8", "vs_ptr": ptr,
            "vz_ptr": ptr, "mask_ptr": ptr, "live_ptr": "*i32", "o_ptr": ptr, "acc_ptr": "*fp32",
            "stat_ptr": "*fp32", "length": context, "sm_scale": "fp32", "splits": 32, "nlive": 0,
            **dict(zip(("sqb", "sqh", "sqs", "sqd"), (HQ * D, D, D, 1))),
            **dict(zip(("skb", "skh", "skt", "skd"), (HKV * head, head, code_d, 1))),
            **dict(zip(("svb", "svh", "svt", "svd", "svk"), (HKV * head, head, *v_token))),
            **dict(zip(("ssb", "ssh", "sst", "ssg"), (HKV * context * groups, context * groups, groups, 1))),
            **dict(zip(("smb", "smh", "sms", "smt"), (0, 0, 0, 0))),  # no mask
            **dict(zip(("sob", "soh", "sos", "sod"), (HQ * D, D, D, 1)))}


def compile_decode(kernel, bits: int, group: int, dtype: str, warps: int, stages: int, v_token_major: bool = False,
                   arch: int = 90, block_t: int = 128, maxnreg: int | None = None, v_block: int = 0):
    """The kernel compiled as a decode step launches it, for sm_``arch`` (a version of before V's
    blocks, without svk and VB, as well, for strided V)."""
    if v_block and v_token_major and "VB" not in kernel.arg_names:
        raise ValueError("v_block: this kernel reads V through strides alone")
    tdtype = {"fp16": tl.float16, "bf16": tl.bfloat16}[dtype]
    consts = dict(REP=HQ // HKV, S=1, ROWS=16, D=D, BITS=bits, GROUP=group, DEQ=tdtype, DOT=tdtype,
                  PRECISION="tf32", BLOCK_T=block_t, HAS_MASK=False, LIVE=0, SKIP_HIDDEN=False,
                  VB=v_block if v_token_major else 0, PDL=True, STAGES=stages, FP16_RANGE=dtype == "bf16",
                  ROW_BLOCKS=1, G=D // group)
    consts = {k: v for k, v in consts.items() if k in kernel.arg_names}
    signature, attrs = {}, {}
    for name, value in _decode_args(bits, group, dtype, v_token_major, v_block=v_block).items():
        if name not in kernel.arg_names:
            continue
        if isinstance(value, int) and value == 1:
            consts[name] = 1
        elif isinstance(value, int):
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(kernel.arg_names.index(name),)] = [["tt.divisibility", 16]]
        else:
            signature[name] = value
            if value.startswith("*"):
                attrs[(kernel.arg_names.index(name),)] = [["tt.divisibility", 16]]
    signature.update({name: "constexpr" for name in consts})
    source = GluonASTSource if isinstance(kernel, GluonJITFunction) else ASTSource
    src = source(fn=kernel, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages,
                                                                                          maxnreg=maxnreg))


def _sass(compiled) -> tuple[str, int]:
    """The disassembly and the registers per thread."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    return text, int(re.search(r"REG:(\d+)", usage).group(1))


def loop_mix(text: str) -> collections.Counter:
    """Opcodes of the longest loop: the lines from a label to the branch back to it."""
    lines = text.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"(\.L_x_\d+):", line))}
    loops = [(labels[m.group(1)], i) for i, line in enumerate(lines)
             if (m := re.search(r"BRA `\((\.L_x_\d+)\)", line)) and labels.get(m.group(1), i) < i]
    start, end = max(loops, key=lambda se: se[1] - se[0])
    ops = collections.Counter()
    for line in lines[start:end + 1]:
        if m := re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line):
            ops[m.group(1)] += 1
    return ops


def tile_bounds(ops: collections.Counter, warps: int, bits: int, group: int, dtype_bytes: int, gpu: str,
                block_t: int) -> dict:
    """Cycles of one scheduler per tile (module docstring) and the roofline fraction they allow."""
    bandwidth, sms, clock = GPUS[gpu]
    tile_bytes = 2 * block_t * (D * bits // 8 + 2 * (D // group) * dtype_bytes)  # K and V: codes, scales, zeros
    issue = sum(ops.values()) * warps / 4
    conversion = sum(ops[c] for c in CONVERSIONS) * warps * 8 / 4
    memory = tile_bytes / (bandwidth / sms / clock)
    return {"issue": issue, "conversion": conversion, "memory": memory,
            "roofline_bound": min(1.0, memory / max(issue, conversion, memory))}


def programs_per_sm(registers: int, shared: int, warps: int) -> int:
    """Programs one SM holds at once (registers allocated in multiples of 8 a thread)."""
    by_registers = SM_REGISTERS // (-(-registers // 8) * 8 * 32 * warps)
    return min(by_registers, SM_SHARED // (shared + 1024), SM_WARPS // warps)


def report(kernel, gpu: str, v_layout: str = "cache") -> list:
    """A row per width, dtype and first tile of the Triton kernel, then the Gluon int4 kernel's
    (fp16, kv_tiling.INT4_TILES' first) and its rows kernel's in groups of 32 and 128, whose
    rows say "gluon" and "gluon-rows" and have no shared-memory model."""
    rows = []
    for name, (bits, group) in KV.items():
        if name not in TRITON_WIDTHS:
            continue
        for dtype in ("fp16", "bf16"):
            for block_t, _, warps, stages, regs in kv_tiling.WINNERS[bits][:FIRST]:
                blocks = 64 if v_layout in ("blocks", "cache") else 0  # the cache's 8-bit V: formats.kv.v_block
                compiled = compile_decode(kernel, bits, group, dtype, warps, stages, v_tokens_first(v_layout, bits),
                                          block_t=block_t, maxnreg=regs, v_block=blocks)
                config = triton.Config({"BLOCK_T": block_t}, num_warps=warps, num_stages=stages)
                rows.append(_row(compiled, gpu, name, dtype, block_t, warps, stages, regs, bits, group,
                                 kv_tiling.smem_bytes(config, 16, D, D // group, bits, 2, 2, False)))
    first = kv_tiling.INT4_TILES[0]
    compiled = compile_decode(kv_int4_attention.kv_int4_decode_kernel, 4, 32, "fp16", 1, first.num_stages,
                              block_t=first.kwargs["BLOCK_T"])
    rows.append(_row(compiled, gpu, "int4", "fp16", first.kwargs["BLOCK_T"], 1, first.num_stages, None, 4, 32, None,
                     kernel="gluon"))
    for name in ("int4", "int4-g128", "int8"):
        bits, group = KV[name]
        compiled = compile_decode(kv_int4_attention.kv_int4_rows_kernel, bits, group, "fp16", 1, first.num_stages,
                                  block_t=first.kwargs["BLOCK_T"])
        rows.append(_row(compiled, gpu, name, "fp16", first.kwargs["BLOCK_T"], 1, first.num_stages, None, bits, group,
                         None, kernel="gluon-rows"))
    return rows


def _row(compiled, gpu, name, dtype, block_t, warps, stages, regs, bits, group, shared_model, kernel="triton"):
    text, registers = _sass(compiled)
    programs = programs_per_sm(registers, compiled.metadata.shared, warps)
    ops = loop_mix(text)
    elements = 2 * block_t * D / (32 * warps)  # K and V codes one thread dequantizes per tile
    row = {"kernel": kernel, "kv": name, "dtype": dtype, "block_t": block_t, "warps": warps, "stages": stages,
           "register_cap": regs, "registers": registers, "shared": compiled.metadata.shared,
           "programs_per_sm": programs, "shared_model": shared_model,
           "loop_instructions": sum(ops.values()), "per_code": sum(ops.values()) / elements,
           "mix": {op: ops[op] for op in MIX}, **tile_bounds(ops, warps, bits, group, 2, gpu, block_t)}
    cap = f", capped at {regs}" if regs else ""
    print(f"{kernel} {name} {dtype} {block_t} tokens {warps} warps {stages} stages: {registers} registers{cap}, "
          f"{programs} programs an SM, {row['loop_instructions']} instructions a tile "
          f"({row['per_code']:.1f} a code); cycles issue {row['issue']:.0f}, conversion "
          f"{row['conversion']:.0f}, memory {row['memory']:.0f} ({gpu}): at most "
          f"{row['roofline_bound']:.0%} of the roofline; {row['mix']}", flush=True)
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--kernel", help="a file defining kv_attention_kernel to compile instead of the package's "
                                    "(git show REV:codegen/kv_attention.py > FILE: an older version)")
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    p.add_argument("--v-layout", choices=V_LAYOUTS, default="cache", help=V_LAYOUT_HELP)
    p.add_argument("--out", help="write the rows to this JSON file")
    a = p.parse_args()
    if reason := available():
        raise SystemExit(f"bench.sass: {reason}")
    rows = report(kernel_module(a.kernel).kv_attention_kernel, a.gpu, a.v_layout)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"kernel": a.kernel or "qcompile.codegen.kv_attention", "gpu": a.gpu,
                       "v_layout": a.v_layout, "triton": triton.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
