"""python -m bench.int4_operand_probe: can 4-bit K codes go from global memory into the tensor
cores' B operand, unpacked in registers, with no trip through shared memory? Compiled offline
for sm_90 (no device time), in Gluon (triton.experimental.gluon), whose layouts are stated.

Why: the int4 decode kernel spends most of a tile placing codes in operand order. Triton
infers the layouts; its unpack (join and reshape of the nibbles) sends the fp16 tile through
shared memory, and register moves and PRMTs follow (README, fifth H200 run: E26, E28).

The probe computes one tile of q @ K^T for head_dim 128, 64 tokens, one warp, with mma_v2:
- K's bytes stay as the cache stores them ([T, 64] a head, byte j holding channels 2j and
  2j + 1). They are read as [4, 16, 64]: lane % 4 = i takes bytes 16 i .. 16 i + 15 of a token,
  one 16-byte load each.
- The nibbles become 1024 + code in fp16 (the kernel's _biased_nibbles), 2 PRMT and 6 LOP3/SHF
  for 8 codes.
- Their positions in the dot's K dimension are chosen so that each 32-bit register is already
  an operand register: k = m0 + 2 i + 8 m1 + 16 m2 + 32 m3 + 64 h, for byte 16 i + m (bits
  m3..m0) and nibble h. ``convert_layout(..., assert_trivial=True)`` fails the compile
  otherwise.
- q is loaded in that channel order (k_order: the same reshapes on channel numbers).

It computes p @ V the same way (pv_tile). Here the operand pairs two tokens of one channel,
so a lane reads its 8 contiguous bytes of each of its 16 tokens (LDG.E.64). One PRMT for 8
bytes puts tokens 2j and 2j + 1 side by side in a register before the unpack, and the output
columns come in v_order (n = g + 8 h + 16 r for nibble h of byte 8 g + r).

It reports the SASS opcode mix of each tile. Expected: for K, 8 LDG.E.128 and 64 PRMT (the
unpack's own); for V, 96 PRMT; no LDSM in either. The only STS/LDS belong to q's or p's
conversion to the A operand: a kernel does q once, and p comes from registers. The full int4
tile of the Triton kernel takes about 2800 instructions for the same 64 tokens, K and V.
"""
import argparse
import collections
import json
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from bench.sass import BIN
from qcompile.codegen.kv_attention import NIBBLES_FP16

D, T = gl.constexpr(128), gl.constexpr(64)  # head_dim, tokens a tile
MMA = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
A = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
B = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
# K's bytes [4 (i), 16 (m), T]: byte 16 i + m of a token; a lane's 16 bytes in its registers
BYTES = gl.DistributedLinearLayout(
    reg_bases=[[0, 1, 0], [0, 2, 0], [0, 4, 0], [0, 8, 0], [0, 0, 8], [0, 0, 16], [0, 0, 32]],
    lane_bases=[[1, 0, 0], [2, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 4]], warp_bases=[], block_bases=[],
    shape=[4, 16, T])
Q = gl.BlockedLayout(size_per_thread=[1, 4], threads_per_warp=[4, 8], warps_per_cta=[1, 1], order=[1, 0])
# V's bytes [8 (g), 8 (r), T]: byte 8 g + r of a token, a lane's 8 bytes of a token in its registers,
# then the same with tokens 2j and 2j + 1 in one register (p @ V's B operand pairs tokens)
_V_LANES = [[0, 0, 2], [0, 0, 4], [1, 0, 0], [2, 0, 0], [4, 0, 0]]
V_LOAD = gl.DistributedLinearLayout(
    reg_bases=[[0, 1, 0], [0, 2, 0], [0, 4, 0], [0, 0, 1], [0, 0, 8], [0, 0, 16], [0, 0, 32]], lane_bases=_V_LANES,
    warp_bases=[], block_bases=[], shape=[8, 8, T])
V_PAIRS = gl.DistributedLinearLayout(
    reg_bases=[[0, 0, 1], [0, 1, 0], [0, 2, 0], [0, 4, 0], [0, 0, 8], [0, 0, 16], [0, 0, 32]], lane_bases=_V_LANES,
    warp_bases=[], block_bases=[], shape=[8, 8, T])


@gluon.jit
def _operand_order(x):
    """[4 (i), 16 (m), T, 2 (h)] -> [D, T] in the B operand's register order (module docstring)."""
    x = gl.reshape(x, (4, 2, 2, 2, 2, x.shape[2], 2))  # [i, m3, m2, m1, m0, T, h]
    x = gl.permute(x, (6, 1, 2, 3, 0, 4, 5))  # [h, m3, m2, m1, i, m0, T]
    return gl.reshape(x, (x.shape[0] * 64, x.shape[6]))


@gluon.jit
def _token_bytes(c_ptr, RUNS: gl.constexpr, RUN: gl.constexpr, LAYOUT: gl.constexpr):
    """[RUNS, RUN, T] bytes in LAYOUT: byte RUN r + j of each token's D / 2 at [r, j]."""
    rr = gl.arange(0, RUNS, layout=gl.SliceLayout(1, gl.SliceLayout(2, LAYOUT)))
    rj = gl.arange(0, RUN, layout=gl.SliceLayout(0, gl.SliceLayout(2, LAYOUT)))
    rt = gl.arange(0, T, layout=gl.SliceLayout(0, gl.SliceLayout(1, LAYOUT)))
    return gl.load(c_ptr + rt[None, None, :] * (D // 2) + (rr[:, None, None] * RUN + rj[None, :, None]))


@gluon.jit
def _nibbles(byte, NIB: gl.constexpr):
    """1024 + each nibble of the bytes in fp16 (low, high), by the KV kernel's asm: a
    register's four bytes give two registers of each."""
    return gl.inline_asm_elementwise(NIB, "=r,=r,=r,=r,r", [byte], dtype=(gl.float16, gl.float16), is_pure=True,
                                     pack=4)


@gluon.jit
def _dot_store(a_ptr, b, o_ptr, K: gl.constexpr, N: gl.constexpr):
    """o [16, N] = a [16, K] (read from memory into the A operand) @ b (the B operand)."""
    ra = gl.arange(0, 16, layout=gl.SliceLayout(1, Q))
    rk = gl.arange(0, K, layout=gl.SliceLayout(0, Q))
    a = gl.convert_layout(gl.load(a_ptr + ra[:, None] * K + rk[None, :]), A)
    acc = mma_v2(a, b, gl.full((16, N), 0.0, gl.float32, MMA))
    ro = gl.arange(0, 16, layout=gl.SliceLayout(1, MMA))
    rn = gl.arange(0, N, layout=gl.SliceLayout(0, MMA))
    gl.store(o_ptr + ro[:, None] * N + rn[None, :], acc)


@gluon.jit
def qk_tile(q_ptr, k_ptr, o_ptr, NIB: gl.constexpr):
    """o [16, T] = q [16, D] (channels in k_order) @ (1024 + K's codes [T, D])^T."""
    low, high = _nibbles(_token_bytes(k_ptr, 4, 16, gl.constexpr(BYTES)), NIB)
    _dot_store(q_ptr, gl.convert_layout(_operand_order(gl.join(low, high)), B, assert_trivial=True), o_ptr, D, T)


@gluon.jit
def pv_tile(p_ptr, v_ptr, o_ptr, NIB: gl.constexpr):
    """o [16, D] (channels in v_order) = p [16, T] @ (1024 + V's codes [T, D])."""
    byte = gl.convert_layout(_token_bytes(v_ptr, 8, 8, gl.constexpr(V_LOAD)), V_PAIRS)  # in a lane: tokens 2j, 2j + 1 side by side
    low, high = _nibbles(byte, NIB)
    x = gl.permute(gl.join(low, high), (2, 1, 3, 0))  # [T, r, h, g]
    _dot_store(p_ptr, gl.convert_layout(gl.reshape(x, (x.shape[0], D)), B, assert_trivial=True), o_ptr, T, D)


def v_order() -> torch.Tensor:
    """The head channel at each of pv_tile's output columns: n = g + 8 h + 16 r for nibble h
    of byte 8 g + r."""
    g, r, h = torch.meshgrid(torch.arange(8), torch.arange(8), torch.arange(2), indexing="ij")
    channel = 2 * (8 * g + r) + h  # [8, 8, 2]
    return channel.permute(1, 2, 0).reshape(D.value)


def k_order() -> torch.Tensor:
    """The head channel at each position of the dot's K dimension: _operand_order applied to
    channel numbers (byte 16 i + m holds channels 2 (16 i + m) + h)."""
    i, m, h = torch.meshgrid(torch.arange(4), torch.arange(16), torch.arange(2), indexing="ij")
    channel = 2 * (16 * i + m) + h  # [4, 16, 2]
    return channel.reshape(4, 2, 2, 2, 2, 2).permute(5, 1, 2, 3, 0, 4).reshape(D.value)


def opcode_mix(tile) -> collections.Counter:
    """The SASS opcodes of ``tile`` (qk_tile or pv_tile) compiled for sm_90 (the compile fails
    if the codes' conversion to the B operand would move data between lanes)."""
    a, c, _ = tile.arg_names[:3]
    src = GluonASTSource(fn=tile, signature={a: "*fp16", c: "*u8", "o_ptr": "*fp32", "NIB": "constexpr"},
                         constexprs={"NIB": NIBBLES_FP16}, attrs={(i,): [["tt.divisibility", 16]] for i in range(3)})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=1))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
    return collections.Counter(m.group(1) for line in text.splitlines()
                               if (m := re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", help="write the opcode mix and k_order to this JSON file")
    a = p.parse_args()
    res = {"triton": triton.__version__, "k_order": k_order().tolist(), "v_order": v_order().tolist()}
    for tile in (qk_tile, pv_tile):
        res[tile.__name__] = ops = opcode_mix(tile)
        print(f"{tile.__name__}: {sum(ops.values())} instructions:", dict(ops.most_common()))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
