"""What every weight format provides, and the arguments they all validate."""
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class Packed:
    """A quantized weight: the tensors the kernel reads, in the format's own layout."""
    qweight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None


class WeightFormat:
    """A weight-only format: quantize a float [N, K] weight, pack it, and dequantize it back.

    ``dequantize`` is the specification: the compiler pass matches the graph it traces to,
    and the kernels are tested against it.
    """
    name: str
    layout: str  # "fields" or "planes" (see packing.py)

    def quantize(self, weight: torch.Tensor, bits: int, group_size: int) -> Packed:
        raise NotImplementedError

    def dequantize(self, packed: Packed, bits: int, k: int) -> torch.Tensor:
        """Return the [K, N] weight (transposed: the matmul's second operand) in scale dtype."""
        raise NotImplementedError

    def tensors(self, packed: Packed) -> tuple:
        """The tensors the reference forward reads, in the order ``dequant_fn`` takes them."""
        return (packed.qweight, packed.scale) + ((packed.zero,) if packed.zero is not None else ())

    def dequant_fn(self, bits: int, k: int):
        """``dequantize`` as a function of tensors only: what the pass traces to a pattern."""
        def fn(*tensors):
            return self.dequantize(Packed(*tensors), bits, k)
        return fn


def groups_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[K, N] -> [G, group, N]; group_size -1 means one group over all of K."""
    k, n = w.shape
    g = 1 if group_size == -1 else k // group_size
    return w.reshape(g, k // g, n)


def check_args(weight: torch.Tensor, bits, group_size) -> None:
    """ValueError naming the argument and its allowed values; shared by all formats."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r}: allowed values are the integers 1 to 8")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"weight dtype {weight.dtype}: allowed dtypes are float16, bfloat16, float32")
    k = weight.shape[1]
    if not isinstance(group_size, int) or not (group_size == -1 or (group_size > 0 and k % group_size == 0)):
        raise ValueError(
            f"group_size={group_size!r} does not divide in_features={k}: allowed values are -1 "
            f"(per output channel) or a divisor of {k}")
