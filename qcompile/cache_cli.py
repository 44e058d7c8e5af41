"""``qcompile cache ls|clear|export|import``: look into the autotune cache and move it between
machines (entries are per GPU model and torch/triton version, so an exported cache only warms
machines that match)."""
import triton

from qcompile.codegen.tiling import Choice
from qcompile.runtime.autotune_cache import AutotuneCache


def main(action: str, file: str | None) -> None:
    cache = AutotuneCache()
    if action == "ls":
        entries = cache.entries()
        for e in entries:
            if "error" in e:
                print(f"INVALID  {e['path']}: {e['error']}")
                continue
            best = min(e["timings_us"].values(), default=None)
            cfg = e["config"]
            cfg = Choice(cfg["kernel"], triton.Config(cfg["kwargs"], num_warps=cfg["num_warps"],
                                                      num_stages=cfg["num_stages"]))
            print(f"{e['device']}  {e['kernel']:<5} {' '.join(map(str, e['key'])):<36} {cfg}  "
                  f"{'-' if best is None else f'{best:.1f} us'}  {e['created']}")
        print(f"{len(entries)} entries in {cache.folder}")
    elif action == "clear":
        print(f"removed {cache.clear()} entries from {cache.folder}")
    elif action == "export":
        print(f"exported {cache.export(file)} entries from {cache.folder} to {file}")
    else:
        added, skipped = cache.import_(file)
        print(f"imported {added} entries into {cache.folder}" + (f", skipped {skipped} invalid" if skipped else ""))
