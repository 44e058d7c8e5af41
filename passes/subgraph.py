"""Dequantization subgraphs as networkx graphs, so a graph found in a compiled model can be
compared exactly (ops, literal arguments, operand positions, input shapes and dtypes) with
the graph the format's reference code traces to."""
from collections import Counter

import networkx as nx
import torch
from torch.fx import Node

aten, prims = torch.ops.aten, torch.ops.prims

# Tracing paths disagree on how they spell a view; Inductor lowers them alike.
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_ALIASES = {aten.alias.default}
_NOOP_WHEN_SAME = {aten.slice.Tensor, prims.convert_element_type.default}  # same shape and dtype out as in
MAX_NODES = 128


def _is_noop(node: Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target in _ALIASES:
        return True
    if node.target in _NOOP_WHEN_SAME and isinstance(node.args[0], Node):
        out, src = node.meta.get("val"), node.args[0].meta.get("val")
        return out is not None and src is not None and out.shape == src.shape and out.dtype == src.dtype
    return False


def canonical(node: Node) -> Node:
    """Skip ops that return their input unchanged: one tracer keeps them, another drops them."""
    while _is_noop(node):
        node = node.args[0]
    return node


def _is_input(node: Node, stop) -> bool:
    return node.op != "call_function" or (stop is not None and stop(node))


def backward_slice(root: Node, stop=None) -> list[Node] | None:
    """Every node ``root`` depends on, down to graph inputs (and nodes ``stop`` accepts, taken
    as inputs); None if it is not a small function of those alone."""
    seen, stack = {}, [canonical(root)]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen[node] = None
        if len(seen) > MAX_NODES:
            return None
        if not _is_input(node, stop):
            stack.extend(canonical(a) for a in node.all_input_nodes)
        elif node.op not in ("placeholder", "get_attr", "call_function"):
            return None
    return list(seen)


def leaves(nodes: list[Node], stop=None) -> list[Node]:
    return [n for n in nodes if _is_input(n, stop)]


def _literal(a):
    if isinstance(a, Node):
        return "%"
    if isinstance(a, (list, tuple)):
        return tuple(_literal(x) for x in a)
    if isinstance(a, torch.device):  # the spec is traced on one device, the model may be on another
        return "device"
    return repr(a)


def _signature(node: Node, stop=None):
    if _is_input(node, stop):
        val = node.meta["val"]
        return ("input", val.dtype, tuple(val.shape))
    target = "view" if node.target in _VIEWS else str(node.target)
    kwargs = tuple(sorted((k, _literal(v)) for k, v in node.kwargs.items()))
    return (target, _literal(node.args), kwargs)


def to_digraph(nodes: list[Node], stop=None) -> nx.DiGraph:
    """Nodes carry their signature; edges carry the operand positions they feed."""
    g = nx.DiGraph()
    for node in nodes:
        g.add_node(node, sig=_signature(node, stop))
    for node in nodes:
        if _is_input(node, stop):
            continue
        for i, a in enumerate(node.args):
            for j, x in enumerate(a if isinstance(a, (list, tuple)) else [a]):
                if isinstance(x, Node):
                    src = canonical(x)
                    pos = g.edges[src, node]["pos"] if g.has_edge(src, node) else frozenset()
                    g.add_edge(src, node, pos=pos | {(i, j)})
    return g


def match(found: nx.DiGraph, spec: nx.DiGraph) -> dict | None:
    """Isomorphism found -> spec respecting signatures and operand positions, or None."""
    if found.number_of_nodes() != spec.number_of_nodes():
        return None
    m = nx.algorithms.isomorphism.DiGraphMatcher(
        found, spec, node_match=lambda a, b: a["sig"] == b["sig"], edge_match=lambda a, b: a["pos"] == b["pos"])
    return dict(m.mapping) if m.is_isomorphic() else None


def difference(found: nx.DiGraph, spec: nx.DiGraph) -> str:
    """The first op signature one graph has and the other lacks, for the fallback reason."""
    a = Counter(d["sig"] for _, d in found.nodes(data=True))
    b = Counter(d["sig"] for _, d in spec.nodes(data=True))
    extra, missing = list((a - b).elements()), list((b - a).elements())
    if not extra and not missing:
        return "same ops, wired differently"
    return f"has {extra[0] if extra else 'nothing extra'}, lacks {missing[0] if missing else 'nothing'}"
