"""Many real members at once: join storms, crashes and restart storms of `ipop-overlay join` processes, measured.

`ScaleGroup` is a `Group` (tests/support/group.py) that starts its nodes without waiting for each one, reads
their status straight from the control sockets (a Unix socket path works across network namespaces, so no CLI
process per query), kills and restarts a random share of them at once, and notices nodes that exit on their
own. `ScaleScenario` runs the phases of issue 7 in order (storm, kill 10 %, restart 20 %, idle) and keeps what
each measured; tests/test_scale.py asserts on it and bench/scale.py prints it.

The kernel's IPv4 neighbour (ARP) table is one table for all namespaces, capped host-wide by
net.ipv4.neigh.default.gc_thresh3 (1024 here): a 100-namespace lab with ~12 links per node passes it and sends
fail with EHOSTUNREACH (shared/ARCHITECTURE.md, "Measured facts"). `raised_neighbour_limits` raises the
thresholds for the run and puts the old values back afterwards; every snapshot records the entry count.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from overlay.control import ControlError, query
from overlay.identity import Identity
from overlay.ids import format_id, parse_id
from tests.support.group import STOP_TIMEOUT_S, Group, cli_argv
from tests.support.prosody import ServerCounts

NEIGH_SYSCTL = Path("/proc/sys/net/ipv4/neigh/default")
ARP_STATS = Path("/proc/net/stat/arp_cache")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Our choices, sized for 2 cores: Popen calls in flight during a storm (each is a fork/exec of a few ms, so
# the bound never costs seconds per node), status queries and ping processes at once.
START_WORKERS = 4
QUERY_WORKERS = 16
PING_WORKERS = 32
# A node busy joining may answer its control socket late; one that takes longer is reported silent.
QUERY_TIMEOUT_S = 2.0
PING_WAIT_S = 1.0
POLL_INTERVAL_S = 0.5
# Issue 7's sample: 200 random pairs (all pairs when the group has fewer).
SAMPLE_PAIRS = 200
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
LINK_UP = "link up"
WORKDIR_PARENT = "/var/tmp"


# -- the host's neighbour table ---------------------------------------------------------------------------


def neighbour_limits() -> tuple[int, int, int]:
    """net.ipv4.neigh.default.gc_thresh1/2/3, which apply to all namespaces together."""
    a, b, c = (int((NEIGH_SYSCTL / f"gc_thresh{k}").read_text()) for k in (1, 2, 3))
    return a, b, c


def _write_limits(values: tuple[int, int, int]) -> None:
    for k, value in enumerate(values, start=1):
        (NEIGH_SYSCTL / f"gc_thresh{k}").write_text(f"{value}\n")


def neighbour_table() -> tuple[int, int]:
    """(entries, table_fulls): the IPv4 neighbour table's entry count across all namespaces, and how often it
    was full (summed over CPUs) since boot. From /proc/net/stat/arp_cache (hex columns)."""
    lines = ARP_STATS.read_text().split("\n")
    names = lines[0].split()
    rows = [[int(v, 16) for v in line.split()] for line in lines[1:] if line.strip()]
    entries = rows[0][names.index("entries")]  # the table's count, repeated on every CPU's row
    fulls = sum(r[names.index("table_fulls")] for r in rows)
    return entries, fulls


def wanted_neighbour_limits(nodes: int) -> tuple[int, int, int]:
    """Thresholds for a lab of `nodes`: a full mesh needs nodes * (nodes - 1) entries (plus the server's),
    so gc never has to evict a live entry; never below the kernel defaults."""
    mesh = nodes * nodes + 64
    return max(128, mesh), max(512, 2 * mesh), max(1024, 4 * mesh)


@contextlib.contextmanager
def raised_neighbour_limits(wanted: tuple[int, int, int]) -> Iterator[tuple[int, int, int]]:
    """Raise gc_thresh1/2/3 to at least `wanted` for the `with` block; yield the previous values.

    On exit (also on failure) the previous values come back, unless something else changed them meanwhile
    (a concurrent lab that raised them too): then they are left as found.
    """
    before = neighbour_limits()
    raised = (max(before[0], wanted[0]), max(before[1], wanted[1]), max(before[2], wanted[2]))
    if raised != before:
        _write_limits(raised)
    try:
        yield before
    finally:
        if raised != before and neighbour_limits() == raised:
            _write_limits(before)


# -- processes --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    """One process's resident memory and CPU time, from /proc."""

    rss_mb: float
    cpu_s: float


def process_usage(pid: int) -> Usage | None:
    """VmRSS (/proc/PID/status) and utime+stime (/proc/PID/stat fields 14-15); None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": field 3 (state) is fields[0]
    cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    rss_kb = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return Usage(rss_kb / 1024, cpu)


def host_cpu_seconds() -> float:
    """CPU seconds all cores of this machine spent busy since boot (/proc/stat: all but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLOCK_TICKS


@dataclass
class Launch:
    """One start of a member's node process."""

    index: int
    process: subprocess.Popen[bytes]
    wall: float  # time.time() just before the process was started (node logs carry wall-clock times)
    at: float  # time.monotonic() of the same moment
    expected_exit: bool = False  # we signalled it
    ended: float | None = None  # time.monotonic() when its end was first noticed


@dataclass(frozen=True)
class Exit:
    """A node process that ended without being told to."""

    index: int
    pid: int
    returncode: int | None
    after_s: float
    log_tail: str


# -- measurements -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """The status of every running node at one moment (those that did not answer are `silent`)."""

    at: float
    took_s: float
    statuses: dict[int, dict[str, Any]]
    silent: list[int]
    neighbours: int  # neighbour table entries, all namespaces

    @property
    def running(self) -> list[int]:
        return sorted([*self.statuses, *self.silent])


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

    @property
    def cpu_percent_of_core(self) -> float:
        return 100.0 * self.cpu_s / self.window_s

    @property
    def tx_bytes_per_node_s(self) -> float:
        return self.tx_bytes / self.window_s / max(1, self.nodes)


def union_components(nodes: Iterable[int], edges: Iterable[tuple[int, int]]) -> list[list[int]]:
    """Connected components (largest first) of `nodes` joined by `edges` (edges to other nodes ignored)."""
    parent = {n: n for n in nodes}

    def find(n: int) -> int:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for a, b in edges:
        if a in parent and b in parent:
            parent[find(a)] = find(b)
    groups: dict[int, list[int]] = {}
    for n in parent:
        groups.setdefault(find(n), []).append(n)
    return sorted((sorted(g) for g in groups.values()), key=lambda g: (-len(g), g))


def ring_neighbours(ids: dict[int, int]) -> dict[int, tuple[int, int]]:
    """For members {index: node ID}: each one's true (successor, predecessor) clockwise on the ring."""
    order = sorted(ids, key=lambda i: ids[i])
    n = len(order)
    return {order[k]: (order[(k + 1) % n], order[(k - 1) % n]) for k in range(n)}


def median(values: Iterable[float]) -> float | None:
    data = list(values)
    return statistics.median(data) if data else None


# -- the group --------------------------------------------------------------------------------------------


class ScaleGroup(Group):
    """A Group of `size` members for join storms, crashes and restart storms; see the module docstring."""

    def __init__(
        self,
        size: int,
        *,
        prefix: str = "isc",
        workdir: Path | None = None,
        verbose: bool = False,
        seed: int | None = None,
        start_workers: int = START_WORKERS,
        query_workers: int = QUERY_WORKERS,
        ping_workers: int = PING_WORKERS,
    ) -> None:
        # A run lasts minutes; on this shared machine /tmp/ipop-* directories were removed from under running
        # labs by other jobs (twice while these runs were measured), so the default lives in /var/tmp.
        self._own_scale_workdir = workdir is None
        workdir = workdir or Path(tempfile.mkdtemp(prefix="ipop-scale-", dir=WORKDIR_PARENT))
        super().__init__(size, prefix=prefix, workdir=workdir, verbose=verbose)
        self.seed = random.randrange(1 << 32) if seed is None else seed
        self.rng = random.Random(self.seed)
        self.start_workers = start_workers
        self.query_workers = query_workers
        self.ping_workers = ping_workers
        self.launches: dict[int, list[Launch]] = {i: [] for i in range(size)}
        self.neighbour_limits_before: tuple[int, int, int] | None = None
        self._limits: contextlib.ExitStack = contextlib.ExitStack()
        self._by_id: dict[str, int] = {}
        self.counts_at_build: ServerCounts | None = None  # the room's creation only: one admin session

    def __enter__(self) -> ScaleGroup:
        try:
            self.neighbour_limits_before = self._limits.enter_context(
                raised_neighbour_limits(wanted_neighbour_limits(self.size))
            )
            super().__enter__()
        except BaseException:
            self.close()
            raise
        self._by_id = {m.node_id: m.index for m in self.members}
        self.counts_at_build = self.server_counts()
        return self

    def close(self) -> None:
        for launches in self.launches.values():
            for launch in launches:
                launch.expected_exit = True
        try:
            super().close()
        finally:
            self._limits.close()
            if self._own_scale_workdir and not os.environ.get("IPOP_KEEP_WORKDIR"):
                shutil.rmtree(self.workdir, ignore_errors=True)

    def keygen(self, path: Path) -> str:
        """The key `ipop-overlay keygen` writes (same code, overlay.identity), without a process per member."""
        identity = Identity.generate()
        identity.save(path)
        return format_id(identity.node_id)

    def status(self, i: int) -> dict[str, Any]:
        """Node i's status straight from its control socket (RuntimeError when it does not answer)."""
        try:
            return query(self.members[i].control, timeout=QUERY_TIMEOUT_S)
        except ControlError as exc:
            raise RuntimeError(f"status of node {i}: {exc}") from None

    # -- starting and stopping ----------------------------------------------------------------------------

    def running(self) -> list[int]:
        return [m.index for m in self.members if m.running]

    def _launch(self, i: int) -> Launch:
        m = self.members[i]
        with open(m.log, "ab") as log:
            wall, at = time.time(), time.monotonic()
            m.process = self.lab.popen(
                m.host, *cli_argv(), "join", "--config", str(m.config),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        launch = Launch(i, m.process, wall, at)
        self.launches[i].append(launch)
        return launch

    def start(self, indices: Iterable[int], spread: float) -> tuple[float, float]:
        """Start the nodes `indices` in random order, evenly over `spread` seconds, without waiting for any
        of them to join. Returns (monotonic time of the first start, seconds between first and last start)."""
        order = list(indices)
        for i in order:
            if self.members[i].running:
                raise ValueError(f"node {i} is already running")
        self.rng.shuffle(order)
        began = time.monotonic()
        step = spread / max(1, len(order) - 1)

        def launch_at(k: int, i: int) -> float:
            delay = began + k * step - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            return self._launch(i).at

        with ThreadPoolExecutor(self.start_workers) as pool:
            starts = list(pool.map(launch_at, range(len(order)), order))
        self.say(f"started {len(order)} nodes over {max(starts) - min(starts):.1f} s")
        return min(starts), max(starts) - min(starts)

    def kill(self, indices: Iterable[int]) -> None:
        """SIGKILL the nodes `indices` by PID, all at once (no goodbye), and reap them."""
        victims = [self.members[i] for i in indices if self.members[i].running]
        for m in victims:
            self.launches[m.index][-1].expected_exit = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.launches[m.index][-1].process.pid, signal.SIGKILL)
        for m in victims:
            self.launches[m.index][-1].process.wait(timeout=STOP_TIMEOUT_S)

    def terminate(self, indices: Iterable[int]) -> dict[int, int | None]:
        """SIGTERM the nodes `indices` by PID, all at once; wait (SIGKILL after STOP_TIMEOUT_S). Returns each
        one's exit status (None: it had to be killed)."""
        victims = [self.members[i] for i in indices if self.members[i].running]
        for m in victims:
            self.launches[m.index][-1].expected_exit = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.launches[m.index][-1].process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        codes: dict[int, int | None] = {}
        for m in victims:
            p = self.launches[m.index][-1].process
            try:
                codes[m.index] = p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
                codes[m.index] = None
        return codes

    def pick(self, fraction: float) -> list[int]:
        """A random `fraction` of the running nodes (at least one)."""
        alive = self.running()
        count = min(len(alive), max(1, round(fraction * len(alive))))
        return sorted(self.rng.sample(alive, count))

    def exits(self) -> list[Exit]:
        """Every node process that ended on its own so far, with its log's last lines."""
        found = []
        self._notice_ends()
        for i, launches in self.launches.items():
            for launch in launches:
                code = launch.process.poll()
                if code is None or launch.expected_exit:
                    continue
                ended = launch.ended or time.monotonic()
                found.append(Exit(i, launch.process.pid, code, ended - launch.at, self.log_tail(i, 12)))
        return found

    def _notice_ends(self) -> None:
        now = time.monotonic()
        for launches in self.launches.values():
            launch = launches[-1] if launches else None
            if launch is not None and launch.ended is None and launch.process.poll() is not None:
                launch.ended = now

    # -- looking at the nodes -----------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """Status of every running node, queried in parallel over the control sockets."""
        self._notice_ends()
        alive = self.running()
        began = time.monotonic()

        def ask(i: int) -> dict[str, Any] | None:
            try:
                return query(self.members[i].control, timeout=QUERY_TIMEOUT_S)
            except ControlError:
                return None

        with ThreadPoolExecutor(self.query_workers) as pool:
            answers = dict(zip(alive, pool.map(ask, alive), strict=True))
        statuses = {i: st for i, st in answers.items() if st is not None}
        silent = [i for i, st in answers.items() if st is None]
        return Snapshot(began, time.monotonic() - began, statuses, silent, neighbour_table()[0])

    def member_of(self, node_id: Any) -> int | None:
        """The member index with this node ID (as status prints it), None for an ID outside the group."""
        text = f"{node_id:016x}" if isinstance(node_id, int) else str(node_id).lower()
        return self._by_id.get(text)

    def components(self, snap: Snapshot) -> list[list[int]]:
        """Overlay components among the running nodes, joined by every link any of them reports."""
        edges = []
        for i, st in snap.statuses.items():
            for row in st.get("links", []):
                j = self.member_of(row["peer_id"])
                if j is not None:
                    edges.append((i, j))
        return union_components(snap.running, edges)

    def ring_errors(self, snap: Snapshot) -> dict[int, str]:
        """Running nodes whose first successor or predecessor is not the true one among the running nodes'
        IDs (silent nodes count as wrong: nobody can tell)."""
        ids = {i: parse_id(self.members[i].node_id) for i in snap.running}
        truth = ring_neighbours(ids)
        wrong: dict[int, str] = {i: "no status" for i in snap.silent}
        if len(ids) < 2:
            return wrong
        for i, st in snap.statuses.items():
            want_s, want_p = truth[i]
            have_s = self.member_of(st["successors"][0]) if st.get("successors") else None
            have_p = self.member_of(st["predecessors"][0]) if st.get("predecessors") else None
            if (have_s, have_p) != (want_s, want_p):
                wrong[i] = f"succ {_name(have_s)} want node{want_s}, pred {_name(have_p)} want node{want_p}"
        return wrong

    def lab_neighbours(self) -> int:
        """Neighbour entries in this lab's own namespaces (the host-wide count also holds other labs')."""

        def count(netns: str) -> int:
            out = subprocess.run(
                ["ip", "-n", netns, "-4", "neigh", "show"], capture_output=True, text=True, check=False
            )
            return len(out.stdout.splitlines())

        with ThreadPoolExecutor(self.query_workers) as pool:
            return sum(pool.map(count, [h.netns for h in self.lab.hosts]))

    def first_link_from_log(self, launch: Launch) -> float | None:
        """Seconds from `launch` to the node's first "link up" line after it (node logs carry wall times)."""
        try:
            text = self.members[launch.index].log.read_text(errors="replace")
        except OSError:
            return None
        for line in text.splitlines():
            if LINK_UP not in line:
                continue
            m = LOG_TIME.match(line)
            if m is None:
                continue
            stamp = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if stamp >= launch.wall - 0.001:  # the log's milliseconds are truncated
                return max(0.0, stamp - launch.wall)
        return None

    def usage(self, indices: Iterable[int] | None = None) -> dict[int, Usage]:
        """RSS and CPU seconds of the running nodes (or of `indices` among them)."""
        chosen = self.running() if indices is None else [i for i in indices if self.members[i].running]
        found = {}
        for i in chosen:
            u = process_usage(self.launches[i][-1].process.pid)
            if u is not None:
                found[i] = u
        return found

    def server_counts(self) -> ServerCounts | None:
        """Stanzas and logins counted by Prosody itself; None when the server cannot be read."""
        if self.server is None:
            return None
        try:
            return self.server.counts()
        except (RuntimeError, OSError, subprocess.TimeoutExpired):
            return None

    # -- waiting --------------------------------------------------------------------------------------------

    def converge(self, since: float, timeout: float, *, launched: dict[int, Launch] | None = None) -> Convergence:
        """Poll every running node until all are in one component with a whole ring, or `timeout` passes
        (measured from `since`). `launched`: nodes whose first link after that start is timed."""
        c = Convergence(since=since, timeout_s=timeout)
        launched = launched or {}
        polled_link: dict[int, float] = {}
        while True:
            snap = self.snapshot()
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
            c.components = self.components(snap)
            c.ring_errors = self.ring_errors(snap)
            c.silent = snap.silent
            if len(c.components) == 1 and not c.ring_errors:
                c.converged_s = snap.at - since
                break
            if time.monotonic() - since >= timeout:
                break
            time.sleep(max(POLL_INTERVAL_S, 2 * snap.took_s))
        c.lab_neighbours = self.lab_neighbours()
        # The log's "link up" lines are to the millisecond; a poll only bounds the moment from above.
        for i, launch in launched.items():
            exact = self.first_link_from_log(launch)
            if exact is not None:
                c.first_link_s[i] = exact
            elif i in polled_link:
                c.first_link_s[i] = polled_link[i]
        return c

    def sample_pairs(self, count: int = SAMPLE_PAIRS) -> list[tuple[int, int]]:
        """`count` random ordered pairs of running nodes (all of them when there are fewer)."""
        pairs = self.running_pairs()
        return pairs if len(pairs) <= count else sorted(self.rng.sample(pairs, count))

    def ping_once(self, pairs: list[tuple[int, int]], wait: float = PING_WAIT_S) -> dict[tuple[int, int], bool]:
        """One ping per pair (i's namespace to j's virtual address), at most `ping_workers` processes at once."""

        def ping(pair: tuple[int, int]) -> bool:
            i, j = pair
            argv = ["ip", "netns", "exec", self.members[i].host.netns,
                    "ping", "-n", "-q", "-c", "1", "-W", f"{wait:g}", self.members[j].ip]  # fmt: skip
            try:
                out = subprocess.run(argv, capture_output=True, timeout=wait + 5, check=False)
            except subprocess.TimeoutExpired:
                return False
            return out.returncode == 0

        with ThreadPoolExecutor(self.ping_workers) as pool:
            return dict(zip(pairs, pool.map(ping, pairs), strict=True))

    def reach(self, pairs: list[tuple[int, int]], since: float, timeout: float) -> Reach:
        """Ping each pair until it answers once or `timeout` (from now) passes; times are from `since`."""
        r = Reach(since, {p: None for p in pairs})
        deadline = time.monotonic() + timeout
        waiting = list(pairs)
        while waiting:
            results = self.ping_once(waiting)
            now = time.monotonic() - since
            for p, ok in results.items():
                if ok:
                    r.answered[p] = now
            waiting = [p for p in waiting if r.answered[p] is None and self._both_running(p)]
            if not waiting or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        return r

    def _both_running(self, pair: tuple[int, int]) -> bool:
        return self.members[pair[0]].running and self.members[pair[1]].running

    def idle(self, window: float) -> Idle:
        """CPU of all running nodes and bytes they send on links over `window` seconds of nobody asking them
        anything (status is read only at both ends of the window)."""
        before = self.snapshot()
        counts_before = self.server_counts()
        cpu_before = self.usage(before.running)
        server_before = process_usage(self.server.pid) if self.server and self.server.pid else None
        time.sleep(window)
        cpu_after = self.usage(before.running)
        server_after = process_usage(self.server.pid) if self.server and self.server.pid else None
        after = self.snapshot()
        counts_after = self.server_counts()
        cpu = sum(cpu_after[i].cpu_s - cpu_before[i].cpu_s for i in cpu_after if i in cpu_before)
        sent = 0
        for i, st in after.statuses.items():
            earlier = {r["peer_id"]: r["tx_bytes"] for r in before.statuses.get(i, {}).get("links", [])}
            sent += sum(r["tx_bytes"] - earlier[r["peer_id"]] for r in st["links"] if r["peer_id"] in earlier)
        server_cpu = server_after.cpu_s - server_before.cpu_s if server_before and server_after else None
        stanzas = (counts_after - counts_before).stanzas if counts_before and counts_after else -1
        nodes = len([i for i in cpu_after if i in cpu_before])
        return Idle(window, nodes, cpu, sent, server_cpu, stanzas)

    # -- telling what happened -------------------------------------------------------------------------------

    def describe(
        self,
        c: Convergence | None = None,
        failed: Iterable[tuple[int, int]] = (),
        tails: int = 4,
        *,
        whole_group: bool = True,
    ) -> str:
        """A failure message: components, ring errors, unanswered pairs, the tails of the logs of the nodes
        involved and, with `whole_group`, exited nodes and the commonest warnings of all logs."""
        lines = []
        if c is not None:
            sizes = [len(g) for g in c.components]
            lines.append(f"{c.running} running, {c.linked} with >= 1 link, components by size {sizes}")
            for g in c.components[1:6]:
                lines.append(f"  small component: {', '.join(f'node{i}' for i in g)}")
            for i, why in sorted(c.ring_errors.items())[:10]:
                lines.append(f"  ring node{i}: {why}")
            if len(c.ring_errors) > 10:
                lines.append(f"  ... and {len(c.ring_errors) - 10} more nodes with a wrong ring")
        failed = list(failed)
        if failed:
            lines.append(f"pairs without a reply ({len(failed)}): {failed[:20]}")
        for e in self.exits()[:tails] if whole_group else []:
            lines.append(f"node{e.index} (pid {e.pid}) exited {e.returncode} after {e.after_s:.0f} s:\n{e.log_tail}")
        # The nodes in most unanswered pairs first (one unreachable node fails every pair it is in), then
        # those with a wrong ring.
        involved = Counter(i for pair in failed for i in pair)
        shown = [i for i, _ in involved.most_common(tails)]
        shown += [i for i in (c.ring_errors if c else {}) if i not in shown][: max(0, tails - len(shown))]
        for i in shown:
            lines.append(f"node{i} {self.members[i].node_id} drops {self.drops(i)}; log tail:\n{self.log_tail(i, 8)}")
        digest = self.log_digest() if whole_group else []
        if digest:
            lines.append("warnings and errors in all node logs (nodes / lines):")
            lines += [f"  {nodes:4d} / {count:5d}  {text}" for text, nodes, count in digest]
        return "\n".join(lines)

    def drops(self, i: int) -> dict[str, int] | str:
        """Node i's non-zero "drop: ..." counters from its status (why packets went nowhere)."""
        try:
            counters = self.status(i).get("counters", {})
        except RuntimeError as exc:
            return str(exc)
        return {k: v for k, v in counters.items() if k.startswith("drop") and v}

    def log_digest(self, top: int = 10) -> list[tuple[str, int, int]]:
        """What went wrong, read from every node log with IDs, addresses and numbers masked: warnings, errors,
        exceptions and the CLI's one-line errors, and any other line one node logged 3 times or more (a retry
        loop; "link up/down" excepted, that is normal churn). (text, nodes that logged it, times)."""
        lines: Counter[str] = Counter()
        nodes: Counter[str] = Counter()
        for m in self.members:
            try:
                text = m.log.read_text(errors="replace")
            except OSError:
                continue
            seen = Counter(_mask(line) for line in text.splitlines() if _LOGGED.match(line) or _FAILURE.match(line))
            notable = {t: n for t, n in seen.items() if _FAILURE.match(t) or (n >= REPEATED and not _CHURN.search(t))}
            lines.update(notable)
            nodes.update(notable.keys())
        return [(text, nodes[text], count) for text, count in lines.most_common(top)]


# A log line (cli.py's format: time, level, logger, message), a line that reports a failure (at WARNING and
# above once masked, an exception's last line, or the CLI's one-line error), and the link churn of a healthy node.
_LOGGED = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")
_FAILURE = re.compile(r"^(WARNING|ERROR|CRITICAL) |^\w+(\.\w+)*(Error|Exception): |^ipop-overlay: ")
_CHURN = re.compile(r"link (up|down): ")
REPEATED = 3

_MASKS = [
    (re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} "), ""),  # the log line's time
    (re.compile(r"\b[0-9a-f]{16}\b"), "<id>"),
    (re.compile(r"\b\d+(\.\d+){3}(:\d+)?\b"), "<addr>"),
    (re.compile(r"\b\d+(\.\d+)?\b"), "<n>"),
]


def _mask(line: str) -> str:
    for pattern, repl in _MASKS:
        line = pattern.sub(repl, line)
    return line.strip()[:160]


def _name(i: int | None) -> str:
    return "none" if i is None else f"node{i}"


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
    idle (a quiet window). Each phase runs the ones before it first."""

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
            c = g.converge(began, self.storm_timeout, launched=launched)
            host = _busy_percent(busy, began)
            r = g.reach(g.sample_pairs(), began, self._ping_time(began, self.storm_timeout))
            counts = g.server_counts()
            delta = counts - before if counts and before else None
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
            c = g.converge(began, self.kill_timeout)
            host = _busy_percent(busy, began)
            r = g.reach(g.sample_pairs(), began, self._ping_time(began, self.kill_timeout))
            counts = g.server_counts()
            delta = counts - before if counts and before else None
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
            c = g.converge(began, self.restart_timeout, launched=launched)
            host = _busy_percent(busy, began)
            r = g.reach(g.sample_pairs(), began, self._ping_time(began, self.restart_timeout))
            counts = g.server_counts()
            self.rss_after_restart = {i: u.rss_mb for i, u in g.usage(stay).items()}
            delta = counts - before if counts and before else None
            phase = Phase("restart", chosen, c, r, delta, stop_codes=codes, host_cpu_percent=host)
            self._restart = self._done(phase)
        return self._restart

    def idle(self) -> Idle:
        if self._idle is None:
            self.restart()
            self._idle = self.g.idle(self.idle_window)
        return self._idle

    def _ping_time(self, began: float, timeout: float) -> float:
        """Pings get what is left of the phase's time, and never less than ping_timeout: a group that did not
        converge still shows how many of its pairs answer."""
        return max(self.ping_timeout, timeout - (time.monotonic() - began))


def _busy_percent(cpu_before: float, since: float) -> float:
    """The machine's busy CPU since `since` (monotonic) as % of one core, from a host_cpu_seconds() reading."""
    return 100.0 * (host_cpu_seconds() - cpu_before) / max(1e-6, time.monotonic() - since)
