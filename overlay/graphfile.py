"""Files of the overlay's picture (`ipop-overlay graph --out`): GraphML through networkx, Graphviz DOT, or a PNG
drawn with matplotlib, each member placed on a circle at its ring position (ID / 2^64 of a turn), as the
topology simulator's plots place them. `sims/export.py` reads the GraphML back for what-if runs
(`ipop-overlay sim --load FILE`).

Schema (GraphML and DOT alike): a node per member, keyed by its node ID (16 hex digits), with `address`
(virtual IPv4, empty when it did not answer) and `answered` (false: only named by others' answers); an edge per
link with `kind` (host, srflx, prflx, relay, tunnel: as the reporting member sees the path) and `role` (ring,
long, on_demand, or other); the graph's `complete` attribute is false when some member did not answer in time.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import networkx as nx  # type: ignore[import-untyped]

FORMATS = (".graphml", ".dot", ".gv", ".png")


def to_networkx(result: dict[str, Any]) -> nx.Graph:
    g = nx.Graph(complete=bool(result["complete"]))
    for node, view in result["nodes"].items():
        g.add_node(node, id=node, address=view["address"], answered=True)
    for node in result["unanswered"]:
        g.add_node(node, id=node, address="", answered=False)
    for node, view in result["nodes"].items():
        for peer, kind, roles in view["links"]:
            if not g.has_node(peer):
                g.add_node(peer, id=peer, address="", answered=False)
            if not g.has_edge(node, peer):
                g.add_edge(node, peer, kind=kind, role=_role(roles))
    return g


def _role(roles: list[str]) -> str:
    if "ring" in roles:
        return "ring"
    if "long_out" in roles or "long_in" in roles:
        return "long"
    return "on_demand" if "on_demand" in roles else "other"


def ring_positions(g: nx.Graph) -> dict[str, tuple[float, float]]:
    """Each member on the unit circle at its ring position, clockwise from the top as IDs grow."""
    out = {}
    for node in g.nodes:
        turn = int(node, 16) / 2**64
        out[node] = (math.sin(2 * math.pi * turn), math.cos(2 * math.pi * turn))
    return out


def to_dot(g: nx.Graph) -> str:
    lines = [f'graph overlay {{\n  graph [complete="{str(g.graph.get("complete", True)).lower()}"];']
    for node, data in sorted(g.nodes(data=True)):
        style = "" if data["answered"] else ", style=dashed"
        label = f"{node}\\n{data['address']}" if data["address"] else node
        lines.append(f'  "{node}" [label="{label}", address="{data["address"]}"{style}];')
    for a, b, data in sorted(g.edges(data=True)):
        style = ", style=dotted" if data["kind"] == "tunnel" else ""
        lines.append(f'  "{a}" -- "{b}" [kind="{data["kind"]}", role="{data["role"]}"{style}];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def write(result: dict[str, Any], path: Path) -> nx.Graph:
    """Write `result` (GraphService.collect's) to `path` in the format its suffix names; ValueError for another."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"{path}: write .graphml, .dot (.gv) or .png")
    g = to_networkx(result)
    if suffix == ".graphml":
        nx.write_graphml(g, str(path))
    elif suffix in (".dot", ".gv"):
        path.write_text(to_dot(g))
    else:
        _png(g, path)
    return g


def _png(g: nx.Graph, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("a PNG needs matplotlib: pip install 'ipop-overlay[plot]', or write .graphml/.dot") from None
    pos = ring_positions(g)
    fig, ax = plt.subplots(figsize=(8, 8))
    colours = {"ring": "tab:blue", "long": "tab:orange", "on_demand": "tab:green", "other": "tab:gray"}
    for role, colour in colours.items():
        edges = [(a, b) for a, b, d in g.edges(data=True) if d["role"] == role]
        nx.draw_networkx_edges(g, pos, edgelist=edges, edge_color=colour, ax=ax, label=role if edges else None)
    answered = [n for n, d in g.nodes(data=True) if d["answered"]]
    silent = [n for n, d in g.nodes(data=True) if not d["answered"]]
    nx.draw_networkx_nodes(g, pos, nodelist=answered, node_size=60, node_color="black", ax=ax)
    nx.draw_networkx_nodes(g, pos, nodelist=silent, node_size=60, node_color="red", ax=ax)
    if g.number_of_nodes() <= 64:
        labels = {n: d["address"] or n[:8] for n, d in g.nodes(data=True)}
        nx.draw_networkx_labels(g, {n: (x * 1.1, y * 1.1) for n, (x, y) in pos.items()}, labels, font_size=7, ax=ax)
    title = f"{g.number_of_nodes()} members, {g.number_of_edges()} links"
    if not g.graph.get("complete", True):
        title += f" (PARTIAL: {len(silent)} did not answer, red)"
    ax.set_title(title)
    ax.legend(loc="lower right")
    ax.set_axis_off()
    fig.savefig(path, dpi=100)
    plt.close(fig)
