"""networkx views of a built overlay: GraphML export and graph analysis at small N."""

from __future__ import annotations

import networkx as nx  # type: ignore[import-untyped]

from sims.overlay import Overlay


def to_networkx(ov: Overlay) -> nx.Graph:
    """Nodes are indices with their ring ID (hex) as an attribute; edges are tunnels, marked long or ring."""
    g = nx.Graph()
    for i in range(ov.n):
        g.add_node(i, id=f"{ov.node_id(i):016x}")
    long_pairs = {(i, int(j)) for i in range(ov.n) for j in ov.long_out[i] if j >= 0}
    for i in range(ov.n):
        for j in ov.neighbour_indices(i):
            if i < j:
                kind = "long" if (i, j) in long_pairs or (j, i) in long_pairs else "ring"
                g.add_edge(i, j, kind=kind)
    if ov.positions is not None:
        for i in range(ov.n):
            g.nodes[i]["x"], g.nodes[i]["y"] = map(float, ov.positions[i])
    return g


def write_graphml(ov: Overlay, path: str) -> None:
    nx.write_graphml(to_networkx(ov), path)
