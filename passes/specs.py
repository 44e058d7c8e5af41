"""What the pass looks for: one spec per format, traced from the format's own reference code
(so spec and pattern cannot drift), plus dequantizations written outside qcompile.

A spec proposes candidate parameters from the shapes of a subgraph's inputs, traces its
reference for them (cached), and says how the matched inputs map onto the kernel's operands.
"""
import functools
import itertools
from dataclasses import dataclass

import torch
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import tracing
from torch._inductor.decomposition import select_decomp_table
from torch.fx.experimental.proxy_tensor import make_fx

from qcompile.formats import FLOAT_DTYPES, FORMATS
from qcompile.formats.kv import dequantize_kv
from qcompile.formats.packing import codes_per_word
from qcompile.formats.w4a8 import int8_weight

from .subgraph import backward_slice, difference, leaves, match, to_digraph


@dataclass(frozen=True)
class Candidate:
    spec: "Spec"
    bits: int
    group_size: int
    metas: tuple  # (shape, dtype) of each reference input, in its argument order


@functools.lru_cache(maxsize=512)
def traced(spec: "Spec", bits: int, k: int, metas: tuple, device: str):
    """The spec's reference for these parameters as (digraph, its inputs in argument order)."""
    args = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in metas]
    with tracing(None), enable_python_dispatcher():  # outside the model's compile and its shape env
        gm = make_fx(spec.reference(bits, k), select_decomp_table(), tracing_mode="fake")(*args)
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    nodes = backward_slice(out)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return to_digraph(nodes), placeholders


def _meta(node):
    v = node.meta["val"]
    return tuple(v.shape), v.dtype


def _input_metas(ins):
    """(shape, dtype) of a slice's integer inputs and of its float inputs; None when one input
    is a size or a scalar (the subgraph is then no stored tensor's dequantization)."""
    if not all(isinstance(x.meta.get("val"), torch.Tensor) for x in ins):
        return None
    return ([_meta(x) for x in ins if not x.meta["val"].is_floating_point()],
            [_meta(x) for x in ins if x.meta["val"].dtype in FLOAT_DTYPES])


def _matched_inputs(graph, spec: "Spec", cand: Candidate, k: int, device: str):
    """The found graph's inputs in the order of the spec's reference arguments, when ``graph``
    is the reference traced for ``cand``; else (None, the traced graph) for the reason."""
    spec_graph, placeholders = traced(spec, cand.bits, k, cand.metas, device)
    mapping = match(graph, spec_graph)
    if mapping is None:
        return None, spec_graph
    inverse = {v: key for key, v in mapping.items()}
    return [inverse[p] for p in placeholders], spec_graph


class Spec:
    name: str

    def reference(self, bits: int, k: int):
        raise NotImplementedError

    def candidates(self, ints, floats, k: int, n: int):
        raise NotImplementedError


@dataclass(frozen=True, eq=True)
class FormatSpec(Spec):
    """A qcompile format: its inputs are (qweight, scale[, zero]) in the format's layout."""
    name: str

    @property
    def fmt(self):
        return FORMATS[self.name]

    def reference(self, bits, k):
        return self.fmt.dequant_fn(bits, k)

    def _bits(self, qshape, k, n):
        if self.fmt.layout == "planes":
            ok = len(qshape) == 3 and qshape[1:] == (-(-k // 32), n)
            return [qshape[0]] if ok and 1 <= qshape[0] <= 8 else []
        if len(qshape) != 2 or qshape[1] != n:
            return []
        return [b for b in range(1, 9) if -(-k // codes_per_word(b)) == qshape[0]]

    def candidates(self, ints, floats, k, n):
        n_floats = 2 if self.name == "affine" else 1
        if len(ints) != 1 or len(floats) != n_floats or ints[0][1] != torch.int32:
            return
        qshape = ints[0][0]
        for bits in self._bits(qshape, k, n):
            for order in itertools.permutations(floats):
                sshape = order[0][0]
                g = sshape[-2] if len(sshape) >= 2 else 0
                want = (bits, g, n) if self.name == "bcq" else (g, n)
                if g and sshape == want and k % g == 0 and all(f[0] == sshape for f in order):
                    yield Candidate(self, bits, k // g if g > 1 else -1, (ints[0], *order))


@dataclass(frozen=True, eq=True)
class Int8LinearSpec(Spec):
    """``F.linear(x, w_int8.to(x.dtype) * scale[:, None])``: per-channel int8 weight-only, as
    written by hand or by gpt-fast. Runs as symmetric 8-bit: the int8 [N, K] weight read as
    int32 words is exactly that format's fields layout, transposed."""
    name: str = "int8_weight_only"
    act_dtype: torch.dtype = torch.float16

    def reference(self, bits, k):
        def fn(w, scale):
            return (w.to(self.act_dtype) * scale[:, None]).permute(1, 0)
        return fn

    def candidates(self, ints, floats, k, n):
        if len(ints) == 1 and len(floats) == 1 and ints[0] == ((n, k), torch.int8) and floats[0][0] == (n,):
            yield Candidate(self, 8, -1, (ints[0], floats[0]))


@dataclass(frozen=True, eq=True)
class W4A8Spec(Spec):
    """w4a8's int8 weight [K, N] rebuilt from its 4-bit codes (qcompile/formats/w4a8.py), from
    qweight int32 [K/8, N] and the uint8 zero and scale_int [K/group, N]."""
    name: str = "w4a8"

    def reference(self, bits, k):
        return lambda qweight, zero, scale_int: int8_weight(qweight, zero, scale_int, k)

    def candidates(self, ints, floats, k, n):
        small = [x for x in ints if x[1] == torch.uint8]
        packed = ((-(-k // 8), n), torch.int32)
        if floats or len(ints) != 3 or [x for x in ints if x[1] == torch.int32] != [packed]:
            return
        if len(small) == 2 and small[0] == small[1] and small[0][0][1:] == (n,) and k % small[0][0][0] == 0:
            yield Candidate(self, 4, k // small[0][0][0], (packed, *small))


@dataclass(frozen=True, eq=True)
class KVSpec(Spec):
    """A quantized KV cache tensor [B, H, T, D] rebuilt by formats/kv.py's ``dequantize_kv``
    from uint8 codes [B, H, T, D or D/2] (or in blocks of tokens, [B, H, T / block, block, C])
    and a scale and a zero point [B, H, T, D/group]."""
    name: str = "kv"

    def reference(self, bits, k):
        return lambda codes, scale, zero: dequantize_kv(codes, scale, zero, bits)

    def candidates(self, ints, floats, k, n):
        """k: head_dim."""
        if len(ints) != 1 or ints[0][1] != torch.uint8 or len(floats) != 2 or floats[0] != floats[1]:
            return
        (cshape, _), (sshape, _) = ints[0], floats[0]
        if len(cshape) == 5:  # in blocks of tokens, [B, H, T / block, block, C]
            cshape = (*cshape[:2], cshape[2] * cshape[3], cshape[4])
        if len(cshape) == 4 and tuple(cshape[:3]) == tuple(sshape[:3]) and k % sshape[3] == 0:
            for bits in (b for b, width in ((8, k), (4, k // 2)) if cshape[3] == width):
                yield Candidate(self, bits, k // sshape[3], (ints[0], floats[0], floats[1]))


def find_kv(node, head_dim: int, stop):
    """(bits, [codes, scale, zero] nodes) when ``node`` dequantizes a KV cache tensor from
    tensors that ``stop`` accepts as inputs (graph inputs or the cache writes), else None."""
    nodes = backward_slice(node, stop)
    if nodes is None:
        return None
    ins = leaves(nodes, stop)
    metas = _input_metas(ins)
    if metas is None:
        return None
    spec = KVSpec()
    for cand in spec.candidates(*metas, head_dim, 0):  # the isomorphism tells scale from zero
        inputs, _ = _matched_inputs(to_digraph(nodes, stop), spec, cand, head_dim, ins[0].meta["val"].device.type)
        if inputs is not None:
            return cand.bits, inputs
    return None


def find_w4a8(int8_node, k: int, n: int):
    """(group_size, [qweight, zero, scale_int] nodes) when ``int8_node`` computes a w4a8 int8
    weight [K, N] from graph inputs, else None."""
    cand, inputs = find(int8_node, k, n, [W4A8Spec()])
    return (cand.group_size, inputs) if cand else None


def _shares_ancestors(activation, nodes) -> bool:
    """Whether ``activation`` depends on one of ``nodes``; walked only for a weight that matched
    nothing, so its cost (the graph's size) is paid once per unmatched matmul."""
    nodes, seen, stack = set(nodes), set(), [activation]
    while stack:
        node = stack.pop()
        if node in nodes:
            return True
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return False


def specs_for(act_dtype: torch.dtype):
    return [*(FormatSpec(name) for name in FORMATS), Int8LinearSpec(act_dtype=act_dtype)]


def find(weight, k: int, n: int, specs, activation=None):
    """(candidate, inputs in reference order) for the subgraph computing ``weight``, a [K, N]
    matmul operand, among ``specs``; (None, why) when it has integer inputs but matches none of
    them; (None, None) when it is not a quantized weight at all, as when it depends on the
    matmul's ``activation`` (LLM.int8()'s outlier rows, gathered by an index computed from x)."""
    roots = [weight]
    if weight.op == "call_function" and weight.target == torch.ops.prims.convert_element_type.default:
        roots.append(weight.args[0])  # the reference's trailing .to(x.dtype)
    symbolic, nearest, unmatched = False, "", set()
    for root in roots:
        nodes = backward_slice(root)
        if nodes is None:
            continue
        ins = leaves(nodes)
        metas = _input_metas(ins)
        if metas is None:
            continue  # depends on a size or scalar input: not a stored weight
        ints, floats = metas
        if not ints:
            continue
        unmatched.update(nodes)
        if any(not isinstance(d, int) for x in ins for d in x.meta["val"].shape):
            symbolic = True
            break
        graph = None
        for spec in specs:
            for cand in spec.candidates(ints, floats, k, n):
                graph = graph if graph is not None else to_digraph(nodes)
                inputs, spec_graph = _matched_inputs(graph, spec, cand, k, ins[0].meta["val"].device.type)
                if inputs is not None:
                    return cand, inputs
                nearest = nearest or f" (nearest, {spec.name} bits={cand.bits}: {difference(graph, spec_graph)})"
    if not unmatched or (activation is not None and _shares_ancestors(activation, unmatched)):
        return None, None
    if symbolic:
        return None, ("the weight's shapes are dynamic (symbolic), so bits and group size cannot be "
                      "read from them; compile with dynamic=False or mark the weights static")
    return None, f"a subgraph with integer inputs feeds this matmul, but it matches no qcompile format{nearest}"
