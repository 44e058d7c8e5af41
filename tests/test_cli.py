"""The qcompile command, through a subprocess as a user runs it."""
import json
import os
import subprocess
import sys

import pytest
import triton
from packaging.version import Version

SCRIPT = """
import sys, torch, qcompile
m = torch.nn.Sequential(torch.nn.Linear(64, 24), torch.nn.ReLU(), torch.nn.Linear(24, 8))
qcompile.quantize(m, bits=int(sys.argv[1]), group_size=8)
with torch.no_grad():
    torch.compile(m, backend="qcompile")(torch.randn(3, 64))
"""


@pytest.mark.skipif(Version(triton.__version__) < Version("3.7"),
                    reason="triton 3.6's interpreter cannot run loops with runtime bounds under numpy 2 "
                           "(TypeError: only 0-dimensional arrays can be converted to Python scalars)")
def test_dump_runs_a_script_and_names_the_matches(tmp_path):
    script = tmp_path / "user.py"
    script.write_text(SCRIPT)
    out = tmp_path / "dump"
    r = subprocess.run([sys.executable, "-m", "qcompile.cli", "dump", "--out", str(out), str(script), "3"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 matched, 0 fallbacks" in r.stdout and str(out) in r.stdout
    (graph,) = out.glob("graph_*")
    assert {p.name for p in graph.iterdir()} == {"00_before.txt", "01_after_wonly_linear.txt", "summary.json"}
    summary = json.loads((graph / "summary.json").read_text())
    assert [(m["format"], m["bits"], m["group_size"]) for m in summary["matched"]] == [("affine", 3, 8)] * 2
    assert "wq_gemm_kernel" in (out / "wq_gemm.py").read_text() and (out / "wq_gemv.py").exists()
    assert json.loads((out / "kernels.json").read_text()), "the chosen config of each kernel is recorded"
