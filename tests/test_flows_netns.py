"""The compiled data path's flows between real processes while the overlay changes around a stream
(docs/datapath.md, A packet's way): a member that joins brings links up and neighbour lists with it, and each
makes every node recompute its routes. The Engine keeps each flow in use while Python checks it, so a bulk
stream neither goes up to Python nor waits in the Engine's hold."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from tests.support.group import Group, missing_prerequisites

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(missing_prerequisites() is not None, reason=str(missing_prerequisites())),
    pytest.mark.timeout(300),
]

STREAM_S = 10
JOIN_AFTER_S = 1.0
# Frames the sender may pass up to Python over the run: 1-2 in five runs here, and a flow asked for once per
# lane would add one each. With every flow taken at each route change (five runs), 196-297 went up in the three
# that counted them and at most 40 in one other, 0-104 held frames were dropped and 264-5,683 segments resent (four
# that counted them); now no frame dropped and 0-176 resent in the five above.
FEW_UP = 20


def counters(group: Group, i: int) -> dict[str, int]:
    return {k: v for k, v in group.status(i)["counters"].items() if isinstance(v, int)}


def test_a_member_joining_during_a_stream_leaves_its_flows_to_the_engine() -> None:
    with Group(3, prefix="ifl") as g:
        g.join(0)
        g.join(1)
        g.iperf3(0, 1, 1, streams=4)  # the flows exist, the first run's ARP and connection set-up are done
        before = counters(g, 0)
        report: dict[str, Any] = {}
        stream = threading.Thread(target=lambda: report.update(g.iperf3(0, 1, STREAM_S, streams=4)))
        stream.start()
        try:
            time.sleep(JOIN_AFTER_S)
            g.join(2, min_links=2)
            assert stream.is_alive(), f"node 2 took longer than the {STREAM_S} s stream to join"
        finally:
            stream.join()
        after = counters(g, 0)
        delta = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
        assert report["end"]["sum_received"]["bytes"] > 10_000_000, report["end"]
        assert delta.get("routes: recomputed after a change", 0) >= 1, delta  # the join changed node 0's routes
        assert delta.get("fast path: dropped: held frames full", 0) == 0, delta
        assert delta.get("fast path: frames passed up", 0) <= FEW_UP, delta
        shown = {k: v for k, v in delta.items() if "lane" not in k and any(w in k for w in ("up", "held", "route"))}
        mbps = report["end"]["sum_received"]["bits_per_second"] / 1e6
        resent = report["end"]["sum_sent"].get("retransmits")
        print(f"4 streams, a member joined {JOIN_AFTER_S} s in: {mbps:.0f} Mbit/s, {resent} resent; node 0: {shown}")
