"""Attention over a quantized KV cache: SDPA whose K and V are ``dequantize_kv`` of int8/int4
codes (qcompile/kv_cache.py, formats/kv.py), possibly repeated for grouped-query attention,
becomes ``qcompile::kv_attention``, which reads the codes instead of the float K and V.

The SDPA node is found in whichever form Inductor's post-grad graph holds it (the CPU flash,
CUDA flash, memory-efficient and cuDNN ops, or the undecomposed op). The dequantization is
matched against ``dequantize_kv`` traced for the shapes (specs.KVSpec), from the cache's
buffers or from the writes into them, so a cache written earlier in the same graph matches.
"""
import operator

import torch
from torch.fx import Graph, Node

from qcompile.runtime import kv_ops  # registers qcompile::kv_attention and kv_append
from qcompile.report import Fallback, Matched, Report
from qcompile.runtime.device import match_blocked_reason

from .specs import find_kv
from .subgraph import _VIEWS, backward_slice, canonical, leaves
from .wonly_linear import _call, _val

aten = torch.ops.aten
OP = torch.ops.qcompile.kv_attention.default
SDPA = (aten._scaled_dot_product_flash_attention_for_cpu.default, aten._scaled_dot_product_efficient_attention.default,
        aten._scaled_dot_product_flash_attention.default, aten._scaled_dot_product_cudnn_attention.default,
        aten.scaled_dot_product_attention.default)
APPEND = torch.ops.qcompile.kv_append.default
FUNCTIONALIZED = {torch.ops.higher_order.auto_functionalized, torch.ops.higher_order.auto_functionalized_v2}
WRITES = {aten.index_put.default, aten.index_copy.default, aten.copy.default, aten.slice_scatter.default}


def _bind(node: Node) -> dict:
    """The op's arguments by schema name, defaults filled in."""
    out = {}
    for i, arg in enumerate(node.target._schema.arguments):
        if i < len(node.args) and not arg.kwarg_only:
            out[arg.name] = node.args[i]
        else:
            out[arg.name] = node.kwargs.get(arg.name, arg.default_value if arg.has_default_value() else None)
    return out


def _unrepeat(node: Node) -> Node:
    """transformers' repeat_kv, x[:, :, None].expand(B, H, rep, T, D).reshape(B, H * rep, T, D),
    undone: the kernel reads each KV head once for its query heads."""
    node = canonical(node)
    if node.op == "call_function" and node.target in _VIEWS:
        src = canonical(node.args[0])
        if src.op == "call_function" and src.target == aten.clone.default:
            src = canonical(src.args[0])
        if src.op == "call_function" and src.target == aten.expand.default:
            inner = canonical(src.args[0])
            if inner.op == "call_function" and inner.target == aten.unsqueeze.default and inner.args[1] == 2:
                return canonical(inner.args[0])
    return node


def _unslice(node: Node) -> Node:
    """The cache's first L tokens, K[:, :, :L] (a prefill that sees only the prompt), taken
    whole: the kernel reads the first ``length`` tokens anyway."""
    node = canonical(node)
    if node.op == "call_function" and node.target == aten.slice.Tensor:
        a = _bind(node)
        if a["dim"] == 2 and a["start"] in (0, None) and a["step"] == 1:
            return canonical(a["self"])
    return node


def _is_cache_write(node: Node) -> bool:
    """Where the dequantization's slice stops: the cache buffers as this graph writes them, by
    ATen writes or as the functionalized ``qcompile::kv_append`` returns them."""
    if node.target is operator.getitem and isinstance(node.args[0], Node):
        write = node.args[0]
        return write.target in FUNCTIONALIZED and write.args[0] == APPEND
    return node.target in WRITES


def _is_token_blocks_copy(node: Node) -> bool:
    """A contiguous copy of 8-bit V's codes in blocks of tokens ([B, H, T / block, block, C],
    formats.kv.as_token_blocks' token-major view), which the graph makes to flatten them when
    the cache holds several blocks: the dequantization's slice stops there, and the op takes
    the view copied instead (the copy, a whole cache's bytes a step, is then dead)."""
    if node.target != aten.clone.default:
        return False
    codes = _val(node.args[0])
    return codes.dim() == 5 and codes.dtype == torch.uint8


def _stop(node: Node) -> bool:
    return _is_cache_write(node) or _is_token_blocks_copy(node)


def _codes(inputs: list) -> list:
    """find_kv's (codes, scale, zero) with a copy of V's token blocks replaced by the view copied."""
    codes = inputs[0]
    return [codes.args[0] if _is_token_blocks_copy(codes) else codes, *inputs[1:]]


def _unmatched_codes(node: Node) -> str | None:
    """For a K or V [B, H, T, D] that find_kv did not match: that it comes from uint8 codes of a
    cache's shape ([B, H, ...] in 4 or 5 dims, not a quantized linear's weight), when it does:
    a quantized cache in a form the pass does not know, said in explain() rather than passed
    over in silence. Else None."""
    nodes = backward_slice(node, _stop)
    heads = tuple(_val(node).shape[:2])
    codes = [n for n in leaves(nodes, _stop) if isinstance(c := _val(n), torch.Tensor)  # not a size (dynamic)
             and c.dtype == torch.uint8 and c.dim() in (4, 5) and tuple(c.shape[:2]) == heads] if nodes else []
    return (f"computed from uint8 codes {tuple(_val(codes[0]).shape)}, not as formats.kv.dequantize_kv"
            if codes else None)


def _unsupported(a: dict, q, k_node, mask, s: int, t: int) -> str | None:
    if a.get("dropout_p") or a.get("enable_gqa"):
        return "dropout or enable_gqa"
    if a.get("is_causal") and (mask is not None or s != t):
        return "is_causal with a mask or with fewer queries than keys (top-left causal)"
    if _val(k_node).dtype != q.dtype:
        return f"K/V dequantized to {_val(k_node).dtype}, queries in {q.dtype}"
    return match_blocked_reason(q.device)


def rewrite_kv_attention(graph: Graph, report: Report, inference: bool = True) -> None:
    for sdpa in list(graph.nodes):
        if sdpa.op != "call_function" or sdpa.target not in SDPA:
            continue
        a = _bind(sdpa)
        q_node, k_full, v_full = a["query"], a["key"], a["value"]
        q = _val(q_node)
        b, hq, s, d = q.shape
        t = _val(k_full).shape[2]
        k_src, v_src = _unslice(_unrepeat(k_full)), _unslice(_unrepeat(v_full))
        found = [find_kv(x, d, _stop) for x in (k_src, v_src)]
        shapes = {"B": b, "Hq": hq, "S": s, "T": t, "D": d, "dtype": str(q.dtype).replace("torch.", "")}
        if None in found:  # said only of K or V made from codes; anything else is not a quantized cache
            why = [f"{name} {w}" for name, x, f in zip("KV", (k_src, v_src), found)
                   if f is None and (w := _unmatched_codes(x))]
            if why:
                report.fallbacks.append(Fallback("kv_attention", "; ".join(why), shapes, sdpa.name))
            continue
        (k_bits, k_in), (v_bits, v_in) = ((bits, _codes(inputs)) for bits, inputs in found)
        mask = a.get("attn_mask", a.get("attn_bias"))
        uses = list(sdpa.users) if sdpa.target != aten.scaled_dot_product_attention.default else []
        reason = (_unsupported(a, q, k_src, mask, s, t)
                  or (k_bits != v_bits and "K and V of different widths")
                  or kv_ops.shape_unsupported_reason(d, _val(k_in[1]).shape[-1], _val(v_in[1]).shape[-1])
                  or (any(u.target is not operator.getitem or u.args[1] != 0 for u in uses)
                      and "the attention's log-sum-exp is used (training)")
                  or (not inference and "graph needs autograd; qcompile kernels are inference-only"))
        if mask is not None and not reason:
            try:
                torch.broadcast_shapes(_val(mask).shape, (b, hq, s, t))
            except RuntimeError:
                reason = f"mask of shape {tuple(_val(mask).shape)} does not broadcast to {(b, hq, s, t)}"
        if reason:
            report.fallbacks.append(Fallback("kv_attention", reason, shapes, sdpa.name))
            continue
        group = d // _val(k_in[1]).shape[-1]
        with graph.inserting_before(sdpa):
            op = _call(graph, OP, (q_node, *k_in, *v_in, t, k_bits, mask, a.get("scale")))
        for user in uses or [sdpa]:
            user.replace_all_uses_with(op)
        for user in uses:
            graph.erase_node(user)
        graph.erase_node(sdpa)
        report.matched.append(Matched("kv_attention", "kv", k_bits, group, shapes,
                                      f"kv_attention[bits={k_bits},group={group}]", sdpa.name))
    graph.eliminate_dead_code()
