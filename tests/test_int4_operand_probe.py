"""bench/int4_operand_probe.py compiles a Gluon tile of q @ K^T for sm_90 on a machine without
a GPU: 4-bit K codes from global memory into the tensor cores' B operand, unpacked in
registers, no shared memory on the way. Run as a user runs it (no interpreter)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.sass import available


@pytest.mark.skipif(available() is not None, reason=f"bench.sass cannot compile here: {available()}")
def test_4_bit_k_reaches_the_b_operand_without_shared_memory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "bench.int4_operand_probe", "--out", tmp_path / "probe.json"],
                       capture_output=True, text=True, timeout=600, env=env, cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr[-3000:]  # the compile asserts K's conversion to the operand is trivial
    probe = json.loads((tmp_path / "probe.json").read_text())
    ops = probe["ops"]
    assert ops["LDG.E.128"] == 8, "a lane's 128 bytes of K in 16-byte loads"
    assert ops["PRMT"] == 64, "the unpack's own 2 PRMT for 8 codes, no rearranging of halves"
    assert ops["HMMA.16816.F32"] == 64 and "LDSM" not in ops and "LDSM.16.M88.4" not in ops
    assert ops.get("STS.128", 0) <= 8, "shared memory only for q's conversion to the A operand"
    assert sorted(probe["k_order"]) == list(range(128)), "q's channel order is a permutation"
