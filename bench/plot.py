"""python -m bench.plot RESULTS.json...: one PNG per shape and activation dtype (speed-up over
cuBLAS against M, one line per implementation, log-scaled M), next to the last JSON, and a
markdown table of W4 g128 speed-ups for the README."""
import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(paths):
    """(N, K, dtype) -> implementation -> {M: speed-up}; later files override earlier ones."""
    series = defaultdict(lambda: defaultdict(dict))
    for path in paths:
        for row in json.loads(Path(path).read_text())["rows"]:
            for name, v in row["impl"].items():
                series[row["N"], row["K"], row["dtype"]][name][row["M"]] = v["speedup"]
    return series


def plot(series, folder, stem):
    for (n, k, dtype), impls in sorted(series.items()):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, points in sorted(impls.items()):
            ms = sorted(points)
            ax.plot(ms, [points[m] for m in ms], marker="o", label=name)
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set(xscale="log", xlabel="M (rows of x)", ylabel=f"speed-up over {dtype} cuBLAS",
               title=f"N x K = {n} x {k}, {dtype} activations")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / f"{stem}-{n}x{k}-{dtype}.png", dpi=100)
        plt.close(fig)


def table(series, dtype, impls):
    """Min-max speed-up over the shapes, per M, for each implementation."""
    ms = sorted({m for (_, _, d), s in series.items() if d == dtype for p in s.values() for m in p})
    lines = ["| M | " + " | ".join(impls) + " |", "|---|" + "---|" * len(impls)]
    for m in ms:
        cells = []
        for name in impls:
            vals = [s[name][m] for (_, _, d), s in series.items() if d == dtype and m in s.get(name, {})]
            cells.append(f"{min(vals):.2f}-{max(vals):.2f}x" if vals else "")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    paths = [Path(p) for p in sys.argv[1:]]
    series = load(paths)
    plot(series, paths[-1].parent, paths[-1].stem)
    for dtype in sorted({d for _, _, d in series}):
        impls = sorted({name for (_, _, d), s in series.items() if d == dtype for name in s})
        print(f"\n{dtype}\n" + table(series, dtype, impls))


if __name__ == "__main__":
    main()
