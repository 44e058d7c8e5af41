"""The tuner and its cache on disk: a second process reads what the first one timed; corrupt,
foreign or stale entries are ignored with a warning and tuned again; export/import ships the
cache and refuses anything that is not an entry."""
import io
import json
import os
import tarfile
import time
import warnings

import pytest
import torch
import triton

from qcompile.codegen.tiling import Choice
from qcompile.runtime.autotune import SOURCE, Tuner
from qcompile.runtime.autotune_cache import AutotuneCache, device_tag
from triton.runtime.errors import OutOfResources

CPU = torch.device("cpu")
KEY = ("affine", 4, 128, 1, 4096, 4096, "float16")
# the "kernel" sleeps SLEEP_MS: the tuner must find the fastest by timing (one wall-clock sample
# each, so the sleeps differ by more than a loaded machine's oversleep; with 2 ms against 15, one
# case failed once among 16 xdist workers compiling Triton kernels on the GPU machine)
CANDIDATES = [Choice(kernel, triton.Config({"BLOCK_N": bn, "SLEEP_MS": ms}, num_warps=2, num_stages=1))
              for kernel, bn, ms in (("gemm", 32, 120), ("gemv", 64, 1), ("gemv", 128, 50))]


class Kernel:
    def __init__(self, too_big=()):
        self.calls, self.too_big = [], too_big

    def __call__(self, choice):
        cfg = choice.config.kwargs
        if cfg["BLOCK_N"] in self.too_big:
            raise OutOfResources(300000, 232448, "shared memory")
        self.calls.append(cfg["BLOCK_N"])
        time.sleep(cfg["SLEEP_MS"] / 1e3)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_AUTOTUNE", "1")
    monkeypatch.setenv("QCOMPILE_TUNE_BUDGET_S", "60")
    return AutotuneCache(tmp_path)


def _entry_path(cache):
    (path,) = cache.folder.glob("*/*.json")
    return path


def test_tunes_once_then_reads_the_disk_in_a_new_process(cache):
    kernel = Kernel()
    assert Tuner(cache).pick("gemv", KEY, lambda: CANDIDATES, kernel, CPU) is CANDIDATES[1]
    assert set(kernel.calls) == {32, 64, 128}
    entry = json.loads(_entry_path(cache).read_text())
    assert entry["device"] == device_tag(CPU) and entry["source"] == SOURCE and entry["key"] == list(KEY)
    assert entry["config"] == {"kernel": "gemv", "kwargs": {"BLOCK_N": 64, "SLEEP_MS": 1}, "num_warps": 2,
                               "num_stages": 1}
    assert len(entry["timings_us"]) == 3

    fresh, again = Tuner(cache), Kernel()  # a new process: empty memory, same folder
    assert fresh.pick("gemv", KEY, lambda: CANDIDATES, again, CPU) is CANDIDATES[1]
    assert again.calls == [] and fresh.stats == {"memory": 0, "disk": 1, "tuned": 0, "untuned": 0}
    assert fresh.pick("gemv", KEY, lambda: CANDIDATES, again, CPU) is CANDIDATES[1]
    assert fresh.stats["memory"] == 1
    assert not list(cache.folder.glob("*/.tmp-*")), "atomic writes leave no temporary file behind"


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other key", "other device", "stale config"])
def test_a_bad_entry_is_ignored_with_a_warning_and_rebuilt(cache, damage):
    Tuner(cache).pick("gemv", KEY, lambda: CANDIDATES, Kernel(), CPU)
    path = _entry_path(cache)
    entry = json.loads(path.read_text())
    if damage == "garbage":
        path.write_bytes(b"\x00\xffnot json")
    elif damage == "truncated":
        path.write_text(path.read_text()[:40])
    elif damage == "other key":
        path.write_text(json.dumps({**entry, "key": [*KEY[:-1], "bfloat16"]}))
    elif damage == "other device":
        path.write_text(json.dumps({**entry, "device": "NVIDIA_A100-sm80-torch2.5-triton3.1"}))
    else:
        path.write_text(json.dumps({**entry, "config": {**entry["config"], "num_warps": 16}}))
    kernel = Kernel()
    with pytest.warns(UserWarning, match="ignoring .*tuning again"):
        assert Tuner(cache).pick("gemv", KEY, lambda: CANDIDATES, kernel, CPU) is CANDIDATES[1]
    assert kernel.calls, "tuned again"
    assert json.loads(path.read_text())["config"]["kwargs"]["BLOCK_N"] == 64, "and the entry rewritten"


def test_budget_and_configs_that_do_not_fit(cache, monkeypatch):
    kernel = Kernel(too_big=(32,))
    monkeypatch.setenv("QCOMPILE_TUNE_BUDGET_S", "0")
    # 32 does not fit; 64 is timed; then the budget is spent and 128 never runs
    assert Tuner(cache).pick("gemm", KEY, lambda: CANDIDATES, kernel, CPU) is CANDIDATES[1]
    assert set(kernel.calls) == {64}
    with pytest.raises(OutOfResources):
        Tuner(AutotuneCache(cache.root / "other")).pick("gemm", KEY, lambda: CANDIDATES, Kernel(too_big=(32, 64, 128)), CPU)


def test_untuned_mode_takes_the_first_candidate_and_leaves_the_cache_alone(cache, monkeypatch):
    monkeypatch.setenv("QCOMPILE_AUTOTUNE", "0")
    kernel = Kernel()
    assert Tuner(cache).pick("gemm", KEY, lambda: CANDIDATES, kernel, CPU) is CANDIDATES[0]
    assert kernel.calls == [] and not cache.entries()


def test_export_import_and_hostile_archives(cache, tmp_path):
    Tuner(cache).pick("gemv", KEY, lambda: CANDIDATES, Kernel(), CPU)
    Tuner(cache).pick("gemm", KEY, lambda: CANDIDATES, Kernel(), CPU)
    archive = tmp_path / "cache.tar.gz"
    assert cache.export(archive) == 2
    other = AutotuneCache(tmp_path / "elsewhere")
    assert other.import_(archive) == (2, 0)
    assert sorted(e["kernel"] for e in other.entries()) == ["gemm", "gemv"]

    entry = next(other.folder.glob("*/gemv-*.json")).read_bytes()
    hostile = tmp_path / "hostile.tar.gz"
    with tarfile.open(hostile, "w:gz") as tar:
        for name, data in [("../../escape.json", entry), ("autotune/../escape.json", entry),
                           (f"autotune/{device_tag(CPU)}/gemv-{'0' * 32}.json", entry),  # renamed: no match
                           (f"autotune/{device_tag(CPU)}/gemm-{'1' * 32}.json", b"{broken")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    third = AutotuneCache(tmp_path / "third")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert third.import_(hostile) == (0, 4)
    assert len(caught) == 4 and not third.entries()
    assert not (tmp_path / "escape.json").exists() and not (tmp_path.parent / "escape.json").exists()


def test_ls_reports_invalid_files_and_clear_removes_everything(cache):
    Tuner(cache).pick("gemv", KEY, lambda: CANDIDATES, Kernel(), CPU)
    (_entry_path(cache).parent / f"gemm-{'2' * 32}.json").write_text("[]")
    entries = cache.entries()
    assert sorted("error" in e for e in entries) == [False, True]
    assert cache.clear() == 2 and cache.entries() == []


def test_default_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path / "q"))
    assert AutotuneCache().folder == tmp_path / "q" / "autotune"
    monkeypatch.delenv("QCOMPILE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert AutotuneCache().folder == tmp_path / "xdg" / "qcompile" / "autotune"
    assert os.sep not in device_tag(CPU) and device_tag(CPU).startswith("cpu-interpreter-torch")


def test_warmup_launches_each_distinct_layer_shape_per_batch_size(cache, monkeypatch, device):
    import qcompile
    import qcompile.runtime.ops as ops
    monkeypatch.setattr(ops, "TUNER", Tuner(cache))
    model = torch.nn.Sequential(torch.nn.Linear(64, 24), torch.nn.Linear(64, 24), torch.nn.Linear(24, 8))
    model.append(torch.nn.Linear(8, 16))
    model.to(device)
    qcompile.quantize(model, bits=4, group_size=8, config={"2": {"bits": 3}, "3": {"format": "w8a8"}})
    ops.launches.clear()
    rows = qcompile.warmup(model, m=[1, 3], progress=False)
    # layers 0 and 1 share a shape: 3 shapes x 2 batch sizes
    assert [(r["N"], r["K"], r["format"], r["bits"], r["M"]) for r in rows] == [
        (24, 64, "affine", 4, 1), (24, 64, "affine", 4, 3), (8, 24, "affine", 3, 1),
        (8, 24, "affine", 3, 3), (16, 8, "w8a8", 8, 1), (16, 8, "w8a8", 8, 3)]
    # M = 3: the GEMM or the multi-row GEMV, whichever timed faster
    assert [r["kernel"] for r in rows] == ["gemv", rows[1]["kernel"], "gemv", rows[3]["kernel"], "scaled", "scaled"]
    assert {rows[1]["kernel"], rows[3]["kernel"]} <= {"gemm", "gemv"}
    assert sum(ops.launches.values()) == 6 and all("BLOCK_N=" in r["config"] for r in rows)
    # a launch with a single candidate (on a GPU, these small K leave one GEMV tile) is not cached
    assert len(cache.entries()) == ops.TUNER.stats["tuned"] == 6 - ops.TUNER.stats["untuned"]
    with pytest.raises(ValueError, match="batch sizes"):
        qcompile.warmup(model, m=[0])
    with pytest.raises(ValueError, match="no quantized layer"):
        qcompile.warmup(torch.nn.Linear(4, 4))


def test_warmup_runs_w4a8_through_the_scaled_gemm(cache, monkeypatch, device):
    import qcompile
    import qcompile.runtime.ops as ops
    monkeypatch.setattr(ops, "TUNER", Tuner(cache))
    model = torch.nn.Sequential(torch.nn.Linear(64, 24)).to(device)
    qcompile.quantize(model, format="w4a8", group_size=32)
    ops.launches.clear()
    rows = qcompile.warmup(model, m=[1, 3], progress=False)
    assert [(r["format"], r["bits"], r["group_size"], r["M"], r["kernel"]) for r in rows] == [
        ("w4a8", 4, 32, 1, "scaled"), ("w4a8", 4, 32, 3, "scaled")]
    assert ops.launches == {("scaled", "w4a8", 4): 2}


WRITER = """
import sys, time, torch, triton
from qcompile.codegen.tiling import Choice
from qcompile.runtime.autotune_cache import AutotuneCache
cache, me, start = AutotuneCache(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
while time.time() < start:  # both processes begin together
    pass
for round in range(200):
    for i in range(8):  # the same 8 keys from both processes, each with its own config
        cfg = Choice("gemv", triton.Config({"BLOCK_N": 32 * (me + 1), "SLEEP_MS": i}, num_warps=2, num_stages=1))
        cache.store(torch.device("cpu"), "gemv", "src", ("affine", 4, 128, 1, i, 64, "float16"), cfg, {"r": round})
"""


def test_two_processes_writing_at_once_leave_a_valid_cache(cache):
    """Writes go to a temporary file and are renamed into place: whoever renames last wins,
    and no reader ever sees half an entry or a leftover temporary file."""
    import subprocess
    import sys
    start = str(time.time() + 3)  # after both interpreters have started
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(cache.root), str(me), start]) for me in (0, 1)]
    reads = 0
    while any(p.poll() is None for p in procs):  # meanwhile, a reader only ever sees whole entries
        for path in cache.folder.glob("*/*.json"):
            try:
                text = path.read_bytes()
            except FileNotFoundError:
                continue
            json.loads(text)
            reads += 1
    assert [p.wait(timeout=120) for p in procs] == [0, 0] and reads
    entries = cache.entries()
    assert len(entries) == 8 and not [e for e in entries if "error" in e]
    assert {e["config"]["kwargs"]["BLOCK_N"] for e in entries} <= {32, 64}
    assert not list(cache.folder.glob("*/.tmp-*"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every entry reads back without a warning
        for i in range(8):
            options = [Choice("gemv", triton.Config({"BLOCK_N": bn, "SLEEP_MS": i}, num_warps=2, num_stages=1))
                       for bn in (32, 64)]
            assert cache.load(CPU, "gemv", "src", ("affine", 4, 128, 1, i, 64, "float16"), options) in options
