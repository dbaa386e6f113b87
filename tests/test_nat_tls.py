"""TURN over TLS through NATs, end to end: two members behind two symmetric NATs, where only a relay can carry
their link, and one on the public segment; coturn's only TURN listener named in their configs is TLS
(`turns:`, trusted through the lab's own CA with `ca_file`). The pair links through a relay, and every pair pings.
"""

from __future__ import annotations

from typing import Any

import pytest

from overlay.upgrades import UPGRADE_AFTER
from tests.support.group import Group, missing_prerequisites

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(missing_prerequisites() is not None, reason=str(missing_prerequisites())),
    pytest.mark.timeout(300),
]

CLUSTERS = {"s": "symmetric", "t": "symmetric"}
PLACEMENT: list[str | None] = [None, "s", "t"]
# As in tests/test_nat.py: joins take 1-3 s, pings need the ring and the DHT records. A link made as a tunnel
# while the TLS allocation was still being made is offered ICE again after UPGRADE_AFTER.
WARM_UP_S = 60.0
RELAY_S = UPGRADE_AFTER + 30.0


def link(g: Group, i: int, j: int) -> dict[str, Any] | None:
    return next((row for row in g.status(i)["links"] if row["peer_id"] == g.members[j].node_id), None)


def test_members_behind_two_symmetric_nats_link_through_turn_over_tls() -> None:
    with Group(
        len(PLACEMENT), clusters=CLUSTERS, placement=PLACEMENT, turn=True, ice=True, turn_tls=True, prefix="itl"
    ) as g:
        for i in range(len(PLACEMENT)):
            g.join(i, timeout=40)
        for i in range(len(PLACEMENT)):
            turn = g.status(i)["ice"]["turn"]
            assert [t["server"].split(":")[0] for t in turn] == ["turns"], turn
        answered = g.wait_for_pings(g.running_pairs(), WARM_UP_S)
        assert all(t is not None for t in answered.values()), answered

        def relayed() -> bool:
            row = link(g, 1, 2)
            return row is not None and row["kind"] == "relay"

        assert g.wait_until(relayed, RELAY_S, 1.0), (link(g, 1, 2), link(g, 2, 1))
        for i in (1, 2):
            st = g.status(i)
            assert all(t["relayed"] for t in st["ice"]["turn"]), st["ice"]
            assert st["ice"]["counters"].get("turn allocations", 0) >= 1, st["ice"]["counters"]
        assert all(g.ping_many([(1, 2), (2, 1)], count=3, timeout=2.0).values())
