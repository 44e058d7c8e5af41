"""Weight formats. Each one's ``dequantize`` is the specification of what it computes."""
from .affine import Affine
from .base import FLOAT_DTYPES, Packed, WeightFormat, check_args
from .bcq import BCQ
from .bipolar import Bipolar
from .linear import QuantLinear
from .symmetric import Symmetric

FORMATS: dict[str, WeightFormat] = {f.name: f for f in (Affine(), Symmetric(), Bipolar(), BCQ())}


def get_format(name) -> WeightFormat:
    if name not in FORMATS:
        raise ValueError(f"format={name!r}: allowed values are {', '.join(map(repr, FORMATS))}")
    return FORMATS[name]


__all__ = ["FORMATS", "FLOAT_DTYPES", "Packed", "QuantLinear", "WeightFormat", "check_args", "get_format"]
