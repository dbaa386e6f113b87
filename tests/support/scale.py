"""Issue 7's scale scenario on a ScaleGroup: a join storm, crashes, a restart storm and a quiet window, measured.

`ScaleScenario` runs the phases of issue 7 in order (storm, kill 10 %, restart 20 %, idle) on a `ScaleGroup`
(tests/support/scalegroup.py) and keeps what each measured: how the running nodes came together
(`Convergence`), how soon sampled pairs pinged (`Reach`), what the server counted, and the cost of a quiet
window (`Idle`). tests/test_scale.py asserts on it and bench/scale.py prints it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from tests.support.hoststats import busy_percent, host_cpu_seconds, process_usage
from tests.support.prosody import ServerCounts
from tests.support.scalegroup import Launch, ScaleGroup

POLL_INTERVAL_S = 0.5


# -- measurements -----------------------------------------------------------------------------------------


@dataclass
class Convergence:
    """How a set of running nodes came together after `since` (monotonic)."""

    since: float
    timeout_s: float
    all_linked_s: float | None = None  # every running node had >= 1 link
    converged_s: float | None = None  # one component and every node's ring neighbours right
    linked: int = 0
    running: int = 0
    components: list[list[int]] = field(default_factory=list)
    ring_errors: dict[int, str] = field(default_factory=dict)
    silent: list[int] = field(default_factory=list)
    first_link_s: dict[int, float] = field(default_factory=dict)
    polls: int = 0
    poll_s: list[float] = field(default_factory=list)
    neighbours_max: int = 0  # most neighbour entries seen on the host (every namespace, ours or not)
    lab_neighbours: int = 0  # entries in this lab's namespaces when the phase ended


@dataclass
class Reach:
    """Sampled pairs pinged until each answered once or time ran out; seconds from `since` to each reply."""

    since: float
    answered: dict[tuple[int, int], float | None]

    @property
    def ok(self) -> int:
        return sum(1 for t in self.answered.values() if t is not None)

    @property
    def failed(self) -> list[tuple[int, int]]:
        return [p for p, t in self.answered.items() if t is None]

    @property
    def last_s(self) -> float | None:
        """When the last pair answered, or None when some never did."""
        times = list(self.answered.values())
        if any(t is None for t in times):
            return None
        return max((t for t in times if t is not None), default=0.0)


@dataclass
class Idle:
    """Cost of the running nodes over a quiet window: CPU of all of them, link bytes sent per node."""

    window_s: float
    nodes: int
    cpu_s: float
    tx_bytes: int
    server_cpu_s: float | None
    stanzas: int
    rekeys: int = 0  # handshakes the nodes started to renew session keys in the window
    # Every status counter's growth over the window, summed over the nodes: what the nodes did while idle.
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def rekeys_per_s(self) -> float:
        return self.rekeys / self.window_s if self.window_s else 0.0

    @property
    def cpu_percent_of_core(self) -> float:
        return 100.0 * self.cpu_s / self.window_s

    @property
    def tx_bytes_per_node_s(self) -> float:
        return self.tx_bytes / self.window_s / max(1, self.nodes)


def median(values: Iterable[float]) -> float | None:
    data = list(values)
    return statistics.median(data) if data else None


def converge(g: ScaleGroup, since: float, timeout: float, *, launched: dict[int, Launch] | None = None) -> Convergence:
    """Poll every running node until all are in one component with a whole ring, or `timeout` passes
    (measured from `since`). `launched`: nodes whose first link after that start is timed."""
    c = Convergence(since=since, timeout_s=timeout)
    launched = launched or {}
    polled_link: dict[int, float] = {}
    while True:
        snap = g.snapshot()
        c.polls += 1
        c.poll_s.append(snap.took_s)
        c.neighbours_max = max(c.neighbours_max, snap.neighbours)
        for i, st in snap.statuses.items():
            if st.get("links") and i in launched and i not in polled_link:
                polled_link[i] = snap.at + snap.took_s - launched[i].at
        linked = [i for i, st in snap.statuses.items() if st.get("links")]
        c.linked, c.running = len(linked), len(snap.running)
        if c.all_linked_s is None and snap.running and len(linked) == len(snap.running):
            c.all_linked_s = snap.at - since
        c.components = g.components(snap)
        c.ring_errors = g.ring_errors(snap)
        c.silent = snap.silent
        if len(c.components) == 1 and not c.ring_errors:
            c.converged_s = snap.at - since
            break
        if time.monotonic() - since >= timeout:
            break
        time.sleep(max(POLL_INTERVAL_S, 2 * snap.took_s))
    c.lab_neighbours = g.lab_neighbours()
    # The log's "link up" lines are to the millisecond; a poll only bounds the moment from above.
    for i, launch in launched.items():
        exact = g.first_link_from_log(launch)
        if exact is not None:
            c.first_link_s[i] = exact
        elif i in polled_link:
            c.first_link_s[i] = polled_link[i]
    return c


def reach(g: ScaleGroup, pairs: list[tuple[int, int]], since: float, timeout: float) -> Reach:
    """Ping each pair until it answers once or `timeout` (from now) passes; times are from `since`. A pair
    stops being pinged once either end is no longer running."""
    r = Reach(since, {p: None for p in pairs})
    deadline = time.monotonic() + timeout
    waiting = list(pairs)
    while waiting:
        results = g.ping_once(waiting)
        now = time.monotonic() - since
        for p, ok in results.items():
            if ok:
                r.answered[p] = now
        waiting = [
            (i, j) for i, j in waiting if r.answered[(i, j)] is None and g.members[i].running and g.members[j].running
        ]
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    return r


def idle_cost(g: ScaleGroup, window: float) -> Idle:
    """CPU of all running nodes and bytes they send on links over `window` seconds of nobody asking them
    anything (status is read only at both ends of the window)."""
    before = g.snapshot()
    counts_before = g.server_counts()
    cpu_before = g.usage(before.running)
    server_before = process_usage(g.server.pid) if g.server and g.server.pid else None
    time.sleep(window)
    cpu_after = g.usage(before.running)
    server_after = process_usage(g.server.pid) if g.server and g.server.pid else None
    after = g.snapshot()
    counts_after = g.server_counts()
    cpu = sum(cpu_after[i].cpu_s - cpu_before[i].cpu_s for i in cpu_after if i in cpu_before)
    sent = 0
    counters: dict[str, int] = {}
    for i, st in after.statuses.items():
        earlier_counts = before.statuses.get(i, {}).get("counters", {})
        for name, value in st["counters"].items():
            if isinstance(value, int) and value > earlier_counts.get(name, 0):
                counters[name] = counters.get(name, 0) + value - earlier_counts.get(name, 0)
        earlier = {r["peer_id"]: r["tx_bytes"] for r in before.statuses.get(i, {}).get("links", [])}
        sent += sum(r["tx_bytes"] - earlier[r["peer_id"]] for r in st["links"] if r["peer_id"] in earlier)
    server_cpu = server_after.cpu_s - server_before.cpu_s if server_before and server_after else None
    stanzas = (counts_after - counts_before).stanzas if counts_before and counts_after else -1
    nodes = len([i for i in cpu_after if i in cpu_before])
    return Idle(window, nodes, cpu, sent, server_cpu, stanzas, counters.get("rekeys started", 0), counters)


# -- the scenario of issue 7 ------------------------------------------------------------------------------


@dataclass
class Phase:
    """One disturbance and how the group came back from it."""

    name: str
    nodes: list[int]  # the nodes started, killed or restarted
    convergence: Convergence
    reach: Reach
    counts: ServerCounts | None  # what the server counted during the phase
    spread_s: float = 0.0
    stop_codes: dict[int, int | None] = field(default_factory=dict)
    host_cpu_percent: float | None = None  # the whole machine, % of one core, from the event to convergence

    @property
    def recovered_s(self) -> float | None:
        """Seconds until the ring was whole and every sampled pair had answered."""
        if self.convergence.converged_s is None or self.reach.last_s is None:
            return None
        return max(self.convergence.converged_s, self.reach.last_s)

    def summary(self) -> str:
        """One line: what the phase did and what it measured."""
        c, r = self.convergence, self.reach
        took = "not" if self.recovered_s is None else f"{self.recovered_s:.1f} s"
        return (
            f"{self.name} of {len(self.nodes)} nodes: {c.running} running, {c.linked} linked, "
            f"{len(c.components)} components, {len(c.ring_errors)} wrong rings, {r.ok}/{len(r.answered)} pairs; "
            f"ring whole {'never' if c.converged_s is None else f'at {c.converged_s:.1f} s'}, recovered {took}"
        )


class ScaleScenario:
    """Issue 7's run on a ScaleGroup, one phase at a time, each run once and kept:
    storm (all start within `spread`), kill (10 % SIGKILLed at once), restart (20 % restarted at once),
    idle (a quiet window, `idle_settle` seconds after the restart). Each phase runs the ones before it first."""

    def __init__(
        self,
        group: ScaleGroup,
        *,
        spread: float,
        storm_timeout: float,
        kill_timeout: float,
        restart_timeout: float,
        ping_timeout: float,
        idle_window: float,
        idle_settle: float = 0.0,
        kill_fraction: float = 0.10,
        restart_fraction: float = 0.20,
        on_phase: Callable[[Phase], None] | None = None,
    ) -> None:
        self.g = group
        self.spread = spread
        self.storm_timeout = storm_timeout
        self.kill_timeout = kill_timeout
        self.restart_timeout = restart_timeout
        self.ping_timeout = ping_timeout
        self.idle_window = idle_window
        self.idle_settle = idle_settle
        self.kill_fraction = kill_fraction
        self.restart_fraction = restart_fraction
        self.on_phase = on_phase
        self.rss_before_restart: dict[int, float] = {}
        self.rss_after_restart: dict[int, float] = {}
        self._storm: Phase | None = None
        self._kill: Phase | None = None
        self._restart: Phase | None = None
        self._idle: Idle | None = None

    def _done(self, phase: Phase) -> Phase:
        if self.on_phase is not None:
            self.on_phase(phase)
        return phase

    def storm(self) -> Phase:
        """Every member started within `spread`; converged within `storm_timeout`, then the pairs pinged."""
        if self._storm is None:
            g = self.g
            before = g.server_counts()
            busy = host_cpu_seconds()
            began, spread = g.start(range(g.size), self.spread)
            launched = {i: g.launches[i][-1] for i in range(g.size)}
            c, r, delta, host = self._recover(began, busy, before, self.storm_timeout, launched)
            phase = Phase("storm", list(range(g.size)), c, r, delta, spread_s=spread, host_cpu_percent=host)
            self._storm = self._done(phase)
        return self._storm

    def kill(self) -> Phase:
        """A random 10 % SIGKILLed at once; the survivors' ring and sampled pairs, timed from the kill."""
        if self._kill is None:
            self.storm()
            g = self.g
            victims = g.pick(self.kill_fraction)
            before = g.server_counts()
            busy, began = host_cpu_seconds(), time.monotonic()
            g.kill(victims)
            c, r, delta, host = self._recover(began, busy, before, self.kill_timeout)
            self._kill = self._done(Phase("kill", victims, c, r, delta, host_cpu_percent=host))
        return self._kill

    def restart(self) -> Phase:
        """A random 20 % SIGTERMed at once and started again at once with the same configs and keys."""
        if self._restart is None:
            self.kill()
            g = self.g
            chosen = g.pick(self.restart_fraction)
            stay = [i for i in g.running() if i not in chosen]
            self.rss_before_restart = {i: u.rss_mb for i, u in g.usage(stay).items()}
            before = g.server_counts()
            busy, began = host_cpu_seconds(), time.monotonic()
            codes = g.terminate(chosen)
            g.start(chosen, 0.0)
            launched = {i: g.launches[i][-1] for i in chosen}
            c, r, delta, host = self._recover(began, busy, before, self.restart_timeout, launched)
            self.rss_after_restart = {i: u.rss_mb for i, u in g.usage(stay).items()}
            phase = Phase("restart", chosen, c, r, delta, stop_codes=codes, host_cpu_percent=host)
            self._restart = self._done(phase)
        return self._restart

    def idle(self) -> Idle:
        if self._idle is None:
            self.restart()
            # Idle means settled: the restarted nodes' first minute (early record checks, join-time links
            # closing after 30 s unused) is not what a group costs while nothing happens.
            time.sleep(self.idle_settle)
            self._idle = idle_cost(self.g, self.idle_window)
        return self._idle

    def _recover(
        self,
        began: float,
        busy: float,
        before: ServerCounts | None,
        timeout: float,
        launched: dict[int, Launch] | None = None,
    ) -> tuple[Convergence, Reach, ServerCounts | None, float]:
        """After a phase's event at `began`: wait for one ring, then ping sampled pairs. Returns how the nodes
        converged, which pairs answered, what the server counted since `before`, and the machine's busy CPU
        (% of one core, from the host_cpu_seconds() reading `busy`) until convergence."""
        g = self.g
        c = converge(g, began, timeout, launched=launched)
        host = busy_percent(busy, began)
        r = reach(g, g.sample_pairs(), began, self._ping_time(began, timeout))
        counts = g.server_counts()
        delta = counts - before if counts and before else None
        return c, r, delta, host

    def _ping_time(self, began: float, timeout: float) -> float:
        """Pings get what is left of the phase's time, and never less than ping_timeout: a group that did not
        converge still shows how many of its pairs answer."""
        return max(self.ping_timeout, timeout - (time.monotonic() - began))
