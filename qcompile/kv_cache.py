"""A quantized static KV cache for transformers models (issue 5).

``QuantizedStaticCache(config, max_cache_len, bits=8, group=None)`` drops in where transformers'
StaticCache goes (``generate(past_key_values=...)`` or a hand-written decode loop, compiled or
not). Each layer keeps K and V as int8 or int4 codes with a scale and a zero point per token,
head and ``group`` channels (formats/kv.py), in buffers of fixed address, as StaticCache does,
so a compiled decode step reads and writes them in place and CUDA graphs can capture it. New
tokens are quantized on the way in, in one kernel per tensor (``qcompile::kv_append``);
``update`` returns K and V dequantized in plain PyTorch, which the model's attention hands to
scaled_dot_product_attention: the eager reference that a fused kernel reading the codes
directly (codegen/kv_attention.py) is measured against.

Written against the layer API of transformers 5.x, which changed within 5.x: the write
position comes from ``cache_kwargs["cache_position"]`` when the model passes it, else from the
layer's own count of tokens (``cumulative_length``, a tensor, as StaticLayer keeps it).
"""
import torch
from transformers.cache_utils import Cache, StaticLayer

import qcompile.runtime.kv_ops  # noqa: F401  registers qcompile::kv_append
from qcompile.formats.kv import (V_BLOCK, check_kv_args, codes_buffer, default_group, dequantize_kv, v_block,
                                 v_token_major)


class QuantizedStaticLayer(StaticLayer):
    """One attention layer's cache: ``keys``/``values`` hold the uint8 codes
    [B, H, max_cache_len, D or D/2] (8-bit values token-contiguous in blocks of tokens,
    [B, H, max_cache_len / block, block, D]: formats.kv.v_token_major);
    ``key_scale``/``key_zero`` (and the value ones) hold [B, H, max_cache_len, D / group] in the
    model's dtype (``group`` None: formats.kv.default_group, once the head size is known).
    8-bit: max_cache_len is rounded up to whole blocks of V (formats.kv.V_BLOCK tokens), V's
    fastest layout for the attention kernel at any length (a length that 64 does not divide
    would get smaller blocks); the mask hides the extra tokens, and the kernel does not read
    them."""

    def __init__(self, max_cache_len: int, bits: int = 8, group: int | None = None, **kwargs):
        if v_token_major(bits):
            max_cache_len = -(-max_cache_len // V_BLOCK) * V_BLOCK
        super().__init__(max_cache_len=max_cache_len)
        self.bits, self.group = bits, group
        self.cumulative_length = torch.tensor(0, dtype=torch.long)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        value_states = key_states if value_states is None else value_states
        self.device, self.dtype = key_states.device, key_states.dtype
        self.batch_size, self.num_heads = key_states.shape[:2]
        tensors = {}
        self.group = default_group(key_states.shape[-1], self.bits) if self.group is None else self.group
        for name, states in (("key", key_states), ("value", value_states)):
            b, h, _, d = states.shape
            check_kv_args(d, self.bits, self.group)
            block = v_block(self.max_cache_len) if name == "value" and v_token_major(self.bits) else 0
            tensors[name] = codes_buffer(b, h, self.max_cache_len, d, self.bits, block, self.device)
            for part in ("scale", "zero"):
                tensors[f"{name}_{part}"] = torch.zeros(b, h, self.max_cache_len, d // self.group, dtype=states.dtype,
                                                        device=self.device)
        self.keys, self.values = tensors.pop("key"), tensors.pop("value")
        for name, tensor in tensors.items():
            setattr(self, name, tensor)
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not torch.compiler.is_compiling():  # fixed addresses: compiled steps update them in place
            for tensor in self._buffers():
                torch._dynamo.mark_static_address(tensor)
            torch._dynamo.mark_static_address(self.cumulative_length)
        self.is_initialized = True

    def _buffers(self):
        return (self.keys, self.key_scale, self.key_zero, self.values, self.value_scale, self.value_zero)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs: dict | None = None,
               *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize and store the new tokens; return the whole cache dequantized [B, H,
        max_cache_len, D] (unwritten positions are zeros, masked by the model)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        position = (cache_kwargs or {}).get("cache_position")
        if position is None:
            position = torch.arange(key_states.shape[-2], device=self.device) + self.cumulative_length
        self.cumulative_length.copy_(position[-1] + 1)
        torch.ops.qcompile.kv_append(key_states, position, self.keys, self.key_scale, self.key_zero, self.bits)
        torch.ops.qcompile.kv_append(value_states, position, self.values, self.value_scale, self.value_zero, self.bits)
        return (dequantize_kv(self.keys, self.key_scale, self.key_zero, self.bits),
                dequantize_kv(self.values, self.value_scale, self.value_zero, self.bits))

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        """The whole static length, offset 0 (the argument's name and type vary by version)."""
        return self.max_cache_len, 0

    def get_seq_length(self):
        return self.cumulative_length if self.is_initialized else 0

    def reset(self) -> None:
        if self.is_initialized:
            for tensor in self._buffers():
                tensor.zero_()
        self.cumulative_length.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: every buffer follows its beam (in place: the addresses stay fixed)."""
        if self.is_initialized:
            for tensor in self._buffers():
                tensor.copy_(tensor.index_select(0, beam_idx.to(tensor.device)))

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._buffers()) if self.is_initialized else 0


class QuantizedStaticCache(Cache):
    """A StaticCache whose layers hold int8 or int4 K/V (``bits``) with a scale and a zero point
    per ``group`` channels of each token and head (by default formats.kv.default_group: the
    whole head for int8, 32 channels for int4)."""

    def __init__(self, config, max_cache_len: int, bits: int = 8, group: int | None = None, **kwargs):
        text = config.get_text_config(decoder=True)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        group = default_group(head_dim, bits) if group is None else group
        check_kv_args(head_dim, bits, group)
        if any(t != "full_attention" for t in getattr(text, "layer_types", None) or ()):
            raise ValueError(f"QuantizedStaticCache: layer_types={text.layer_types!r}: only full attention layers "
                             "are supported (no sliding-window or linear-attention layers)")
        super().__init__(layers=[QuantizedStaticLayer(max_cache_len, bits, group)
                                 for _ in range(text.num_hidden_layers)])

    def memory_bytes(self) -> int:
        """Bytes held by codes, scales and zero points (all layers)."""
        return sum(layer.memory_bytes() for layer in self.layers)
