"""The ``qcompile`` command: demo, dump, warmup, cache."""
import argparse
import os
import sys


def _quant_args(p):
    """quantize()'s arguments, for the commands that build a model from a config."""
    p.add_argument("--model", metavar="CONFIG.json", help="a transformers config (model_type, sizes); "
                   "the model is built with random weights")
    p.add_argument("--bits", type=int, help="default: 4 for weight-only formats")
    p.add_argument("--group-size", type=int, help="default: 128 for weight-only formats")
    p.add_argument("--format", default="affine", help="affine, symmetric, bipolar, bcq, w8a8 or fp8")
    p.add_argument("--skip", default="", help="comma-separated layer name patterns left in float, e.g. lm_head")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="activation dtype")


def _quant(a) -> dict:
    return {"bits": a.bits, "group_size": a.group_size, "format": a.format,
            "skip": [s for s in a.skip.split(",") if s]}


def _batch_sizes(text: str) -> list[int]:
    try:
        ms = [int(x) for x in text.split(",") if x]
    except ValueError:
        ms = []
    if not ms or min(ms) < 1:
        raise SystemExit(f"qcompile warmup: --m {text!r}: give positive batch sizes, e.g. --m 1,16,128,1024")
    return ms


def _kernels_need_interpreter() -> None:
    """Without a GPU the kernels run in Triton's interpreter, which must be chosen before triton
    is imported."""
    import torch
    if not torch.cuda.is_available():
        assert "triton" not in sys.modules
        os.environ.setdefault("TRITON_INTERPRET", "1")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="qcompile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="quantize a Llama, compile it, print explain() and the outputs")

    dump = sub.add_parser("dump", help="run a script (or a model from a config) with graph dumps on and "
                          "summarise what matched")
    dump.add_argument("--out", help="dump folder (default qcompile_debug/<time>)")
    _quant_args(dump)
    dump.add_argument("--layers", type=int, help="with --model: build only this many hidden layers")
    dump.add_argument("--batch", type=int, default=1)
    dump.add_argument("--seq", type=int, default=8)
    dump.add_argument("script", nargs="?")
    dump.add_argument("args", nargs=argparse.REMAINDER)

    warm = sub.add_parser("warmup", help="compile and autotune the kernels a model needs, into the cache")
    _quant_args(warm)
    warm.add_argument("--m", default="1,16,128,1024", help="batch sizes (rows: batch x sequence)")
    warm.add_argument("--cache-dir", help="autotune cache folder (default: $QCOMPILE_CACHE_DIR or "
                      "~/.cache/qcompile)")

    cache = sub.add_parser("cache", help="inspect, clear, export or import the autotune cache")
    cache.add_argument("action", choices=("ls", "clear", "export", "import"))
    cache.add_argument("file", nargs="?", help="the .tar.gz for export and import")
    cache.add_argument("--cache-dir")

    a = parser.parse_args(argv)
    if getattr(a, "cache_dir", None):
        os.environ["QCOMPILE_CACHE_DIR"] = a.cache_dir
    if a.command == "demo":
        from .demo import main as demo
        demo()
    elif a.command == "dump":
        if bool(a.script) == bool(a.model):
            parser.error("dump takes either SCRIPT.py [args...] or --model CONFIG.json")
        from .dump import main as dump_main
        model = a.model and dict(config_path=a.model, quant=_quant(a), layers=a.layers, batch=a.batch,
                                 seq=a.seq, dtype_name=a.dtype)
        dump_main(a.script, a.args, a.out, model)
    elif a.command == "warmup":
        if not a.model:
            parser.error("warmup needs --model CONFIG.json (from Python: qcompile.warmup(model, m=[...]))")
        ms = _batch_sizes(a.m)
        _kernels_need_interpreter()
        from .warmup import warmup_config
        warmup_config(a.model, _quant(a), ms, a.dtype)
    else:
        from .cache_cli import main as cache_main
        if a.action in ("export", "import") and not a.file:
            parser.error(f"cache {a.action} needs a FILE.tar.gz")
        cache_main(a.action, a.file)


if __name__ == "__main__":
    main()
