"""qcompile's passes as one Inductor CustomGraphPass, with graph dumps for debugging."""
import itertools
import json
import os
from dataclasses import asdict
from pathlib import Path

from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.fx import Graph

from qcompile.report import Report

from .wonly_linear import rewrite_linears

_SOURCES = tuple(sorted(str(p) for d in (Path(__file__).parent, Path(__file__).parent.parent / "qcompile" / "formats")
                        for p in d.glob("*.py")))
_counter = itertools.count()

PASSES = [("wonly_linear", rewrite_linears)]


class QCompilePass(CustomGraphPass):
    """Runs in ``post_grad_custom_pre_pass``: sees the ATen graph before Inductor's own passes.

    ``uuid`` hashes the source of the passes and of the formats they trace, so Inductor's
    cache never serves a graph rewritten by an older version.
    """

    def __init__(self, sink, inference: bool = True):
        self.sink, self.inference = sink, inference

    def __call__(self, graph: Graph) -> None:
        report = Report(graphs=1)
        dump = os.environ.get("QCOMPILE_DEBUG_DIR")
        folder = Path(dump) / f"graph_{os.getpid()}_{next(_counter):03d}" if dump else None
        if folder:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "00_before.txt").write_text(str(graph))
        for i, (name, run) in enumerate(PASSES, 1):
            run(graph, report, self.inference)
            if folder:
                (folder / f"{i:02d}_after_{name}.txt").write_text(str(graph))
        if folder:
            (folder / "summary.json").write_text(json.dumps(asdict(report), indent=2, default=str))
        self.sink(report)

    def uuid(self) -> bytes:
        return get_hash_for_files(_SOURCES)
