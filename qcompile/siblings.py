"""Sibling linears share storage: the QuantLinears that are children of one module with the same
input width and format (q, k, v and o of an attention; gate and up of an MLP) keep their
qweight, scale and zero as column blocks of one buffer each.

Why: the linears that read the same activation (q, k, v; gate, up) then run as one kernel over
the joined columns (passes/sibling_linears.py, ``qcompile::wq_linear_siblings``): one launch
instead of three, and the small k and v projections no longer run on their own. Siblings that
do not share an input (o) are harmless in the buffer. Memory is unchanged.
"""
from collections import defaultdict

import torch
from torch import nn

from .formats import QuantLinear

TENSORS = ("qweight", "scale", "zero")


def _key(q: QuantLinear) -> tuple:
    """What siblings must share to live in one buffer per tensor: the layout of everything but
    the output columns."""
    shapes = tuple(None if t is None else (t.shape[:-1], t.dtype, t.device) for t in (getattr(q, n) for n in TENSORS))
    return q.fmt.name, q.bits, q.group_size, q.in_features, shapes


def join_siblings(model: nn.Module) -> int:
    """Store each group of sibling QuantLinears' tensors as column views of one buffer; returns
    how many groups were joined. quantize() calls it; call it again after anything that copies
    the buffers one by one (``model.to(device)``), or the joined kernels fall back to one launch
    per linear."""
    joined = 0
    for parent in model.modules():
        groups = defaultdict(list)
        for child in parent.children():
            if type(child) is QuantLinear:
                groups[_key(child)].append(child)
        for group in groups.values():
            if len(group) < 2:
                continue
            for name in TENSORS:
                if getattr(group[0], name) is None:
                    continue
                tensors = [getattr(q, name) for q in group]
                views = torch.cat(tensors, dim=-1).split([t.shape[-1] for t in tensors], dim=-1)
                for q, view in zip(group, views):
                    setattr(q, name, view)
            joined += 1
    return joined
