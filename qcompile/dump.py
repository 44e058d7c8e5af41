"""qcompile dump: run a user script (or a model built from a config) with graph dumps on, then
summarise.

Per compiled graph the pass writes graph_*/00_before.txt, then for each pass in order
NN_after_<pass>.txt and NN_rewrites_<pass>.json, and summary.json (see passes/manager.py).
This adds a picture of each pass's rewrites (NN_rewrites_<pass>.svg), the kernel templates'
source and the config each kernel ran with (kernels.json), and prints one table for the run."""
import inspect
import json
import os
import runpy
import sys
import time
from pathlib import Path

from .report import Fallback, Fused, Matched, Report

MAX_REGIONS = 3  # rewritten regions drawn per picture; a Llama has one per linear, all alike
COLORS = {"removed": "#e8877f", "added": "#7fc98b", "context": "#d9d9d9"}


def run_script(script: str, args: list[str], folder: Path) -> Report:
    _dumps_on(folder)
    saved = sys.argv
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        sys.argv = saved
    return finish(folder)


def run_model(config_path: str, folder: Path, quant: dict, layers: int | None, batch: int, seq: int,
              dtype_name: str) -> Report:
    """Build the config's model with random weights, quantize it with ``quant`` (quantize()'s
    arguments), compile it and run one forward on random token ids. Without a GPU it runs as a
    dry run: matching as on a GPU, the matched layers computing the reference."""
    import torch

    import qcompile
    from .hfmodel import DTYPES, build, load_config

    gpu = torch.cuda.is_available()
    if not gpu:
        os.environ["QCOMPILE_DRY_RUN"] = "1"
    _dumps_on(folder)
    config = load_config(config_path, layers)
    model = build(config, "cuda" if gpu else "cpu", DTYPES[dtype_name])
    qcompile.quantize(model, **quant)
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=model.device)
    with torch.no_grad():
        torch.compile(model, backend="qcompile")(ids, use_cache=False)
    return finish(folder)


def _dumps_on(folder: Path) -> None:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    os.environ["QCOMPILE_DEBUG_DIR"] = str(folder)
    torch._inductor.config.force_disable_caches = True  # a cached graph would skip the pass


def finish(folder: Path) -> Report:
    _write_kernels(folder)
    for region in sorted(folder.glob("graph_*/*_rewrites_*.json")):
        draw(json.loads(region.read_text()), region.with_suffix(".svg"), region.parent.name)
    return collect(folder)


def _write_kernels(folder: Path) -> None:
    """The templates W-only matches run (with their shared helpers); per tuning key, the kernel
    and config that ran and, for compiled Triton, its shared memory and its generated code
    (kernels/<n>.ttgir and .ptx: the template specialised for that key)."""
    if "qcompile.runtime.ops" not in sys.modules:
        return
    from qcompile.codegen import scaled_gemm, tiling, unpack, wq_dequant, wq_gemm, wq_gemv
    from qcompile.runtime.ops import chosen, compiled
    for module in (wq_gemv, wq_gemm, wq_dequant, unpack, scaled_gemm, tiling):
        (folder / f"{module.__name__.rsplit('.', 1)[1]}.py").write_text(inspect.getsource(module))
    table = {}
    for i, (key, choice) in enumerate(chosen.items()):
        row = table[str(key)] = {"choice": str(choice)}
        binary = compiled.get(key)
        if binary is not None:
            (folder / "kernels").mkdir(exist_ok=True)
            row["shared_bytes"] = getattr(binary.metadata, "shared", None)
            for ir in ("ttgir", "ptx"):
                if ir in binary.asm:
                    (folder / "kernels" / f"{i:03d}-{choice.kernel}.{ir}").write_text(binary.asm[ir])
                    row[ir] = f"kernels/{i:03d}-{choice.kernel}.{ir}"
    (folder / "kernels.json").write_text(json.dumps(table, indent=2))


def _layout(g):
    """Left to right: each node one column past its deepest operand."""
    import networkx as nx
    for depth, generation in enumerate(nx.topological_generations(g)):
        for n in generation:
            g.nodes[n]["layer"] = depth
    return nx.multipartite_layout(g, subset_key="layer")


def _neighbours(g, nodes):
    return {m for n in nodes for m in (*g.predecessors(n), *g.successors(n))}


def regions(before, after) -> list:
    """One (before nodes, after nodes) pair per rewritten output: each removed node that feeds
    nothing else removed (the matmul, or the bias add it absorbed), with the removed nodes it
    depends on, and the added nodes that took their place; first of each distinct op mix."""
    import networkx as nx
    removed = {n for n, d in before.nodes(data=True) if d["role"] == "removed"}
    added = {n for n, d in after.nodes(data=True) if d["role"] == "added"}
    inner = before.subgraph(removed)
    sinks = sorted((n for n in removed if not set(before.successors(n)) & removed),
                   key=lambda n: before.nodes[n]["order"])
    out, seen = [], set()
    for sink in sinks:
        core = nx.ancestors(inner, sink) | {sink}
        mix = tuple(sorted(before.nodes[n]["op"] for n in core))
        if mix in seen:
            continue
        seen.add(mix)
        kept = (_neighbours(before, core) - removed) & set(after)  # a dead operand's input may be out of view after
        new = _neighbours(after, kept) & added
        new |= nx.ancestors(after.subgraph(added), next(iter(new))) if new else set()
        out.append((core | _neighbours(before, core), new | _neighbours(after, new)))
    return out


def draw(region: dict, path: Path, title: str) -> bool:
    """A picture of a pass's rewrites, one row per distinct kind of rewrite (MAX_REGIONS at
    most): removed nodes (red) with their operands and users before, added nodes (green)
    after. False if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    import networkx as nx

    sides = []
    for side in ("before", "after"):
        g = nx.DiGraph()
        g.add_nodes_from((n["id"], n) for n in region[side]["nodes"])
        g.add_edges_from(region[side]["edges"])
        sides.append(g)
    rows = regions(*sides)[:MAX_REGIONS]
    if not rows:
        return False
    fig, axes = plt.subplots(len(rows), 2, figsize=(20, 7 * len(rows)), squeeze=False,
                             gridspec_kw={"width_ratios": (3, 1)})
    for r, nodes in enumerate(rows):
        for c, (g, names, verb) in enumerate(zip(sides, nodes, ("removed", "added"))):
            sub, ax = g.subgraph(names).copy(), axes[r][c]
            ax.axis("off")
            ax.set_title(f"{'before' if c == 0 else 'after'}: {sum(d['role'] == verb for _, d in sub.nodes(data=True))}"
                         f" nodes {verb}", fontsize=9)
            nx.draw_networkx(sub, _layout(sub), ax=ax, node_size=700, font_size=5, arrowsize=8,
                             labels={n: f"{d['op']}\n{n}" for n, d in sub.nodes(data=True)},
                             node_color=[COLORS[d["role"]] for _, d in sub.nodes(data=True)])
    fig.suptitle(f"{title}: each distinct rewrite once ({len(rows)} shown)")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return True


def collect(folder: Path) -> Report:
    report = Report()
    for summary in sorted(folder.glob("graph_*/summary.json")):
        data = json.loads(summary.read_text())
        report.matched += [Matched(**m) for m in data["matched"]]
        report.fallbacks += [Fallback(**f) for f in data["fallbacks"]]
        report.fused += [Fused(**f) for f in data.get("fused", [])]
        report.graphs += data["graphs"]
    return report


def default_folder() -> Path:
    return Path("qcompile_debug") / time.strftime("%Y%m%d-%H%M%S")


def main(script: str | None, args: list[str], out: str | None, model: dict | None = None) -> None:
    folder = Path(out) if out else default_folder()
    report = run_model(folder=folder, **model) if model else run_script(script, args, folder)
    print(report)
    if os.environ.get("QCOMPILE_DRY_RUN") == "1":
        print("qcompile dump: dry run without a GPU: matched as on a GPU; the matched layers computed the "
              "format's reference, no kernel ran")
    print(f"qcompile dump: {folder.resolve()}")
