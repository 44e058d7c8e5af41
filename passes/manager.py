"""qcompile's passes as one Inductor CustomGraphPass, with graph dumps for debugging."""
import itertools
import json
import os
from dataclasses import asdict
from pathlib import Path

import networkx as nx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.fx import Graph

from qcompile.report import Report

from .kv_attention import rewrite_kv_attention
from .scaled_linear import rewrite_scaled_linears
from .sibling_linears import fuse_sibling_linears
from .wonly_linear import rewrite_linears

_SOURCES = tuple(sorted(str(p) for d in (Path(__file__).parent, Path(__file__).parent.parent / "qcompile" / "formats")
                        for p in d.glob("*.py")))
_counter = itertools.count()

# scaled first: the weight-only pass would report its int8 matmuls as inputs it cannot match
PASSES = [("scaled_linear", rewrite_scaled_linears), ("wonly_linear", rewrite_linears),
          ("sibling_linears", fuse_sibling_linears), ("kv_attention", rewrite_kv_attention)]


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
            before = folder and dataflow(graph)
            run(graph, report, self.inference)
            if folder:
                (folder / f"{i:02d}_after_{name}.txt").write_text(str(graph))
                (folder / f"{i:02d}_rewrites_{name}.json").write_text(json.dumps(rewritten_region(before, dataflow(graph))))
        if folder:
            (folder / "summary.json").write_text(json.dumps(asdict(report), indent=2, default=str))
        self.sink(report)

    def uuid(self) -> bytes:
        return get_hash_for_files(_SOURCES)


def dataflow(graph: Graph) -> nx.DiGraph:
    """Nodes by name, labelled with their op, edges from operand to user."""
    g = nx.DiGraph()
    for i, node in enumerate(graph.nodes):
        target = node.target if node.op == "call_function" else node.op
        g.add_node(node.name, op=str(getattr(target, "__name__", target)).split(".")[0], order=i)
        g.add_edges_from((a.name, node.name) for a in node.all_input_nodes)
    return g


def rewritten_region(before: nx.DiGraph, after: nx.DiGraph) -> dict:
    """What a pass changed, for the dump's picture: the nodes it removed and the nodes it added,
    each with their direct operands and users (``role``: removed / added / context)."""
    out = {}
    for side, g, other, role in (("before", before, after, "removed"), ("after", after, before, "added")):
        changed = set(g) - set(other)
        region = changed | {m for n in changed for m in (*g.predecessors(n), *g.successors(n))}
        sub = g.subgraph(region)
        out[side] = {"nodes": [{"id": n, **d, "role": role if n in changed else "context"}
                               for n, d in sub.nodes(data=True)],
                     "edges": list(sub.edges())}
    return out
