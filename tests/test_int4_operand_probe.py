"""bench/int4_operand_probe.py compiles Gluon tiles of q @ K^T and p @ V for sm_90 on a machine
without a GPU: 4-bit codes from global memory into the tensor cores' B operand, unpacked in
registers, no shared memory on the way. Run as a user runs it (no interpreter)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.sass import available


@pytest.mark.skipif(available() is not None, reason=f"bench.sass cannot compile here: {available()}")
def test_4_bit_k_and_v_reach_the_b_operand_without_shared_memory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "bench.int4_operand_probe", "--out", tmp_path / "probe.json"],
                       capture_output=True, text=True, timeout=600, env=env, cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr[-3000:]  # the compile asserts K's conversion to the operand is trivial
    probe = json.loads((tmp_path / "probe.json").read_text())
    k, v = probe["qk_tile"], probe["pv_tile"]
    assert k["LDG.E.128"] == 8, "a lane's 128 bytes of K in 16-byte loads"
    assert k["PRMT"] == 64, "the unpack's own 2 PRMT for 8 codes, no rearranging of halves"
    assert v["LDG.E.64"] == 16 + 8, "a lane's 8 bytes of V a token, 16 tokens (then p's 8 loads)"
    assert v["PRMT"] == 64 + 32, "the unpack's, and one for 8 bytes that pairs two tokens in a register"
    for ops in (k, v):
        assert ops["HMMA.16816.F32"] == 64 and not any(op.startswith("LDSM") for op in ops)
        assert ops.get("STS.128", 0) <= 8, "shared memory only for q's or p's conversion to the A operand"
    for order in ("k_order", "v_order"):
        assert sorted(probe[order]) == list(range(128)), "the channel order is a permutation"
