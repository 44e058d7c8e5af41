"""The weight-only linear pass: dequant -> matmul subgraphs become ``qcompile::wq_linear``.

Anchored at each mm/addmm, it asks the specs whether the weight operand is a known
dequantization, checks that the kernel can take the call (device, dtype, layout), and either
rewrites it or records why not. Everything it leaves alone Inductor compiles as before.
"""
import torch
from torch._guards import detect_fake_mode
from torch.fx import Graph, Node

from qcompile.formats import FLOAT_DTYPES
from qcompile.report import Fallback, Matched, Report
from qcompile.runtime.device import match_blocked_reason
from qcompile.runtime.ops import reserve_tile_locks  # importing it registers qcompile::wq_linear

from .specs import FormatSpec, find, specs_for

aten, prims = torch.ops.aten, torch.ops.prims
OP = torch.ops.qcompile.wq_linear.default
EXPLAINED = "qcompile_fallback_recorded"  # node.meta key: an earlier pass gave this matmul's reason
JOINABLE = "qcompile_joinable"  # node.meta key: the matmul a QuantLinear's call replaced (quantize() may join its weights)


def _val(node):
    return node.meta["val"]


def _call(graph: Graph, target, args) -> Node:
    """Insert ``target(*args)`` with its fake value, as Inductor's later passes expect."""
    node = graph.call_function(target, args)
    fake_args = torch.fx.node.map_arg(args, _val)
    with detect_fake_mode([a for a in fake_args if isinstance(a, torch.Tensor)]):
        node.meta["val"] = target(*fake_args)
    return node


def _is(node, target, *args) -> bool:
    return isinstance(node, Node) and node.target == target and list(node.args[1:1 + len(args)]) == list(args)


def _operands(mm: Node):
    """(x, weight, bias) of a matmul the pass can anchor at, else None.

    Besides mm and addmm: Inductor's mm decomposition under coordinate-descent tuning
    (max-autotune) writes an M=1 matmul as (x[:, :, None] * w[None]).sum(1), often on
    float32 upcasts of both operands."""
    if mm.target == aten.mm.default:
        return mm.args[0], mm.args[1], None
    if mm.target == aten.addmm.default and mm.kwargs.get("beta", 1) == 1 and mm.kwargs.get("alpha", 1) == 1:
        bias = mm.args[0]
        return mm.args[1], mm.args[2], bias if _val(bias).dim() == 1 else None
    if _is(mm, aten.sum.dim_IntList, [1]) and len(mm.args) == 2 and _is(mm.args[0], aten.mul.Tensor):
        a, b = mm.args[0].args[:2]
        if _is(a, aten.unsqueeze.default, 2) and _is(b, aten.unsqueeze.default, 0) and _val(a).dim() == 3:
            x = a.args[0]
            if _is(x, prims.convert_element_type.default) and _val(x.args[0]).dtype in FLOAT_DTYPES:
                x = x.args[0]  # the decomposition's upcast: the kernel accumulates in fp32 anyway
            return x, b.args[0], None
    return None


def _unsupported(x, bias, cand) -> str | None:
    xv = _val(x)
    if xv.dtype not in FLOAT_DTYPES:
        return f"activation dtype {xv.dtype} (kernels take float16, bfloat16, float32)"
    if bias is not None and _val(bias).dtype != xv.dtype:
        return "bias dtype differs from the activation dtype"
    if cand.spec.name == "int8_weight_only" and xv.shape[1] % 4:
        return "int8 weight with in_features not a multiple of 4 (read as int32 words)"
    return match_blocked_reason(xv.device)


def _kernel_operands(graph, cand, inputs):
    """qweight, scale, zero in the kernel's layout; foreign layouts get zero-copy views."""
    if isinstance(cand.spec, FormatSpec):
        return (*inputs, None)[:3]
    w8, scale = inputs  # int8 [N, K] -> int32 words [K/4, N], scale [N] -> [1, N]
    words = _call(graph, aten.permute.default, (_call(graph, aten.view.dtype, (w8, torch.int32)), [1, 0]))
    return words, _call(graph, aten.view.default, (scale, [1, _val(scale).shape[0]])), None


def _fold_bias(op: Node, graph: Graph) -> None:
    """mm (-> view) -> add(bias): take the bias add into the kernel's epilogue."""
    out, chain = op, []
    while len(out.users) == 1:
        user = next(iter(out.users))
        if user.target in (aten.view.default, aten.reshape.default):
            chain.append(user)
            out = user
            continue
        if user.target == aten.add.Tensor and len(user.args) == 2:
            bias = user.args[1] if user.args[0] is out else user.args[0]
            bv, ov = _val(bias) if isinstance(bias, Node) else None, _val(op)
            if bv is not None and bv.dim() == 1 and bv.shape[0] == ov.shape[-1] and bv.dtype == ov.dtype:
                op.args = (*op.args[:4], bias, *op.args[5:])
                user.replace_all_uses_with(out)
                graph.erase_node(user)
        return


def rewrite_linears(graph: Graph, report: Report, inference: bool = True) -> None:
    for mm in list(graph.nodes):
        operands = mm.op == "call_function" and not mm.meta.get(EXPLAINED) and _operands(mm)
        if not operands:
            continue
        x, weight, bias = operands
        k, n = _val(weight).shape
        m = _val(x).shape[0]
        shapes = {"M": m if isinstance(m, int) else str(m), "K": int(k), "N": int(n),
                  "dtype": str(_val(x).dtype).replace("torch.", "")}
        try:
            cand, inputs = find(weight, k, n, specs_for(_val(x).dtype), activation=x)
        except Exception as e:  # noqa: BLE001  a matcher bug must cost speed, not the compile
            report.fallbacks.append(Fallback("linear", f"qcompile matcher error: {type(e).__name__}: {e}",
                                             shapes, mm.name))
            continue
        if cand is None:
            if inputs is not None:
                report.fallbacks.append(Fallback("linear", inputs, shapes, mm.name))
            continue
        reason = _unsupported(x, bias, cand) or (None if inference else
                                                 "graph needs autograd; qcompile kernels are inference-only")
        if reason:
            report.fallbacks.append(Fallback("linear", reason, shapes, mm.name))
            continue
        fmt = cand.spec.name if isinstance(cand.spec, FormatSpec) else "symmetric"
        with graph.inserting_before(mm):
            qweight, scale, zero = _kernel_operands(graph, cand, inputs)
            op = _call(graph, OP, (x, qweight, scale, zero, bias, fmt, cand.bits, cand.group_size))
            op.meta[JOINABLE] = mm.name if isinstance(cand.spec, FormatSpec) else None
            if _val(op).dtype != _val(mm).dtype:  # mul+sum anchored on upcast operands
                op = _call(graph, prims.convert_element_type.default, (op, _val(mm).dtype))
        mm.replace_all_uses_with(op)
        graph.erase_node(mm)
        reserve_tile_locks(_val(x).device, int(n))
        if bias is None:
            _fold_bias(op, graph)
        report.matched.append(Matched("linear", cand.spec.name, cand.bits, cand.group_size, shapes,
                                      f"wq_linear[{fmt},bits={cand.bits},group={cand.group_size}]", mm.name))
    graph.eliminate_dead_code()
