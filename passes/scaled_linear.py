"""The scaled linear pass: a float32 matmul of two 8-bit tensors (int8 or float8 e4m3), and the
per-row and per-column scaling, the bias add and the cast after it, become
``qcompile::scaled_mm`` (8-bit tensor cores, all of that in the epilogue).

That is the shape of every activation-quantized linear (w8a8's and fp8's references,
LLM.int8()'s vector-wise product, SmoothQuant-style code):
``(x_q.float() @ w_q.float().t()) * s_x * s_w``. When the int8 weight is w4a8's, rebuilt from
4-bit codes in the graph, it becomes ``qcompile::w4a8_mm`` instead, which rebuilds it in the kernel.
The activation quantization before the matmul stays in the graph, for Inductor to fuse into
the op that produces x.
"""
import torch
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from qcompile.formats import FLOAT_DTYPES
from qcompile.report import Fallback, Matched, Report
from qcompile.runtime.device import match_blocked_reason
from qcompile.runtime.ops import SCALED_FORMATS  # registers qcompile::scaled_mm too

from .specs import find_w4a8
from .subgraph import _VIEWS
from .wonly_linear import EXPLAINED, _call, _val

aten, prims = torch.ops.aten, torch.ops.prims
OP = torch.ops.qcompile.scaled_mm.default
W4A8_OP = torch.ops.qcompile.w4a8_mm.default


def _is_transpose(node) -> bool:
    return isinstance(node, Node) and (node.target == aten.t.default or (
        node.target == aten.permute.default and list(node.args[1]) == [1, 0]))


def lowp_source(node: Node):
    """(the 8-bit tensor, how to make the matmul operand of it) for a float matmul operand that
    converts an int8 or float8 tensor, looking through one transpose (the weight) or one
    flattening view (3-D activations) before or after the conversion; None if it is not one."""
    steps, seen_convert = [], False
    while isinstance(node, Node) and len(steps) < 3:
        if node.target == prims.convert_element_type.default and not seen_convert:
            seen_convert = True
        elif _is_transpose(node) and "t" not in steps:
            steps.append("t")
        elif node.target in _VIEWS and "view" not in steps and _val(node).dim() == 2:
            steps.append("view")
        else:
            break
        node = node.args[0]
    if not seen_convert or _val(node).dtype not in SCALED_FORMATS or steps not in ([], ["t"], ["view"]):
        return None
    return node, steps[0] if steps else None


def _same(a, b) -> bool:
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def _operand_of(op: Node, chain: Node, shape) -> tuple[str, Node] | None:
    """What ``op`` does to ``chain`` (shape ``shape``) that the kernel's epilogue can take:
    ("row" | "col", scale) for a multiplication by one float per row ([..., 1]), per column
    ([N]) or for all (a per-tensor scale, as "col"); ("bias", b) for an addition of one float
    per column."""
    kinds = {aten.mul.Tensor: ("row", "col"), aten.add.Tensor: ("bias",)}.get(op.target)
    if kinds is None or len(op.args) != 2 or op.kwargs or chain not in op.args:
        return None
    other = op.args[1] if op.args[0] is chain else op.args[0]
    if not isinstance(other, Node) or _val(other).dtype not in FLOAT_DTYPES:
        return None
    s = tuple(_val(other).shape)
    per_col = _same(s[-1:], shape[-1:]) and all(statically_known_true(d == 1) for d in s[:-1])
    if "row" in kinds and _same(s, (*shape[:-1], 1)):
        return "row", other
    if per_col or all(statically_known_true(d == 1) for d in s):  # one value for all: a per-tensor scale
        return kinds[-1], other
    return None


def _epilogue(mm: Node):
    """What follows ``mm`` one user at a time and the kernel can do instead: views, the row
    and column scales, then a bias, then a cast. Returns (views, {kind: node or dtype}, last)."""
    views, epi, node = [], {}, mm
    while len(node.users) == 1 and "dtype" not in epi:
        user = next(iter(node.users))
        if user.target in _VIEWS:
            views.append(user)
        elif user.target == prims.convert_element_type.default and user.args[1] in FLOAT_DTYPES:
            epi["dtype"] = user.args[1]
        else:
            found = _operand_of(user, node, tuple(_val(node).shape))
            if found is None or found[0] in epi or "bias" in epi:  # nothing scales the bias
                break
            epi[found[0]] = found[1]
        node = user
    return views, epi, node


def rewrite_scaled_linears(graph: Graph, report: Report, inference: bool = True) -> None:
    for mm in list(graph.nodes):
        if mm.op != "call_function" or mm.target != aten.mm.default:
            continue
        a, b = lowp_source(mm.args[0]), lowp_source(mm.args[1])
        if a is None or b is None or _val(a[0]).dtype != _val(b[0]).dtype:
            continue
        fmt = SCALED_FORMATS[_val(a[0]).dtype][0]
        m, n = _val(mm).shape
        k = _val(mm.args[0]).shape[1]
        shapes = {"M": m if isinstance(m, int) else str(m), "K": int(k), "N": int(n),
                  "dtype": str(_val(a[0]).dtype).replace("torch.", "")}
        reason = (None if _val(mm).dtype == torch.float32 else
                  f"8-bit operands converted to {_val(mm).dtype}; the scaled GEMM replaces float32 matmuls")
        reason = reason or match_blocked_reason(_val(mm).device) or (
            None if inference else "graph needs autograd; qcompile kernels are inference-only")
        if reason:
            report.fallbacks.append(Fallback("scaled_linear", reason, shapes, mm.name))
            mm.meta[EXPLAINED] = True  # one reason per matmul: the later passes skip it
            continue
        w4a8, why = None, "it matches no format's rebuild (w4a8's needs static weight sizes)"
        if b[1] is None and fmt == "w8a8":
            try:
                w4a8 = find_w4a8(b[0], int(k), int(n))
            except Exception as e:  # noqa: BLE001  a matcher bug costs the fused path (the int8 one is right), not the compile
                why = f"qcompile matcher error: {type(e).__name__}: {e}"
        if w4a8 is None and b[0].op == "call_function":  # the GEMM is matched, the weight's rebuild is not
            report.fallbacks.append(Fallback(
                "scaled_linear", f"int8 weight computed in the graph, rebuilt by Inductor on every call: {why}",
                shapes, b[0].name))
        views, epi, last = _epilogue(mm)
        with graph.inserting_before(last):
            ops = []
            for src, step in (a, b):
                if step == "t":
                    src = _call(graph, aten.permute.default, (src, [1, 0]))
                elif step == "view":
                    src = _call(graph, aten.reshape.default, (src, [-1, k]))
                ops.append(src)
            vec = {kind: _call(graph, aten.reshape.default, (epi[kind], [-1]))
                   for kind in ("row", "col", "bias") if kind in epi}
            vectors = (vec.get("row"), vec.get("col"), vec.get("bias"), epi.get("dtype", torch.float32))
            if w4a8:  # the int8 weight is rebuilt inside the kernel from the 4-bit codes
                out = _call(graph, W4A8_OP, (ops[0], *w4a8[1], *vectors))
            else:
                out = _call(graph, OP, (*ops, *vectors))
            for v in views:
                out = _call(graph, v.target, (out, *v.args[1:]))
        last.replace_all_uses_with(out)  # mm and its epilogue go with the dead code
        folded = [kind for kind in ("row", "col", "bias") if kind in epi]
        if "dtype" in epi:
            folded.append(str(epi["dtype"]).replace("torch.", ""))
        op_name, fmt, bits, group = ("w4a8_mm", "w4a8", 4, w4a8[0]) if w4a8 else ("scaled_mm", fmt, 8, -1)
        report.matched.append(Matched("scaled_linear", fmt, bits, group, shapes,
                                      f"{op_name}[{','.join(folded) or 'unscaled'}]", mm.name))
    graph.eliminate_dead_code()
