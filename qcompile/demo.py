"""python -m qcompile.demo: quantize a Llama, compile it with qcompile, show what matched and
the logits next to eager; on a GPU also the decode-step speed against fp16."""
import copy
import os
import sys

import torch


def _llama(gpu: bool):
    import transformers
    if gpu:  # big enough that the linears dominate a decode step
        cfg = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
                   num_attention_heads=32, num_key_value_heads=8)
    else:     # small enough for the Triton interpreter
        cfg = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg, max_position_embeddings=256))


def main():
    gpu = torch.cuda.is_available()
    if not gpu:
        assert "triton" not in sys.modules, "TRITON_INTERPRET must be set before triton is imported"
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import qcompile

    device, dtype = ("cuda", torch.float16) if gpu else ("cpu", torch.float32)
    fp = _llama(gpu).to(device=device, dtype=dtype).eval()
    model = qcompile.quantize(copy.deepcopy(fp), bits=4, group_size=128 if gpu else 32, format="affine")
    ids = torch.randint(0, fp.config.vocab_size, (1, 8), device=device)
    with torch.no_grad():
        print(qcompile.explain(model, ids, use_cache=False))
        compiled = torch.compile(model, backend="qcompile")
        out, ref = compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits
        print(f"\nlogits[0, -1, :6]  eager    {ref[0, -1, :6].float().tolist()}")
        print(f"                   compiled {out[0, -1, :6].float().tolist()}")
        err = ((out - ref).abs().max() / ref.abs().max()).item()
        same = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
        print(f"max |compiled - eager| / max |eager| = {err:.2e}; same next token at {same:.0%} of positions")
        if gpu:
            _speed(fp, compiled, ids[:, :1])


def _speed(fp, compiled, token):
    """One-token forward (decode-like, M=1), CUDA-graph timed: fp16 Inductor vs qcompile W4."""
    from triton.testing import do_bench_cudagraph

    fp16 = torch.compile(fp, mode="max-autotune-no-cudagraphs")
    times = {}
    for name, fn in (("fp16 (Inductor)", fp16), ("W4 g128 (qcompile)", compiled)):
        fn(token, use_cache=False)
        times[name] = do_bench_cudagraph(lambda: fn(token, use_cache=False))
        print(f"{name:20s} {times[name] * 1e3:8.1f} us per 1-token forward")
    print(f"speed-up {times['fp16 (Inductor)'] / times['W4 g128 (qcompile)']:.2f}x")


if __name__ == "__main__":
    main()
