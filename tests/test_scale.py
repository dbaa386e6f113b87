"""Many real members on one machine (issue 7): IPOP_SCALE_NODES `ipop-overlay join` processes (default 40), each
in its own namespace with its own TAP, one Prosody. All start within 10 s (a join storm) and must form one ring
within 60 s with every sampled pair pinging; then 10 % are SIGKILLed at once and the survivors must be whole
again within 30 s; then 20 % restart at once and every sampled pair must ping within 60 s. No node may exit on
its own, and no node's memory may grow with the restarts. The phases run once, in order, whatever the result of
the one before (tests/support/scale.py, ScaleScenario).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from tests.support.group import missing_prerequisites
from tests.support.hoststats import neighbour_limits
from tests.support.scale import ScaleScenario
from tests.support.scalegroup import ScaleGroup

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(missing_prerequisites() is not None, reason=str(missing_prerequisites())),
    pytest.mark.timeout(1200),
]

NODES = int(os.environ.get("IPOP_SCALE_NODES", "40"))
# From issue 7: start within 10 s, one ring within 60 s, whole again within 30 s of killing 10 % and every
# sampled pair pinging within 60 s of restarting 20 %.
SPREAD_S = 10.0
STORM_S = 60.0
KILL_S = 30.0
RESTART_S = 60.0
# Our choice: pairs of a group that has not converged still get this long, so the failure says how many answer.
PING_S = 10.0
# Our choice: ~2x what a node measured here (66 MB in issue 7, 76-85 MB in bench/scale.py at 30-100 nodes); a
# restart must not add more than 10 % (or 8 MB, a few allocator arenas) to a node that stayed up.
RSS_LIMIT_MB = 150.0
RSS_GROWTH = 0.10
RSS_SLACK_MB = 8.0


@pytest.fixture(scope="module")
def scenario() -> Iterator[ScaleScenario]:
    limits = neighbour_limits()
    with ScaleGroup(NODES, prefix="ist") as g:
        yield ScaleScenario(
            g,
            spread=SPREAD_S,
            storm_timeout=STORM_S,
            kill_timeout=KILL_S,
            restart_timeout=RESTART_S,
            ping_timeout=PING_S,
            idle_window=0.0,
        )
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert g.lab.tag not in left, f"namespaces left behind: {left}"
    assert neighbour_limits() == limits, f"neighbour thresholds {neighbour_limits()} not restored to {limits}"


def test_the_server_counts_the_room_set_up_session_stanza_by_stanza(scenario: ScaleScenario) -> None:
    """The instrument itself, on a session whose stanzas are known: the admin that made the room logged in
    once and sent a bind, the room form and one affiliation per member (Prosody applies one item per request),
    and entered and left the room; each request got one answer. (A debug log of every stanza, Prosody's own
    mod_stanza_debug, showed the same numbers.)"""
    k = scenario.g.counts_at_build
    assert k is not None, "the server's statistics could not be read (GET /metrics inside its namespace)"
    assert (k.logins, k.binds, k.room_joins) == (1, 1, 1), k
    assert k.stanzas_in == {"iq": NODES + 2, "presence": 2}, k
    assert k.stanzas_out.get("iq") == NODES + 2 and k.stanzas_out.get("presence") == 2, k


def test_a_join_storm_puts_every_node_in_one_ring_within_60_s(scenario: ScaleScenario) -> None:
    storm = scenario.storm()
    print(storm.summary())
    c = storm.convergence
    assert storm.spread_s <= SPREAD_S + 1.0, f"{NODES} starts took {storm.spread_s:.1f} s, not a {SPREAD_S:.0f} s storm"
    assert c.converged_s is not None and c.running == NODES, (
        f"{NODES} nodes started within {storm.spread_s:.1f} s: "
        + (f"not one ring after {STORM_S:.0f} s" if c.converged_s is None else f"one ring at {c.converged_s:.1f} s")
        + f" of the {c.running} still running\n"
        + scenario.g.describe(c, storm.reach.failed)
    )


def test_sampled_pairs_ping_after_the_join_storm(scenario: ScaleScenario) -> None:
    storm = scenario.storm()
    r = storm.reach
    assert not r.failed, (
        f"{r.ok} of {len(r.answered)} sampled pairs answered a ping after the storm\n"
        + scenario.g.describe(storm.convergence, r.failed)
    )


def test_after_killing_10_percent_at_once_the_ring_is_whole_and_pairs_ping_within_30_s(
    scenario: ScaleScenario,
) -> None:
    kill = scenario.kill()
    print(kill.summary())
    took = kill.recovered_s
    assert took is not None and took <= KILL_S, (
        f"SIGKILL of {kill.nodes}: ring whole after {_s(kill.convergence.converged_s)}, "
        f"{kill.reach.ok} of {len(kill.reach.answered)} pairs answered (last after {_s(kill.reach.last_s)})\n"
        + scenario.g.describe(kill.convergence, kill.reach.failed)
    )


def test_after_restarting_20_percent_at_once_every_pair_pings_within_60_s(scenario: ScaleScenario) -> None:
    restart = scenario.restart()
    print(restart.summary())
    took = restart.recovered_s
    unclean = {i: code for i, code in restart.stop_codes.items() if code != 0}
    assert not unclean, f"nodes that did not exit 0 on SIGTERM: {unclean}"
    assert took is not None and took <= RESTART_S, (
        f"restart of {restart.nodes}: ring whole after {_s(restart.convergence.converged_s)}, "
        f"{restart.reach.ok} of {len(restart.reach.answered)} pairs answered (last after {_s(restart.reach.last_s)})\n"
        + scenario.g.describe(restart.convergence, restart.reach.failed)
    )


def test_no_node_exited_on_its_own(scenario: ScaleScenario) -> None:
    scenario.restart()
    exits = scenario.g.exits()
    assert not exits, f"{len(exits)} node processes exited on their own:\n" + "\n".join(
        f"node{e.index} (pid {e.pid}) exited {e.returncode} after {e.after_s:.0f} s:\n{e.log_tail}" for e in exits
    )


def test_node_memory_is_bounded_and_does_not_grow_with_restarts(scenario: ScaleScenario) -> None:
    scenario.restart()
    usage = scenario.g.usage()
    big = {i: round(u.rss_mb) for i, u in usage.items() if u.rss_mb > RSS_LIMIT_MB}
    assert not big, f"nodes above {RSS_LIMIT_MB:.0f} MB RSS: {big}"
    before, after = scenario.rss_before_restart, scenario.rss_after_restart
    grew = {
        i: (round(before[i], 1), round(after[i], 1))
        for i in after
        if i in before and after[i] > before[i] * (1 + RSS_GROWTH) + RSS_SLACK_MB
    }
    assert not grew, f"RSS MB (before, after) the restart of {scenario.restart().nodes}, nodes that stayed up: {grew}"


def _s(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f} s"
