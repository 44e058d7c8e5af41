"""python -m bench.decode: end-to-end greedy decode of a Llama-3-8B-shaped model with random
weights, a static KV cache and mode="reduce-overhead" (CUDA graphs), in tokens per second:
fp16 through plain torch.compile (Inductor) against qcompile W4 and W2 (affine, group 128,
lm_head left in fp16), at batch 1 and 16. For each quantized model the compiled tokens are
checked against the eager quantized model's for the first tokens.

Its own decode loop (as gpt-fast does) rather than generate(): transformers' generate()
compiles the forward itself and Inductor then skips CUDA graphs (see ../shared/DESIGN.md).
``--tiny`` runs a 2-layer model on CPU under TRITON_INTERPRET=1 to check the script itself.
"""
import argparse
import datetime
import json
import os
import sys
import time

import torch

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0)
PROFILE_STEPS = 5
WARM_STEPS, SYNCED_STEPS = 3, 5  # untimed (compiles), then timed one by one
TINY = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


def build(cfg, dtype, device, bits, skip):
    import transformers
    import qcompile
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**cfg, max_position_embeddings=4096)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    if bits:
        qcompile.quantize(model, bits=bits, group_size=128 if cfg is LLAMA3_8B else 32, skip=skip)
    return model


def decode(model, prompt, new_tokens, step_fn, profile=None):
    """Greedy tokens [B, new_tokens], seconds per step (None when new_tokens leaves no step to
    queue), and seconds per step with a synchronization after each. The first WARM_STEPS steps
    (compiles, CUDA graph recording) are not timed.

    Timed as gpt-fast does: the position lives on the GPU and each step is queued without
    waiting for the last, one synchronization at the end, so the CPU's work of a step (the
    graph replay) overlaps the GPU's. The synchronized figure waits for every token.
    With ``profile`` (a path), PROFILE_STEPS more steps run under torch.profiler and the GPU
    time per kernel goes there: where a step's time goes besides the quantized linears."""
    from transformers import StaticCache
    b, p = prompt.shape
    cache = StaticCache(config=model.config, max_cache_len=p + new_tokens + PROFILE_STEPS)
    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    with torch.no_grad():
        logits = model(prompt, past_key_values=cache, cache_position=torch.arange(p, device=prompt.device),
                       use_cache=True).logits
        tok = logits[:, -1].argmax(-1, keepdim=True)
        step = step_fn(lambda t, pos: model(t, past_key_values=cache, cache_position=pos,
                                            use_cache=True).logits[:, -1].argmax(-1, keepdim=True))
        pos, out, synced = torch.tensor([p], device=prompt.device), [tok], []
        for i in range(new_tokens - 1):
            if i <= WARM_STEPS + SYNCED_STEPS:  # the untimed and the one-by-one steps wait for the last
                sync()
            if i == WARM_STEPS + SYNCED_STEPS:  # from here on each step is queued without waiting
                start = time.perf_counter()
            begin = time.perf_counter()
            tok = step(tok, pos).clone()  # CUDA graph outputs are overwritten by the next replay
            pos += 1
            out.append(tok)
            if WARM_STEPS <= i < WARM_STEPS + SYNCED_STEPS:
                sync()
                synced.append(time.perf_counter() - begin)
        sync()
        queued = new_tokens - 1 - WARM_STEPS - SYNCED_STEPS  # steps
        queued = (time.perf_counter() - start) / queued if queued > 0 else None
        if profile:
            _profile_steps(step, tok, p + new_tokens - 1, profile)  # the positions after the timed ones
    return torch.cat(out, 1), queued, sum(synced) / max(1, len(synced))


def _profile_steps(step, tok, pos, path):
    """Kernel time per name over PROFILE_STEPS steps (kernels replayed from CUDA graphs
    included), and the counters that say whether Inductor skipped CUDA graphs."""
    from torch._dynamo.utils import counters
    acts = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * tok.is_cuda
    with torch.profiler.profile(activities=acts) as prof:
        for i in range(PROFILE_STEPS):
            tok = step(tok, torch.tensor([pos + i], device=tok.device)).clone()
        if tok.is_cuda:
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=90)
    with open(path, "w") as f:
        f.write(f"inductor counters: {dict(counters['inductor'])}\n\n{table}\n")
    print(table, flush=True)


def logits_check(model, prompt, backend) -> dict:
    """Last-position logits of the prompt, compiled against eager: the error relative to the
    logits' range, and eager's smallest top-1 over top-2 margin (a greedy token flips when the
    error exceeds it)."""
    with torch.no_grad():
        eager = model(prompt, use_cache=False).logits[:, -1].float()
        compiled = torch.compile(model, backend=backend)(prompt, use_cache=False).logits[:, -1].float()
    top2 = eager.topk(2, dim=-1).values
    return {"logits_rel_err": ((compiled - eager).abs().max() / eager.abs().max()).item(),
            "eager_top2_margin_rel": ((top2[:, 0] - top2[:, 1]).min() / eager.abs().max()).item(),
            "logits_finite": bool(torch.isfinite(eager).all() and torch.isfinite(compiled).all())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="2-layer model on CPU (interpreter)")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--bits", default="0,4,2", help="0 = fp16 through Inductor")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--check", type=int, default=8, help="leading tokens compared with eager")
    ap.add_argument("--skip", default="lm_head", help="layers left in fp16 (comma-separated names; '' for none)")
    ap.add_argument("--logits", action="store_true", help="also compare the prompt's logits, compiled vs eager")
    ap.add_argument("--name", default="decode", help="results file suffix")
    ap.add_argument("--profile", action="store_true", help="write a kernel-time table of 5 compiled steps per row")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    a = ap.parse_args()
    if a.tiny:
        assert "triton" not in sys.modules
        os.environ.setdefault("TRITON_INTERPRET", "1")
    cfg, device, dtype = (TINY, "cpu", torch.float32) if a.tiny else (LLAMA3_8B, "cuda", torch.float16)
    mode = None if a.tiny else "reduce-overhead"
    rows = []
    for bits in map(int, a.bits.split(",")):
        model = build(cfg, dtype, device, bits, [n for n in a.skip.split(",") if n])
        for batch in map(int, a.batches.split(",")):
            torch._dynamo.reset()
            prompt = torch.randint(0, cfg["vocab_size"], (batch, 16), device=device)
            backend = "qcompile" if bits else "inductor"
            prof = os.path.join(a.out, f"{a.name}-profile-w{bits or 16}-b{batch}.txt") if a.profile else None
            tokens, sec, synced = decode(model, prompt, a.tokens,
                                         lambda f: torch.compile(f, backend=backend, mode=mode), prof)
            row = {"bits": bits or 16, "batch": batch, "fp16_layers": a.skip, "ms_per_step": sec * 1e3,
                   "tokens_per_s": batch / sec,
                   "ms_per_step_synced": synced * 1e3, "tokens_per_s_synced": batch / synced}
            if bits:
                eager, *_ = decode(model, prompt, a.check, lambda f: f)
                row["first_tokens_equal_eager"] = bool(torch.equal(tokens[:, :a.check], eager))
                same = (tokens[:, :a.check] == eager).int().cumprod(1).sum(1)  # leading tokens equal, per sequence
                row["equal_prefix_min_mean"] = [same.min().item(), same.float().mean().item()]
                if a.logits:
                    torch._dynamo.reset()
                    row.update(logits_check(model, prompt, backend))
            rows.append(row)
            print(row, flush=True)
        del model
    if not a.tiny:
        gpu = torch.cuda.get_device_name().split()[1].lower()
        path = os.path.join(a.out, f"{datetime.date.today()}-{gpu}-{a.name}.json")
        with open(path, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
        print("wrote", path)


if __name__ == "__main__":
    main()
