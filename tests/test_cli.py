"""The qcompile command, through a subprocess as a user runs it: dump (of a script and of a model
config), warmup and the cache commands."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import triton
from packaging.version import Version

SCRIPT = """
import sys, torch, qcompile
dev = "cuda" if torch.cuda.is_available() else "cpu"
m = torch.nn.Sequential(torch.nn.Linear(64, 24), torch.nn.ReLU(), torch.nn.Linear(24, 8)).to(dev)
qcompile.quantize(m, bits=int(sys.argv[1]), group_size=8)
with torch.no_grad():
    torch.compile(m, backend="qcompile")(torch.randn(3, 64, device=dev))
"""
TINY_LLAMA = {"model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 64}
INTERPRET = {"TRITON_INTERPRET": "1"}
old_interpreter = pytest.mark.skipif(
    not torch.cuda.is_available() and Version(triton.__version__) < Version("3.7"),
    reason="triton 3.6's interpreter cannot run loops with runtime bounds under numpy 2 "
           "(TypeError: only 0-dimensional arrays can be converted to Python scalars)")


def qcompile_cli(*args, **env):
    r = subprocess.run([sys.executable, "-m", "qcompile.cli", *map(str, args)], capture_output=True, text=True,
                       timeout=600, env={**os.environ, **env})
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@old_interpreter
def test_dump_runs_a_script_and_names_the_matches(tmp_path):
    script = tmp_path / "user.py"
    script.write_text(SCRIPT)
    out = tmp_path / "dump"
    stdout = qcompile_cli("dump", "--out", out, script, "3", **({} if torch.cuda.is_available() else INTERPRET))
    assert "2 matched, 0 fallbacks" in stdout and str(out) in stdout
    (graph,) = out.glob("graph_*")
    assert {p.name for p in graph.iterdir()} == {
        "00_before.txt", "01_after_scaled_linear.txt", "01_rewrites_scaled_linear.json", "02_after_wonly_linear.txt",
        "02_rewrites_wonly_linear.json", "02_rewrites_wonly_linear.svg", "03_after_sibling_linears.txt",
        "03_rewrites_sibling_linears.json", "04_after_kv_attention.txt", "04_rewrites_kv_attention.json", "summary.json"}
    summary = json.loads((graph / "summary.json").read_text())
    assert [(m["format"], m["bits"], m["group_size"]) for m in summary["matched"]] == [("affine", 3, 8)] * 2
    region = json.loads((graph / "02_rewrites_wonly_linear.json").read_text())
    roles = [n["role"] for n in region["after"]["nodes"]]
    assert roles.count("added") == 2, "one wq_linear per matched layer (biases folded in)"
    assert {n["op"] for n in region["after"]["nodes"] if n["role"] == "added"} == {"wq_linear"}
    assert {"mm", "addmm"} & {n["op"] for n in region["before"]["nodes"] if n["role"] == "removed"}
    assert "<svg" in (graph / "02_rewrites_wonly_linear.svg").read_text()
    assert "wq_gemm_kernel" in (out / "wq_gemm.py").read_text() and (out / "wq_gemv.py").exists()
    kernels = json.loads((out / "kernels.json").read_text())
    assert kernels and all("BLOCK_N=" in k["choice"] for k in kernels.values()), "the config each kernel ran with"


def test_dump_model_config_shows_what_would_match(tmp_path):
    """On a machine without a GPU this is a dry run: matching as on a GPU, reference compute."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_LLAMA))
    out = tmp_path / "dump"
    stdout = qcompile_cli("dump", "--model", config, "--group-size", 32, "--skip", "lm_head", "--out", out)
    assert "14 matched, 0 fallbacks, 4 fused, 1 graphs, 0 graph breaks" in stdout  # 7 linears x 2 layers
    assert len(list(out.glob("graph_*/02_rewrites_wonly_linear.svg"))) == 1


def test_dump_rejects_script_and_model_together(tmp_path):
    r = subprocess.run([sys.executable, "-m", "qcompile.cli", "dump", "--model", "c.json", "s.py"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "either SCRIPT.py" in r.stderr


@old_interpreter
def test_warmup_fills_the_cache_that_the_next_process_reads(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_LLAMA))
    cache = tmp_path / "cache"
    env = {"QCOMPILE_AUTOTUNE": "1", "QCOMPILE_TUNE_BUDGET_S": "1"}
    args = ("warmup", "--model", config, "--group-size", 32, "--m", "1,5", "--cache-dir", cache, "--dtype", "fp32")
    first = counts(qcompile_cli(*args, **env))
    # q/o 64x64, k/v 32x64, gate/up 96x64, down 64x96, lm_head 128x64: 5 shapes x 2 batch sizes.
    # A shape with one candidate (on a GPU, small K leaves one GEMV tile) is neither timed nor cached.
    tuned = first["tuned"]
    assert first["shapes"] == 5 and first["read"] == 0 and tuned + first["single"] == 10 and tuned >= 5
    assert "gemv" in first["text"]  # M = 1; M = 5 runs the GEMM or the multi-row GEMV, as timed
    assert counts(qcompile_cli(*args, **env))["read"] == tuned

    assert f"{tuned} entries in" in qcompile_cli("cache", "ls", "--cache-dir", cache)
    archive = tmp_path / "warm.tar.gz"
    assert f"exported {tuned} entries" in qcompile_cli("cache", "export", archive, "--cache-dir", cache)
    assert f"removed {tuned} entries" in qcompile_cli("cache", "clear", "--cache-dir", cache)
    assert f"imported {tuned} entries" in qcompile_cli("cache", "import", archive, "--cache-dir", cache)
    again = counts(qcompile_cli(*args, **env))
    assert (again["tuned"], again["read"]) == (0, tuned)


def counts(stdout):
    """The numbers of warmup's last line."""
    m = re.search(r"(\d+) layer shapes x 2 batch sizes; (\d+) tuned, (\d+) read from the cache, "
                  r"(\d+) with one candidate", stdout)
    assert m, stdout
    shapes, tuned, read, single = map(int, m.groups())
    return {"shapes": shapes, "tuned": tuned, "read": read, "single": single, "text": stdout}


def test_warmup_rejects_bad_batch_sizes():
    r = subprocess.run([sys.executable, "-m", "qcompile.cli", "warmup", "--model", "c.json", "--m", "0,x"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "--m '0,x'" in r.stderr
