"""python -m bench.compile_time: seconds from torch.compile to the first generated token of a
Llama-3-8B-shaped model (random weights, W4 g128 affine, lm_head in fp16, a 16-token prompt):

* fp16: the unquantized model through plain torch.compile (Inductor): the baseline;
* cold: qcompile with its autotune cache, Triton's cache and Inductor's cache all empty;
* warmup: ``qcompile warmup`` of the same config for M = 1 and 16 (its own time);
* warm: qcompile after that warmup (its autotune cache and Triton's cache kept, Inductor's
  cache empty as for the baseline), so warm - fp16 is what qcompile adds to a compile.

Each case runs in a fresh process with its own cache folders. ``--regional`` compiles each
decoder layer on its own (qcompile.compile_regions) instead of the whole model, fp16 too: the
32 identical layers then share one trace; the whole fp16 model is compiled as well, as the
baseline. ``--tiny`` runs a 2-layer model on CPU through the Triton interpreter, to check the
script itself.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

from bench.decode import LLAMA3_8B, TINY

PROMPT = 16


def child(spec: dict) -> None:
    """One measurement, in its own process: prints a JSON line."""
    import torch
    from bench.decode import build
    device, dtype = ("cpu", torch.float32) if spec["tiny"] else ("cuda", torch.float16)
    built = time.perf_counter()
    model = build(TINY if spec["tiny"] else LLAMA3_8B, dtype, device, spec["bits"])
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT), device=device)
    backend = "qcompile" if spec["bits"] else "inductor"
    start = time.perf_counter()
    print(f"{spec['case']}: model built in {start - built:.1f} s", file=sys.stderr, flush=True)
    with torch.no_grad():
        if spec.get("regional"):  # each decoder layer compiled on its own: one trace serves all 32
            import qcompile
            compiled = qcompile.compile_regions(model, backend=backend)
        else:
            compiled = torch.compile(model, backend=backend)
        token = compiled(ids, use_cache=False).logits[:, -1].argmax(-1)
    token.tolist()  # waits for the device
    print(json.dumps({"case": spec["case"], "seconds": time.perf_counter() - start}), flush=True)


def run(case: str, env: dict, tiny: bool, bits: int, regional: bool) -> float:
    spec = json.dumps({"case": case, "tiny": tiny, "bits": bits, "regional": regional})
    r = subprocess.run([sys.executable, "-m", "bench.compile_time", "--child", spec], env={**os.environ, **env},
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{case} failed:\n{r.stderr[-4000:]}")
    seconds = json.loads(r.stdout.strip().splitlines()[-1])["seconds"]
    built = [line for line in r.stderr.splitlines() if "model built" in line]
    print(*built, f"| {case}: {seconds:.1f} s", flush=True)  # progress, should the run be cut
    return seconds


def config_file(folder: str, tiny: bool) -> str:
    path = os.path.join(folder, "config.json")
    with open(path, "w") as f:
        json.dump({"model_type": "llama", **(TINY if tiny else LLAMA3_8B), "max_position_embeddings": 4096}, f)
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--regional", action="store_true",
                    help="compile each decoder layer on its own (transformers' regional compilation), fp16 too")
    ap.add_argument("--child")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    a = ap.parse_args()
    if a.child:
        spec = json.loads(a.child)
        if spec["tiny"]:
            os.environ.setdefault("TRITON_INTERPRET", "1")
        return child(spec)
    root = tempfile.mkdtemp(prefix="qcompile-compile-time-")
    dirs = lambda name: {"TORCHINDUCTOR_CACHE_DIR": os.path.join(root, name, "inductor"),  # noqa: E731
                         "TRITON_CACHE_DIR": os.path.join(root, name, "triton"),
                         "QCOMPILE_CACHE_DIR": os.path.join(root, name, "qcompile")}
    env = {"QCOMPILE_AUTOTUNE": "1"}
    result = {"fp16": run("fp16", {**env, **dirs("fp16")}, a.tiny, 0, a.regional),
              **({"fp16_whole_model": run("fp16", {**env, **dirs("fp16-whole")}, a.tiny, 0, False)}
                 if a.regional else {}),
              "cold": run("cold", {**env, **dirs("cold")}, a.tiny, 4, a.regional)}
    warm_dirs = dirs("warm")
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "qcompile.cli", "warmup", "--model", config_file(root, a.tiny),
                        "--m", f"1,{PROMPT}", "--skip", "lm_head", "--group-size", "32" if a.tiny else "128",
                        "--dtype", "fp32" if a.tiny else "fp16"],
                       env={**os.environ, **env, **warm_dirs}, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"warmup failed:\n{r.stderr[-4000:]}")
    result["warmup"] = time.perf_counter() - start
    warm_dirs["TORCHINDUCTOR_CACHE_DIR"] += "-fresh"  # Inductor starts cold, as for the fp16 baseline
    result["warm"] = run("warm", {**env, **warm_dirs}, a.tiny, 4, a.regional)
    result["warm_minus_fp16"] = result["warm"] - result["fp16"]
    result["cold_minus_fp16"] = result["cold"] - result["fp16"]
    if a.regional:  # the baseline is plain torch.compile of the whole fp16 model
        result["warm_minus_fp16_whole_model"] = result["warm"] - result["fp16_whole_model"]
    print(json.dumps(result, indent=1))
    if not a.tiny:
        import torch
        gpu = torch.cuda.get_device_name().split()[1].lower()
        name = f"{datetime.date.today()}-{gpu}-compile-time{'-regional' if a.regional else ''}.json"
        path = os.path.join(a.out, name)
        with open(path, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "model": "Llama-3-8B-shaped, W4 g128 affine, lm_head fp16, prompt 16",
                       "compile": "each decoder layer" if a.regional else "whole model", **result}, f, indent=1)
        print("wrote", path)


if __name__ == "__main__":
    main()
