"""Churn on the virtual clock: the node's own maintenance rules repair the overlay after crashes."""

from __future__ import annotations

from overlay.routing.ring import RingParams
from sims.churn import ChurnConfig, ChurnSim, run_churn


def _cfg(**kw: object) -> ChurnConfig:
    base: dict[str, object] = {
        "nodes": 40,
        "params": RingParams(ring_size=2, long_links=3, incoming_cap=6),
        "duration": 0.0,
        "warmup": 60.0,
        "sample_every": 1e9,
        "seed": 5,
    }
    base.update(kw)
    return ChurnConfig(**base)  # type: ignore[arg-type]


def test_joining_nodes_form_a_ring_where_every_pair_routes() -> None:
    sim = ChurnSim(_cfg())
    sim.start()
    sim.advance(240.0)
    assert len(sim.members) == 40
    assert sim.all_pairs_success(10_000) == 1.0
    ids = sorted(sim.members)
    for pos, node in enumerate(ids):
        assert sim.members[node].table.successors()[0] == ids[(pos + 1) % len(ids)]


def test_maintenance_repairs_reachability_after_a_quarter_of_the_nodes_crash() -> None:
    sim = ChurnSim(_cfg())
    sim.start()
    sim.advance(240.0)
    for node in sorted(sim.members)[::4]:
        sim.leave(node)
    broken = sim.all_pairs_success(10_000)
    sim.advance(240.0 + 90.0)
    assert broken < 1.0
    assert sim.all_pairs_success(10_000) == 1.0
    ids = sorted(sim.members)
    for pos, node in enumerate(ids):
        t = sim.members[node].table
        assert t.successors()[:1] == [ids[(pos + 1) % len(ids)]]
        assert all(p in sim.members for p in t.neighbours())


def test_weibull_churn_run_is_deterministic_and_recovers_after_it_stops() -> None:
    cfg = _cfg(duration=300.0, weibull_scale=300.0, sample_every=60.0, settle=90.0, sample_pairs=50)
    a = run_churn(cfg)
    b = run_churn(cfg)
    assert a["leaves"] > 10 and a["joins"] > 40
    assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    assert a["success_after_settle"] == 1.0
    assert 0 < a["messages_per_node_s"] < 50
