"""Weight formats. Each one's ``dequantize`` is the specification of what it computes."""
from .affine import Affine
from .base import FLOAT_DTYPES, Packed, WeightFormat, check_args
from .bcq import BCQ
from .bipolar import Bipolar
from .linear import QuantLinear
from .symmetric import Symmetric
from .scaled import FP8Linear, ScaledLinear, W8A8Linear
from .w4a8 import W4A8Linear

FORMATS: dict[str, WeightFormat] = {f.name: f for f in (Affine(), Symmetric(), Bipolar(), BCQ())}
# formats that also quantize the activations: the module whose forward is the specification
ACTIVATION_FORMATS = {cls.format_name: cls for cls in (W8A8Linear, FP8Linear, W4A8Linear)}


def get_format(name) -> WeightFormat:
    """The weight-only format called ``name``."""
    if name not in FORMATS:
        raise ValueError(f"format={name!r}: allowed values are {', '.join(map(repr, FORMATS))}")
    return FORMATS[name]


__all__ = ["ACTIVATION_FORMATS", "FORMATS", "FLOAT_DTYPES", "FP8Linear", "Packed", "QuantLinear", "ScaledLinear",
           "W4A8Linear", "W8A8Linear", "WeightFormat", "check_args", "get_format"]
