"""networkx views of a built overlay: GraphML export and graph analysis at small N; GraphML import of a real
overlay's picture (`ipop-overlay graph`, overlay/graphfile.py) for what-if runs."""

from __future__ import annotations

import networkx as nx  # type: ignore[import-untyped]
import numpy as np

from overlay.routing.ring import RingParams
from sims.overlay import Overlay, csr


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


def read_graphml(path: str, params: RingParams) -> Overlay:
    """An Overlay with the members and links of a GraphML file: node IDs from the `id` attribute (16 hex digits,
    as both `ipop-overlay graph` and `write_graphml` write it), links as they are. Which end drew a long link
    is not in the file, so no node has long links of its own: routing uses every link (the node's default).
    ValueError for a file that is not such a graph."""
    try:
        g = nx.read_graphml(path)
        ids = {node: int(str(data.get("id", node)), 16) for node, data in g.nodes(data=True)}
    except (OSError, nx.NetworkXError, ValueError, SyntaxError) as e:  # ElementTree's ParseError is a SyntaxError
        raise ValueError(f"{path}: not a GraphML overlay picture ({e})") from None
    if len(ids) < 2 or len(set(ids.values())) != len(ids):
        raise ValueError(f"{path}: needs at least 2 members with distinct 16-hex-digit IDs")
    order = sorted(ids, key=ids.__getitem__)
    index = {node: i for i, node in enumerate(order)}
    src = np.array([index[a] for a, b in g.edges()], dtype=np.int64)
    dst = np.array([index[b] for a, b in g.edges()], dtype=np.int64)
    indptr, indices = csr(len(order), src, dst, undirected=True)
    return Overlay(
        ids=np.array([ids[n] for n in order], dtype=np.uint64),
        indptr=indptr,
        indices=indices,
        long_out=np.full((len(order), 0), -1, dtype=np.int32),
        params=params,
        topology="loaded",
    )
