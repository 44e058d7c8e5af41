"""What a compile did: which subgraphs became qcompile kernels and which fell back, and why."""
import json
from dataclasses import asdict, dataclass, field


@dataclass
class Matched:
    kind: str          # "linear"
    format: str
    bits: int
    group_size: int
    shapes: dict       # M, K, N and the activation dtype
    kernel: str
    node: str = ""


@dataclass
class Fallback:
    kind: str
    reason: str
    shapes: dict = field(default_factory=dict)
    node: str = ""


@dataclass
class Fused:
    """Matched linears that read one input and now run as one kernel over their joined columns."""
    kind: str
    nodes: list        # the matmuls they replaced (Matched.node), in column order
    columns: list      # their output widths
    kernel: str


@dataclass
class Report:
    matched: list = field(default_factory=list)
    fallbacks: list = field(default_factory=list)
    fused: list = field(default_factory=list)
    graphs: int = 0
    graph_breaks: int = 0

    def extend(self, other: "Report") -> None:
        self.matched += other.matched
        self.fallbacks += other.fallbacks
        self.fused += other.fused
        self.graphs += other.graphs

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)

    def __str__(self):
        rows = [("matched", m.kind, m.format, str(m.bits), str(m.group_size), _shape(m.shapes), m.kernel)
                for m in self.matched]
        rows += [("fallback", f.kind, "-", "-", "-", _shape(f.shapes), f.reason) for f in self.fallbacks]
        rows += [("fused", f.kind, "-", "-", "-", "N = " + " + ".join(map(str, f.columns)),
                  f"{f.kernel} of {', '.join(f.nodes)}") for f in self.fused]
        head = ("status", "kind", "format", "bits", "group", "M x K x N", "kernel / reason")
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
        lines = [f"qcompile: {len(self.matched)} matched, {len(self.fallbacks)} fallbacks, {len(self.fused)} fused, "
                 f"{self.graphs} graphs, {self.graph_breaks} graph breaks", fmt.format(*head)]
        lines += [fmt.format(*r) for r in rows]
        return "\n".join(lines)

    __repr__ = __str__


def _shape(s: dict) -> str:
    if "T" in s:  # attention: batch, query heads, queries, cache length, head dim
        return f"B={s['B']} Hq={s['Hq']} S={s['S']} T={s['T']} D={s['D']} {s['dtype']}"
    return f"{s.get('M', '?')} x {s.get('K', '?')} x {s.get('N', '?')} {s.get('dtype', '')}".strip() if s else "-"
