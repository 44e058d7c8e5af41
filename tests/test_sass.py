"""bench/sass.py compiles the KV decode kernels (Triton's, and the Gluon int4 one) for an sm_90
GPU on a machine without one: the static profile (loop instructions, registers, shared memory)
that a session without device time still has. Run as a user runs it, in a process without the interpreter (under
TRITON_INTERPRET=1 @triton.jit gives functions that only the interpreter runs)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.sass import FIRST, available
from qcompile.codegen import kv_tiling


@pytest.mark.skipif(available() is not None, reason=f"bench.sass cannot compile here: {available()}")
def test_the_decode_kernel_compiles_for_sm90_within_the_shared_memory_model(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "bench.sass", "--gpu", "h200", "--out", tmp_path / "sass.json"],
                       capture_output=True, text=True, timeout=600, env=env,
                       cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "sass.json").read_text())["rows"]
    triton_rows = [r for r in rows if r["kernel"] == "triton"]
    first = {bits: {(bt, nw) for bt, _, nw, _, _ in kv_tiling.WINNERS[bits][:FIRST]} for bits in (8, 4)}
    assert {(r["kv"], r["dtype"], r["block_t"], r["warps"]) for r in triton_rows} == {
        (kv, dt, bt, nw) for kv, bits in (("int8", 8), ("int4", 4)) for dt in ("fp16", "bf16")
        for bt, nw in first[bits]}
    for row in rows:
        assert row["mix"]["HMMA"] > 0, "both dots on the tensor cores, inside the loop found"
        assert 1 <= row["programs_per_sm"] <= 64 // row["warps"]
        assert row["memory"] > 0 and 0 < row["roofline_bound"] <= 1
    for row in triton_rows:
        assert 0 < row["shared"] <= row["shared_model"], "kv_tiling's model never under-counts (no launch failure)"
        assert row["shared_model"] <= 2 * row["shared"], "nor over-counts 2x (a tile that fits is not pruned)"
    triton_int4 = next(r for r in triton_rows if (r["kv"], r["dtype"], r["warps"]) == ("int4", "fp16", 1))
    gluon_rows = [r for r in rows if r["kernel"] != "triton"]  # compiled: their layout conversions move no data
    assert {(r["kernel"], r["kv"]) for r in gluon_rows} == {("gluon", "int4"), ("gluon-rows", "int4"),
                                                           ("gluon-rows", "int4-g128"), ("gluon-rows", "int8")}
    for gluon in gluon_rows:
        mix = gluon["mix"]
        assert mix["HMMA"] == 128, "q @ K^T and p @ V of 64 tokens, 64 mma.m16n8k16 each"
        assert mix["STS"] == 0 and mix["LDGSTS"] > 0, "codes copied by cp.async, staged through no other store"
        assert mix["BAR"] <= 1, "one barrier a tile"
        assert gluon["per_code"] <= 3.2 < triton_int4["per_code"], "about half the Triton kernel's instructions a code"
