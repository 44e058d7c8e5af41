"""qcompile dump SCRIPT.py [args...]: run a user script with graph dumps on, then summarise.

Per compiled graph the pass writes graph_*/00_before.txt, 01_after_<pass>.txt and summary.json
(see passes/manager.py); this adds the kernel template's source and the autotuned configs,
and prints one table for the whole run."""
import inspect
import json
import os
import runpy
import sys
import time
from pathlib import Path

from .report import Fallback, Matched, Report


def run_script(script: str, args: list[str], folder: Path) -> Report:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    os.environ["QCOMPILE_DEBUG_DIR"] = str(folder)
    torch._inductor.config.force_disable_caches = True  # a cached graph would skip the pass
    saved = sys.argv
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        sys.argv = saved
    _write_kernels(folder)
    return collect(folder)


def _write_kernels(folder: Path) -> None:
    """The templates W-only matches run (with their shared helpers), and the config
    autotuning chose per key."""
    if "qcompile.runtime.ops" not in sys.modules:
        return
    from qcompile.codegen import unpack, wq_gemm, wq_gemv
    from qcompile.runtime.ops import chosen
    for module in (wq_gemm, wq_gemv, unpack):
        (folder / f"{module.__name__.rsplit('.', 1)[1]}.py").write_text(inspect.getsource(module))
    (folder / "kernels.json").write_text(json.dumps({str(k): str(c) for k, c in chosen.items()}, indent=2))


def collect(folder: Path) -> Report:
    report = Report()
    for summary in sorted(folder.glob("graph_*/summary.json")):
        data = json.loads(summary.read_text())
        report.matched += [Matched(**m) for m in data["matched"]]
        report.fallbacks += [Fallback(**f) for f in data["fallbacks"]]
        report.graphs += data["graphs"]
    return report


def main(script: str, args: list[str], out: str | None) -> None:
    folder = Path(out or Path("qcompile_debug") / time.strftime("%Y%m%d-%H%M%S"))
    report = run_script(script, args, folder)
    print(report)
    print(f"qcompile dump: {folder.resolve()}")
