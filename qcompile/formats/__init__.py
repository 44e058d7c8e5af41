"""Weight formats. Each one's ``dequantize`` is the specification of what it computes."""
from .affine import Affine
from .base import FLOAT_DTYPES, Packed, WeightFormat, check_args
from .bcq import BCQ
from .bipolar import Bipolar
from .linear import QuantLinear
from .symmetric import Symmetric
from .w8a8 import W8A8Linear

FORMATS: dict[str, WeightFormat] = {f.name: f for f in (Affine(), Symmetric(), Bipolar(), BCQ())}
# formats that also quantize the activations: the module whose forward is the specification
ACTIVATION_FORMATS = {"w8a8": W8A8Linear}


def get_format(name) -> WeightFormat:
    """The weight-only format called ``name``."""
    if name not in FORMATS:
        raise ValueError(f"format={name!r}: allowed values are {', '.join(map(repr, FORMATS))}")
    return FORMATS[name]


__all__ = ["ACTIVATION_FORMATS", "FORMATS", "FLOAT_DTYPES", "Packed", "QuantLinear", "W8A8Linear", "WeightFormat",
           "check_args", "get_format"]
