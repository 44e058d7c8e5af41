"""Regional compilation: each block of a model's repeated stack compiled on its own.

A 32-layer decoder traced whole is 32 copies of one layer for Dynamo, AOT autograd and every
graph pass, and qcompile's rewrite of 224 quantized linears (Llama-3-8B, W4) adds about 13 s
to that (bench/results/*-compile-time.json). Compiled block by block, the layers share one
trace: the same model reached its first token in 11.9 s warm against 40.1 s for plain
torch.compile of the fp16 model (*-compile-time-regional.json). The price: the code between
blocks (embedding, final norm, lm_head) runs eagerly, and mode="reduce-overhead" captures one
CUDA graph per block instead of one per step.
"""
import torch


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks of every nn.ModuleList whose entries are all of one class (at least two),
    outermost first; lists inside a block stay part of it."""
    blocks, inside = [], set()
    for module in model.modules():  # pre-order: a list is seen before what it holds
        if id(module) not in inside and isinstance(module, torch.nn.ModuleList) and len(module) > 1 \
                and len({type(m) for m in module}) == 1:
            blocks.extend(module)
            inside.update(id(m) for block in module for m in block.modules())
    return blocks


def compile_regions(model: torch.nn.Module, backend: str = "qcompile", **compile_kwargs) -> torch.nn.Module:
    """Compile each repeated block of ``model`` in place (``block.compile(backend=...)``) and
    return the model. Raises ValueError when the model has no repeated blocks."""
    blocks = repeated_blocks(model)
    if not blocks:
        raise ValueError(f"compile_regions: {type(model).__name__} has no nn.ModuleList of two or more blocks "
                         "of one class; compile it whole: torch.compile(model, backend='qcompile')")
    for block in blocks:
        block.compile(backend=backend, **compile_kwargs)
    return model
