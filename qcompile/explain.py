"""explain(): compile a model or function with qcompile, run it once, say what matched."""
import torch

from .backend import listen, qcompile_backend
from .report import Report


def explain(model_or_fn, *args, **kwargs) -> Report:
    """Report of what qcompile did to ``model_or_fn(*args, **kwargs)``: ``.matched``,
    ``.fallbacks`` (each with ``.reason``), graph count and graph breaks. Caches are bypassed
    so the passes really run; the model itself is not modified."""
    from torch._dynamo.utils import counters

    report = Report()
    breaks_before = sum(counters["graph_break"].values())
    compiled = torch.compile(model_or_fn, backend=_Fresh())
    limit = torch._dynamo.config.recompile_limit + 8  # explain's own compiles must not hit the limit
    with listen(report), torch._dynamo.config.patch(recompile_limit=limit):
        compiled(*args, **kwargs)
    report.graph_breaks = sum(counters["graph_break"].values()) - breaks_before
    return report


class _Fresh:
    """A backend object of its own, so Dynamo compiles anew instead of reusing the code it
    compiled for the user's torch.compile of the same model."""

    def __call__(self, gm, example_inputs, **kwargs):
        return qcompile_backend(gm, example_inputs, **kwargs)
