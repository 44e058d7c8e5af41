"""Compile and autotune, before serving, the kernels a quantized model will launch, so that the
first request does not pay for them: each tuned choice goes to the autotune cache on disk
(runtime/autotune_cache.py) and each compiled kernel to Triton's own cache.

One launch per distinct layer shape (format, bits, group, K, N, bias) and batch size M covers
every layer of that shape: the tuning key is the shape and M's bucket, not the layer."""
import time

import torch
from torch import nn

from .formats import QuantLinear, ScaledLinear, W4A8Linear

DEFAULT_M = (1, 16, 128, 1024)
ACTIVATION_LAYERS = (ScaledLinear, W4A8Linear)  # layers whose compiled form is the scaled GEMM


def layer_shapes(model: nn.Module) -> dict:
    """{(format, bits, group_size, K, N, has_bias): the first quantized layer of that shape}."""
    shapes = {}
    for module in model.modules():
        if isinstance(module, (QuantLinear, *ACTIVATION_LAYERS)):
            name = module.fmt.name if isinstance(module, QuantLinear) else module.format_name
            key = (name, module.bits, module.group_size, module.in_features, module.out_features,
                   module.bias is not None)
            shapes.setdefault(key, module)
    return shapes


def _launch(layer, fmt, bits, group, mm, k, dtype):
    """One call of the op the compiled layer runs; its tuning key."""
    import qcompile.runtime.ops as ops
    device = layer.qweight.device
    if isinstance(layer, ACTIVATION_LAYERS):
        xq = torch.randn(mm, k, device=device).mul(20).clamp(-127, 127).to(layer.code_dtype)
        row = torch.rand(mm, device=device)
        if isinstance(layer, W4A8Linear):
            torch.ops.qcompile.w4a8_mm(xq, layer.qweight, layer.zero, layer.scale_int, row, layer.channel_scale,
                                       layer.bias, dtype)
            return ops.scaled_key(xq.dtype, mm, layer.out_features, k, k // layer.scale_int.shape[0])
        torch.ops.qcompile.scaled_mm(xq, layer.qweight.t(), row, layer.scale, layer.bias, dtype)
        return ops.scaled_key(xq.dtype, mm, layer.out_features, k)
    x = torch.randn(mm, k, dtype=dtype, device=device)
    torch.ops.qcompile.wq_linear(x, layer.qweight, layer.scale, layer.zero, layer.bias, fmt, bits, group)
    return ops.tuning_key(fmt, bits, k if group == -1 else group, mm, layer.out_features, k, x.dtype)


def warmup(model: nn.Module, m=DEFAULT_M, dtype: torch.dtype | None = None, progress: bool = True) -> list:
    """Launch every distinct quantized layer of ``model`` once per batch size in ``m`` (rows of
    the activation: batch x sequence). ``dtype``: the activations' (default: the weight-only
    layer's scale dtype; for 8-bit activation formats, the model's first float parameter's).
    Returns one row per launch: shape, M, kernel, chosen config and seconds spent."""
    from tqdm import tqdm

    import qcompile.runtime.ops as ops

    shapes = layer_shapes(model)
    model_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if not shapes:
        raise ValueError("model has no quantized layer: call qcompile.quantize(model, ...) first")
    if any(not isinstance(x, int) or x < 1 for x in m):
        raise ValueError(f"m={m!r}: batch sizes must be positive integers")
    rows = []
    work = [(key, layer, mm) for key, layer in shapes.items() for mm in m]
    with torch.no_grad(), tqdm(work, desc="qcompile warmup", unit="kernel", disable=not progress) as bar:
        for (fmt, bits, group, k, n, _), layer, mm in bar:
            bar.set_postfix_str(f"{fmt} w{bits} g{group} {n}x{k} M={mm}")
            start = time.perf_counter()
            key = _launch(layer, fmt, bits, group, mm, k,
                          dtype or (model_dtype if isinstance(layer, ACTIVATION_LAYERS) else layer.scale.dtype))
            if layer.qweight.is_cuda:
                torch.cuda.synchronize()
            choice = ops.chosen.get(key)
            rows.append({"format": fmt, "bits": bits, "group_size": group, "K": k, "N": n, "M": mm,
                         "kernel": choice.kernel, "config": str(choice),
                         "seconds": round(time.perf_counter() - start, 3)})
    return rows


def warmup_config(config_path: str, quant: dict, m, dtype_name: str = "fp16") -> list:
    """``qcompile warmup --model CONFIG.json``: the layer shapes of the config's model as
    ``quantize(**quant)`` would make them (read on the meta device: no weights are built), one
    random layer per shape, warmed up; prints the launches and the cache folder."""
    from qcompile.runtime.autotune import TUNER

    from .hfmodel import DTYPES, build, load_config
    from .quantize import plan

    dtype = DTYPES[dtype_name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    meta = build(load_config(config_path), "meta", dtype)
    modules = dict(meta.named_modules())
    layers, seen = nn.ModuleList(), set()
    for name, setting in plan(meta, **quant).items():
        lin = modules[name]
        key = (*setting, lin.in_features, lin.out_features, lin.bias is not None)
        if key not in seen:
            seen.add(key)
            dense = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, device=device, dtype=dtype)
            layers.append(setting.make(dense))
    rows = warmup(layers, m, dtype)
    width = max(len(r["config"]) for r in rows)
    print(f"{'layer':<28} {'M':>6}  {'kernel and config':<{width}}  seconds")
    for r in rows:
        layer = f"{r['format']} w{r['bits']} g{r['group_size']} {r['N']}x{r['K']}"
        print(f"{layer:<28} {r['M']:>6}  {r['config']:<{width}}  {r['seconds']:.2f}")
    s = TUNER.stats
    print(f"qcompile warmup: {len(layers)} layer shapes x {len(m)} batch sizes; {s['tuned']} tuned, "
          f"{s['disk']} read from the cache, {s['untuned']} with one candidate; cache at {TUNER.disk().folder}")
    return rows
