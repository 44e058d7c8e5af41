"""quantize(): replace a model's nn.Linear layers by quantized ones, in place."""
from fnmatch import fnmatchcase
from typing import NamedTuple

from torch import nn

from .formats import ACTIVATION_FORMATS, FORMATS, QuantLinear, W4A8Linear, check_args
from .formats.scaled import check_scaled_args
from .siblings import join_siblings

ALL_FORMATS = (*FORMATS, *ACTIVATION_FORMATS)
WEIGHT_ONLY_DEFAULTS = {"bits": 4, "group_size": 128}


class Setting(NamedTuple):
    """What quantize() applies to one layer."""
    format: str
    bits: int
    group_size: int
    weight_scale: str = "channel"  # 8-bit activation formats only: "channel" or "tensor"
    outlier_threshold: float | None = None  # w8a8 only: LLM.int8()'s split

    def make(self, linear: nn.Linear) -> nn.Module:
        if self.format == "w4a8":
            return W4A8Linear.from_linear(linear, self.group_size)
        if self.format in ACTIVATION_FORMATS:
            return ACTIVATION_FORMATS[self.format].from_linear(linear, self.weight_scale, self.outlier_threshold)
        return QuantLinear.from_linear(linear, FORMATS[self.format], self.bits, self.group_size)


def quantize(model: nn.Module, bits: int | None = None, group_size: int | None = None, format: str = "affine",
             skip=(), config: dict | None = None, weight_scale: str | None = None,
             outlier_threshold: float | None = None) -> nn.Module:
    """Quantize every nn.Linear of ``model`` in place and return ``model``.

    format: a weight-only format ("affine", "symmetric", "bipolar", "bcq"; bits 1-8, default 4;
        group_size a divisor of in_features or -1, default 128), or an activation-quantized one
        ("w8a8": int8, "fp8": float8 e4m3; weights per channel, activations per token; bits 8,
        group_size -1; "w4a8": QServe's 4-bit groups of int8 weights, int8 activations; bits 4,
        group_size default 128).
    weight_scale: for "w8a8" and "fp8", one weight scale per output channel ("channel", the
        default) or for the whole tensor ("tensor").
    outlier_threshold: for "w8a8", LLM.int8()'s mixed-precision split (6.0 in its paper): input
        features whose magnitude exceeds it in a call go through a 16-bit matmul.
    skip: names (fnmatch patterns) of layers to leave in float, e.g. ``["lm_head"]``.
    config: per-layer settings, {name pattern: {"bits", "group_size", "format", "weight_scale",
        "outlier_threshold"} or None to skip}; the first matching pattern wins, unmatched layers use the arguments.
    All settings are checked before any layer changes; bad ones raise ValueError naming the
    argument and the allowed values. Sibling weight-only layers then share buffers
    (qcompile/siblings.py), so the ones that read one input run as one kernel.
    """
    modules = dict(model.named_modules())
    for name, setting in plan(model, bits, group_size, format, skip, config, weight_scale,
                              outlier_threshold).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, setting.make(modules[name]))
    join_siblings(model)
    return model


def _settings(base: dict, override) -> dict:
    if not isinstance(override, dict) or not set(override) <= set(base):
        raise ValueError(f"config values must be None (skip) or a dict with keys among {sorted(base)}, "
                         f"got {override!r}")
    s = {**base, **override}
    if s["format"] not in ALL_FORMATS:
        raise ValueError(f"format={s['format']!r}: allowed values are {', '.join(map(repr, ALL_FORMATS))}")
    if s["format"] in ACTIVATION_FORMATS:  # fixed by the format; naming them alongside it is allowed
        named = override if "format" in override else s  # a per-layer format does not inherit bits
        fixed = {"bits": 4} if s["format"] == "w4a8" else {"bits": 8, "group_size": -1}
        for arg, value in fixed.items():
            if named.get(arg) not in (None, value):
                raise ValueError(f"{arg}={s[arg]!r} with format={s['format']!r}: the allowed value is {value}")
        s = {**s, "group_size": named.get("group_size") or 128, **fixed, "weight_scale": s["weight_scale"] or "channel"}
        check_scaled_args(s["format"], s["weight_scale"], s["outlier_threshold"])
        return s
    named = override if "format" in override else s  # a per-layer weight-only format does not inherit them
    for arg, formats in (("weight_scale", ("w8a8", "fp8")), ("outlier_threshold", ("w8a8",))):
        if named.get(arg) is not None:
            raise ValueError(f"{arg}={named[arg]!r} with format={s['format']!r}: {arg} applies to "
                             f"{', '.join(map(repr, formats))} only")
    return {**s, "weight_scale": "channel", "outlier_threshold": None,
            **{k: v for k, v in WEIGHT_ONLY_DEFAULTS.items() if s[k] is None}}


def plan(model: nn.Module, bits: int | None = None, group_size: int | None = None, format: str = "affine",
         skip=(), config: dict | None = None, weight_scale: str | None = None,
         outlier_threshold: float | None = None) -> dict:
    """{layer name: Setting} that ``quantize`` would apply, checked;
    reads only the layers' shapes and dtypes, so a model on the meta device works too."""
    if not isinstance(model, nn.Module) or isinstance(model, nn.Linear):
        raise ValueError(f"model must be an nn.Module containing nn.Linear layers (quantize replaces them "
                         f"in place), got {type(model).__name__}; wrap a single nn.Linear in a module")
    base = {"bits": bits, "group_size": group_size, "format": format, "weight_scale": weight_scale,
            "outlier_threshold": outlier_threshold}
    _settings(base, {})
    config = dict(config or {})
    modules = dict(model.named_modules())
    for pattern in [*skip, *config]:
        hits = [name for name in modules if name and fnmatchcase(name, pattern)]
        if not hits:
            raise ValueError(f"{pattern!r} in skip/config matches no module; module names look like "
                             f"{[n for n in modules if n][:5]}")
        if pattern in config and not any(isinstance(m, nn.Linear) for h in hits for m in modules[h].modules()):
            raise ValueError(f"config pattern {pattern!r} names {hits[0]!r}, a {type(modules[hits[0]]).__name__}"
                             f", and no nn.Linear: only nn.Linear layers can be quantized")

    layers = {}
    for name, module in modules.items():
        if not isinstance(module, nn.Linear) or any(fnmatchcase(name, p) for p in skip):
            continue
        override = next((config[p] for p in config if fnmatchcase(name, p)), {})
        if override is None:
            continue
        s = _settings(base, override)
        try:
            check_args(module.weight, s["bits"], s["group_size"])
        except ValueError as e:
            raise ValueError(f"layer {name!r}: {e}") from None
        layers[name] = Setting(**s)
    if not layers:
        raise ValueError(f"model has no nn.Linear layer to quantize ({type(model).__name__}, skip={list(skip)})")
    return layers
