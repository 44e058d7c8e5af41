"""The sibling-linears pass: the ``qcompile::wq_linear`` calls that read one input with one
format (q, k and v; gate and up) become one ``qcompile::wq_linear_siblings`` call over their
joined columns, and each former call's users read its columns as a split of the result.

One launch instead of three, and at M=1 the small k and v projections stop costing a kernel's
fixed time each. Only linears whose tensors are column blocks of one buffer each are joined
(quantize() stores them so, qcompile/siblings.py; the fake tensors keep the storage sharing);
the op checks it again at run time and runs one kernel per linear if the buffers were copied
since.
"""
import operator
from collections import defaultdict

import torch
from torch.fx import Graph, Node

from qcompile.report import Fused, Report
from qcompile.runtime.ops import joined_view  # importing it registers qcompile::wq_linear_siblings

from .subgraph import _VIEWS
from .wonly_linear import JOINABLE, OP, _call, _val

aten = torch.ops.aten
SIBLINGS = torch.ops.qcompile.wq_linear_siblings.default


def _input_key(x: Node):
    """Equal for the flattening views that each linear makes of one tensor."""
    if x.target in _VIEWS:
        return x.args[0], tuple(x.args[1])
    return x


def fuse_sibling_linears(graph: Graph, report: Report, inference: bool = True) -> None:
    order = {node: i for i, node in enumerate(graph.nodes)}
    groups = defaultdict(list)
    for node in graph.nodes:
        if node.target == OP and node.meta.get(JOINABLE):
            x, _, _, zero, bias, fmt, bits, group = node.args
            groups[_input_key(x), fmt, bits, group, zero is None, bias is None, _val(x).dtype].append(node)
    for nodes in groups.values():
        first = nodes[0]
        operands = [a for node in nodes for a in node.args[1:5] if isinstance(a, Node)]
        if len(nodes) < 2 or any(order[a] > order[first] for a in operands):
            continue  # a weight computed after the first linear: the group cannot be one call there
        x, _, _, zero, bias, fmt, bits, group = first.args
        columns = [[node.args[i] for node in nodes] for i in range(1, 5)]
        if any(joined_view([_val(a) for a in ts]) is None for ts in columns if ts[0] is not None):
            continue  # not column blocks of one buffer (fake tensors keep the storage sharing)
        with graph.inserting_before(first):
            joined = _call(graph, SIBLINGS, (x, columns[0], columns[1], [] if zero is None else columns[2],
                                             [] if bias is None else columns[3], fmt, bits, group))
            names, widths = [node.meta[JOINABLE] for node in nodes], [int(_val(node).shape[-1]) for node in nodes]
            parts = _call(graph, aten.split_with_sizes.default, (joined, widths, _val(first).dim() - 1))
            outputs = [_call(graph, operator.getitem, (parts, i)) for i in range(len(nodes))]
        for node, part in zip(nodes, outputs):  # erased only now: ``first`` was the insertion point
            node.replace_all_uses_with(part)
            graph.erase_node(node)
        report.fused.append(Fused("linear", names, widths, f"wq_linear_siblings[{fmt},bits={bits},group={group}]"))
    graph.eliminate_dead_code()
