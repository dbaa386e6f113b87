"""ScaleGroup: a Group whose many members start, crash and restart at once, read straight off their control sockets.

`ScaleGroup` is a `Group` (tests/support/group.py) that starts its nodes without waiting for each one, reads
their status straight from the control sockets (a Unix socket path works across network namespaces, so no CLI
process per query), kills and restarts a random share of them at once, and notices nodes that exit on their
own. It tells what went wrong from the nodes' statuses and logs. The host's neighbour-table thresholds are
raised for its lifetime (tests/support/hoststats.py). tests/support/scale.py runs issue 7's phases on it.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from overlay.control import ControlError, query
from overlay.identity import Identity
from overlay.ids import format_id, parse_id
from overlay.routing.ring import SortedRing
from tests.support.group import STOP_TIMEOUT_S, Group, printed_id
from tests.support.hoststats import (
    Usage,
    neighbour_table,
    process_usage,
    raised_neighbour_limits,
    wanted_neighbour_limits,
)
from tests.support.prosody import ServerCounts

if TYPE_CHECKING:
    from tests.support.scale import Convergence

# Our choices, sized for 2 cores: Popen calls in flight during a storm (each is a fork/exec of a few ms, so
# the bound never costs seconds per node), status queries and ping processes at once.
START_WORKERS = 4
QUERY_WORKERS = 16
PING_WORKERS = 32
# A node busy joining may answer its control socket late; one that takes longer is reported silent.
QUERY_TIMEOUT_S = 2.0
PING_WAIT_S = 1.0
# Issue 7's sample: 200 random pairs (all pairs when the group has fewer).
SAMPLE_PAIRS = 200
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
LINK_UP = "link up"
WORKDIR_PARENT = "/var/tmp"


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
        trust: bool = False,
        nat: bool = False,
    ) -> None:
        # A run lasts minutes; on this shared machine /tmp/ipop-* directories were removed from under running
        # labs by other jobs (twice while these runs were measured), so the default lives in /var/tmp.
        made_here = workdir is None
        workdir = workdir or Path(tempfile.mkdtemp(prefix="ipop-scale-", dir=WORKDIR_PARENT))
        # With `nat`: a third of the members behind an endpoint-independent NAT, a third behind a symmetric one,
        # the rest on the public segment, and coturn for STUN and TURN (tests/test_nat.py has the same NAT kinds).
        placement: list[str | None] = [(None, "a", "s")[i % 3] for i in range(size)] if nat else []
        super().__init__(
            size, prefix=prefix, workdir=workdir, verbose=verbose, trust=trust,
            clusters={"a": "cone", "s": "symmetric"} if nat else None,
            placement=placement or None, turn=nat, ice=nat,
        )  # fmt: skip
        self._own_workdir = made_here  # Group.close removes it then, unless IPOP_KEEP_WORKDIR is set
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
        wall, at = time.time(), time.monotonic()
        launch = Launch(i, self.spawn(i), wall, at)
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

    def _signal(self, indices: Iterable[int], sig: signal.Signals) -> list[Launch]:
        """Send `sig` by PID to the running nodes among `indices`, all at once; their ends are ours, not exits."""
        launches = [self.launches[i][-1] for i in indices if self.members[i].running]
        for launch in launches:
            launch.expected_exit = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(launch.process.pid, sig)
        return launches

    def kill(self, indices: Iterable[int]) -> None:
        """SIGKILL the nodes `indices` by PID, all at once (no goodbye), and reap them."""
        for launch in self._signal(indices, signal.SIGKILL):
            launch.process.wait(timeout=STOP_TIMEOUT_S)

    def terminate(self, indices: Iterable[int]) -> dict[int, int | None]:
        """SIGTERM the nodes `indices` by PID, all at once; wait (SIGKILL after STOP_TIMEOUT_S). Returns each
        one's exit status (None: it had to be killed)."""
        launches = self._signal(indices, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        codes: dict[int, int | None] = {}
        for launch in launches:
            p = launch.process
            try:
                codes[launch.index] = p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
                codes[launch.index] = None
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
                return self.status(i)
            except RuntimeError:
                return None

        with ThreadPoolExecutor(self.query_workers) as pool:
            answers = dict(zip(alive, pool.map(ask, alive), strict=True))
        statuses = {i: st for i, st in answers.items() if st is not None}
        silent = [i for i, st in answers.items() if st is None]
        return Snapshot(began, time.monotonic() - began, statuses, silent, neighbour_table()[0])

    def member_of(self, node_id: Any) -> int | None:
        """The member index with this node ID (as status prints it), None for an ID outside the group."""
        return self._by_id.get(printed_id(node_id))

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
        index = {node_id: i for i, node_id in ids.items()}
        ring = SortedRing(ids.values())
        wrong: dict[int, str] = {i: "no status" for i in snap.silent}
        if len(ids) < 2:
            return wrong
        for i, st in snap.statuses.items():
            want_s, want_p = index[ring.successors(ids[i], 1)[0]], index[ring.predecessors(ids[i], 1)[0]]
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

    # -- pinging --------------------------------------------------------------------------------------------

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
_LOGGED = re.compile(LOG_TIME.pattern + r"[A-Z]+ ")
_FAILURE = re.compile(r"^(WARNING|ERROR|CRITICAL) |^\w+(\.\w+)*(Error|Exception): |^ipop-overlay: ")
_CHURN = re.compile(r"link (up|down): ")
REPEATED = 3

_MASKS = [
    (LOG_TIME, ""),  # the log line's time
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
