"""The ``qcompile`` torch.compile backend: Inductor with qcompile's passes in front."""
import contextlib

import torch

from qcompile.report import Report

_listeners: list[Report] = []


@contextlib.contextmanager
def listen(report: Report):
    """Within the block, every graph the backend compiles adds its report to ``report``. Inductor's
    and AOTAutograd's caches are bypassed there: a graph served from them runs no pass, so it
    would report nothing."""
    _listeners.append(report)
    try:
        with torch._inductor.config.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            yield report
    finally:
        _listeners.remove(report)


def _record(report: Report) -> None:
    for r in _listeners:
        r.extend(report)


def qcompile_backend(gm: torch.fx.GraphModule, example_inputs, mode: str | None = None,
                     options: dict | None = None):
    """``torch.compile(model, backend="qcompile", mode=..., options=...)`` lands here."""
    import qcompile.runtime.ops  # noqa: F401  registers the qcompile:: ops
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    from qcompile.passes import QCompilePass

    inference = not (torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs))
    patches = {**(list_mode_options(mode) if mode else {}), **(options or {}),
               "post_grad_custom_pre_pass": QCompilePass(_record, inference),
               # pad_mm runs before our pass and pads odd weights into shapes no format matches
               "shape_padding": False}
    return compile_fx(gm, example_inputs, config_patches=patches)
