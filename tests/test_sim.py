"""The simulator: deterministic, routes exactly as the node's decide() on the node's own tables, and its
hop counts and shortest paths agree with networkx brute force at small N."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

import networkx as nx
import numpy as np
import pytest

from overlay.ids import FAR, RING_SIZE, ring_distance
from overlay.routing.forwarding import DEFAULT_TTL, Forward, decide, decide_promise, xor_distance
from overlay.routing.ring import RingParams, ring_neighbours
from sims.cli import main
from sims.export import to_networkx
from sims.overlay import build_kademlia, build_symphony
from sims.routes import Routing, bfs_hops, moore_bound, random_pairs, route, shortest_path_mean
from sims.run import SimConfig, simulate


def _strip(report: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in report.items() if not k.startswith("seconds")}


def test_same_seed_gives_the_same_report_and_another_seed_does_not() -> None:
    cfg = SimConfig(nodes=400, pairs=200, bfs_sources=4, seed=7)
    a, _ = simulate(cfg)
    b, _ = simulate(cfg)
    c, _ = simulate(SimConfig(nodes=400, pairs=200, bfs_sources=4, seed=8))
    assert _strip(a) == _strip(b)
    assert a["hops"] != c["hops"] or a["degree"] != c["degree"]


@pytest.mark.parametrize(
    "routing",
    [Routing(lookahead=False), Routing(lookahead=True), Routing(lookahead=True, depth=2, hop_aware=True)],
    ids=["greedy", "lookahead", "hop-aware-depth2"],
)
def test_simulated_route_is_the_nodes_decide_on_its_own_ring_tables(routing: Routing) -> None:
    ov = build_symphony(300, RingParams(2, 3, 6), seed=3)
    tables = {ov.node_id(i): ov.ring_table(i) for i in range(ov.n)}
    rng = np.random.default_rng(5)
    for s, t in random_pairs(ov.n, 60, rng).tolist():
        target = ov.node_id(t)
        sim = [ov.node_id(i) for i in route(ov, s, target, routing).path]
        # the node: its RingTable's links, its neighbours' lists as they told it, its own size estimate
        cur, watermark, ttl, path = ov.node_id(s), FAR, DEFAULT_TTL, [ov.node_id(s)]
        while True:
            table = tables[cur]
            d = (
                decide(
                    cur,
                    target,
                    exact=True,
                    watermark=watermark,
                    ttl=ttl,
                    neighbours=table.neighbours(),
                    neighbours_of=(lambda p: tables[p].neighbours()) if routing.depth > 1 else table.neighbours_of,
                    depth=routing.depth,
                    spacing=RING_SIZE / table.size_estimate() if routing.hop_aware else 0.0,
                )
                if routing.lookahead
                else decide(cur, target, exact=True, watermark=watermark, ttl=ttl, neighbours=table.neighbours())
            )
            if not isinstance(d, Forward):
                break
            watermark, ttl, cur = ring_distance(cur, target), ttl - 1, d.next_hop
            path.append(cur)
        assert sim == path and path[-1] == target


@pytest.mark.parametrize("depth", [1, 2])
def test_promise_route_is_the_nodes_decide_promise_on_its_own_ring_tables(depth: int) -> None:
    ov = build_symphony(300, RingParams(2, 3, 6), seed=3)
    tables = {ov.node_id(i): ov.ring_table(i) for i in range(ov.n)}
    routing = Routing(lookahead=True, depth=depth, hop_aware=True, promise=True)
    rng = np.random.default_rng(6)
    stepped_away = 0
    for s, t in random_pairs(ov.n, 60, rng).tolist():
        target = ov.node_id(t)
        sim = [ov.node_id(i) for i in route(ov, s, target, routing).path]
        cur, promise, hops, ttl, path = ov.node_id(s), FAR, 0, DEFAULT_TTL, [ov.node_id(s)]
        while True:
            table = tables[cur]
            d = decide_promise(
                cur,
                target,
                exact=True,
                promise=promise,
                promise_hops=hops,
                ttl=ttl,
                neighbours=table.neighbours(),
                neighbours_of=(lambda p: tables[p].neighbours()) if depth > 1 else table.neighbours_of,
                depth=depth,
                spacing=RING_SIZE / table.size_estimate(),
            )
            if not isinstance(d, Forward):
                break
            assert d.promise is not None
            stepped_away += ring_distance(d.next_hop, target) >= ring_distance(cur, target)
            promise, hops, ttl, cur = d.promise, d.promise_hops, ttl - 1, d.next_hop
            path.append(cur)
        assert sim == path and path[-1] == target
    assert stepped_away > 0, "promise routing never used its freedom to step away: the test shows nothing"


def test_promise_routing_takes_fewer_hops_than_the_strict_watermark() -> None:
    base = SimConfig(nodes=2000, pairs=400, bfs_sources=0, depth=2, hop_aware=True, long_links=3)
    strict, _ = simulate(SimConfig(**{**base.__dict__, "routing": "lookahead"}))
    promise, _ = simulate(SimConfig(**{**base.__dict__, "routing": "promise"}))
    assert promise["success"] == 1.0 and promise["routing"] == "promise"
    assert promise["hops"]["mean"] < 0.95 * strict["hops"]["mean"]


def test_ring_tables_hold_the_true_ring_neighbours_and_respect_the_incoming_cap() -> None:
    params = RingParams(ring_size=2, long_links=4, incoming_cap=5)
    ov = build_symphony(500, params, seed=2)
    ids = [ov.node_id(i) for i in range(ov.n)]
    incoming = np.bincount(ov.long_out[ov.long_out >= 0], minlength=ov.n)
    assert incoming.max() <= params.incoming_cap
    for i in range(0, ov.n, 37):
        t = ov.ring_table(i)
        succ, pred = ring_neighbours(ov.node_id(i), ids, 2)
        assert t.successors() == succ and t.predecessors() == pred
        assert t.incoming_long() <= params.incoming_cap
        assert len(t.outgoing_long()) <= params.long_links


def test_small_overlay_hops_and_shortest_paths_agree_with_networkx() -> None:
    ov = build_symphony(250, RingParams(2, 3, 6), seed=11)
    g = to_networkx(ov)
    lengths = dict(nx.all_pairs_shortest_path_length(g))
    for s in (0, 17, 120):
        d = bfs_hops(ov, s)
        assert all(d[t] == lengths[s][t] for t in range(ov.n))
    exact_mean = nx.average_shortest_path_length(g)
    assert shortest_path_mean(ov, np.arange(ov.n)) == pytest.approx(exact_mean)
    assert moore_bound(ov.n, float(ov.degree().mean())) <= exact_mean
    rng = np.random.default_rng(1)
    for s, t in random_pairs(ov.n, 200, rng).tolist():
        r = route(ov, s, ov.node_id(t), Routing(lookahead=True))
        assert r.delivered and r.path[-1] == t
        assert r.hops >= lengths[s][t]
        assert all(g.has_edge(a, b) for a, b in zip(r.path, r.path[1:], strict=False))


def test_moore_bound_for_a_cycle_and_a_complete_graph() -> None:
    assert moore_bound(5, 4.0) == 1.0
    assert moore_bound(7, 2.0) == pytest.approx((1 + 1 + 2 + 2 + 3 + 3) / 6)


def test_kademlia_routes_every_pair_by_xor_with_one_contact_per_bucket() -> None:
    ov = build_kademlia(300, seed=4)
    assert ov.distance is xor_distance
    ids = [ov.node_id(i) for i in range(ov.n)]
    i = 42
    peers = {ov.node_id(j) for j in ov.neighbour_indices(i)}
    buckets = {(ids[i] ^ p).bit_length() for p in peers}
    nonempty = {(ids[i] ^ j).bit_length() for j in ids if j != ids[i]}
    assert nonempty <= buckets
    rng = np.random.default_rng(3)
    for s, t in random_pairs(ov.n, 100, rng).tolist():
        assert route(ov, s, ids[t], Routing(lookahead=False)).delivered


def test_proximity_candidates_cut_latency_stretch() -> None:
    base = SimConfig(nodes=2000, pairs=400, bfs_sources=0, latency="plane")
    plain, _ = simulate(base)
    near, _ = simulate(SimConfig(**{**base.__dict__, "candidates": 16}))
    assert near["stretch"]["median"] < 0.8 * plain["stretch"]["median"]


def test_cli_json_has_the_documented_fields() -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        rc = main(["--nodes", "300", "--pairs", "50", "--latency", "plane", "--candidates", "4", "--json"])
    assert rc == 0
    r = json.loads(out.getvalue())
    for key in ("nodes", "long_links", "topology", "routing", "success", "moore_bound", "seconds"):
        assert key in r
    assert set(r["hops"]) >= {"mean", "p50", "p99", "max"} and set(r["degree"]) >= {"mean", "max"}
    assert "mean" in r["shortest_path"] and set(r["stretch"]) >= {"median", "p90"}
    assert r["nodes"] == 300 and r["success"] == 1.0


def test_cli_refuses_bad_arguments_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--nodes", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--nodes" in err
