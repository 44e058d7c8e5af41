"""qcompile: a torch.compile backend that runs low-bit quantized models in fused Triton kernels.

    qcompile.quantize(model, bits=4, group_size=128, format="affine")
    compiled = torch.compile(model, backend="qcompile")
    qcompile.compile_regions(model)          # or: each decoder layer on its own (fast compile)
    print(qcompile.explain(model, inputs))
    qcompile.warmup(model, m=[1, 16, 128])   # tune the kernels ahead of serving (disk cache)
"""
from .backend import qcompile_backend
from .explain import explain
from .formats import FORMATS, QuantLinear
from .quantize import quantize
from .regional import compile_regions
from .report import Report
from .siblings import join_siblings
from .warmup import warmup

__all__ = ["FORMATS", "QuantLinear", "Report", "compile_regions", "explain", "join_siblings", "qcompile_backend", "quantize", "warmup"]
