"""Churn on a virtual clock: nodes join and leave with Weibull session times, and each node's own
`Maintenance` rules (overlay/routing/maintenance.py) repair the ring and the long links.

Every node is a real `RingTable` + `Maintenance` pair, fed the events a node driver would feed it and
acting on what `tick(now)` returns; this module plays the network between them (the in-memory transport's
role): a link opens when both ends are alive, a crashed node answers nothing, a lookup for a long link is
routed hop by hop with `decide`, and the node that ends it accepts while it is under its incoming cap.

Session times: Weibull with shape < 1 is heavy-tailed, as measured in deployed peer-to-peer systems
(Stutzbach and Rejaie, "Understanding churn in peer-to-peer networks", IMC 2006: shapes 0.34-0.59).
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from overlay.routing.forwarding import Deliver, NeighboursOf, walk
from overlay.routing.maintenance import (
    DEAD_REASONS,
    CloseLink,
    FindLong,
    Maintenance,
    OpenLink,
    Ping,
    SendNeighbours,
    TellUse,
)
from overlay.routing.ring import RingParams, RingTable, Role

# Our choices: a joining node gets this many bootstrap contacts from XMPP; ticks that an event asks for run
# this long after it (a node reacts to a new link within a scheduling step, not in the same instant).
BOOTSTRAP_CONTACTS = 3
REACT_DELAY = 0.01


@dataclass(frozen=True)
class ChurnConfig:
    nodes: int = 300  # population the join rate aims at
    params: RingParams = field(default_factory=RingParams)
    duration: float = 1800.0  # virtual seconds of churn after the warm-up
    warmup: float = 300.0  # initial joins are spread over this long; nobody leaves before it ends
    weibull_shape: float = 0.5
    weibull_scale: float = 1800.0  # seconds; mean session = scale * Gamma(1 + 1/shape)
    rejoin_delay: float = 30.0  # mean seconds before a departed node is replaced by a new one
    sample_every: float = 30.0
    sample_pairs: int = 200
    settle: float = 120.0  # after churn stops: repair time before the full reachability check
    final_pairs: int = 5000  # pairs checked at the end (all pairs when fewer exist)
    seed: int = 1
    promise: bool = True  # route samples with the data rule the node uses by default (promise, strict after)


@dataclass
class Member:
    table: RingTable
    maint: Maintenance
    tick_at: float = math.inf


class ChurnSim:
    def __init__(self, cfg: ChurnConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.members: dict[int, Member] = {}
        self.events: list[tuple[float, int, str, int]] = []
        self._seq = 0
        self.now = 0.0
        self.messages = 0
        self.node_seconds = 0.0
        self._alive_since: dict[int, float] = {}
        self.samples: list[dict[str, float]] = []
        self._last_sample = (0, 0.0)
        self.joins = 0
        self.actions: dict[str, int] = {}  # maintenance actions taken, by kind
        self.leaves = 0

    # -- the event queue --------------------------------------------------------------------------------
    def _push(self, at: float, kind: str, node: int = 0) -> None:
        self._seq += 1
        heapq.heappush(self.events, (at, self._seq, kind, node))

    def _wake(self, node: int, at: float) -> None:
        m = self.members.get(node)
        if m is not None and at < m.tick_at:
            m.tick_at = at
            self._push(at, "tick", node)

    def session(self) -> float:
        return self.cfg.weibull_scale * self.rng.weibullvariate(1.0, self.cfg.weibull_shape)

    # -- membership ---------------------------------------------------------------------------------------
    def join(self) -> int:
        node = self.rng.getrandbits(64)
        while node in self.members:
            node = self.rng.getrandbits(64)
        table = RingTable(node, self.cfg.params)
        contacts = self.rng.sample(sorted(self.members), min(BOOTSTRAP_CONTACTS, len(self.members)))
        table.learn(contacts)
        self.members[node] = Member(table, Maintenance(table, random.Random(self.rng.getrandbits(64))))
        self._alive_since[node] = self.now
        self.joins += 1
        self._wake(node, self.now)
        return node

    def leave(self, node: int) -> None:
        """A crash: the node answers nothing from now on; its peers find out by their keepalives."""
        if self.members.pop(node, None) is not None:
            self.leaves += 1
            self.node_seconds += self.now - self._alive_since.pop(node)

    # -- the network between the nodes ---------------------------------------------------------------------
    def _link(self, a: int, b: int, role_a: Role = Role.NONE, role_b: Role = Role.NONE) -> None:
        ma, mb = self.members[a], self.members[b]
        new = not ma.table.is_linked(b)
        ma.table.add_link(b, role_a)
        mb.table.add_link(a, role_b)
        if new:
            ma.maint.on_link_up(b, self.now)
            mb.maint.on_link_up(a, self.now)
            self._wake(a, self.now + REACT_DELAY)
            self._wake(b, self.now + REACT_DELAY)

    def _unlink(self, a: int, b: int, *, dead: bool = False) -> None:
        """`a` closes its link to `b`; `dead`: a closed it because b stopped answering keepalives."""
        for x, y in ((a, b), (b, a)):
            m = self.members.get(x)
            if m is not None and m.table.is_linked(y):
                m.table.remove_link(y)
                m.maint.on_link_down(y, self.now, dead=dead and x == a)
                self._wake(x, self.now + REACT_DELAY)

    def _apply(self, node: int, action: object) -> None:
        me = self.members[node]
        kind = type(action).__name__
        self.actions[kind] = self.actions.get(kind, 0) + 1
        if isinstance(action, OpenLink):
            self.messages += 1
            if action.peer in self.members and action.peer != node:
                self._link(node, action.peer)
            else:
                me.maint.on_attempt_failed(action.peer, self.now)
        elif isinstance(action, CloseLink):
            self.messages += 1
            self._unlink(node, action.peer, dead=action.reason in DEAD_REASONS)
        elif isinstance(action, Ping):
            peer = self.members.get(action.peer)
            self.messages += 1
            if peer is not None and peer.table.is_linked(node):
                self.messages += 1
                me.maint.on_rx(action.peer, self.now)
                peer.maint.on_rx(node, self.now)
        elif isinstance(action, SendNeighbours):
            for p in action.peers:
                self.messages += 1
                peer = self.members.get(p)
                if peer is not None and peer.table.is_linked(node):
                    peer.maint.on_neighbours(node, list(action.neighbours), self.now)
                    peer.maint.on_rx(node, self.now)
        elif isinstance(action, FindLong):
            self._find_long(node, action.slot, action.target)
        elif isinstance(action, TellUse):
            self.messages += 1
            peer = self.members.get(action.peer)
            if peer is not None and peer.table.is_linked(node):
                peer.maint.on_peer_use(node, action.use)

    def _find_long(self, node: int, slot: int, target: int) -> None:
        """Route a lookup for `target` through the tables; the node it ends at links back if it accepts."""
        path, delivered = self.route(node, target, exact=False)
        self.messages += 2 * (len(path) - 1) + 1
        me = self.members[node]
        end = path[-1]
        if not delivered or end == node or end not in self.members:
            me.maint.on_long_found(slot, None, self.now)
            return
        # The found node applies its incoming cap (RingTable.accepts_incoming_long), linked already or not.
        if not self.members[end].table.accepts_incoming_long():
            me.maint.on_long_found(slot, None, self.now)
            return
        self._link(node, end, Role.LONG_OUT, Role.LONG_IN)
        me.maint.on_long_found(slot, end, self.now)

    def route(self, src: int, target: int, *, exact: bool) -> tuple[list[int], bool]:
        """The node's decide() at every hop on that node's own table; a hop to a crashed node is lost."""

        def view(node: int) -> tuple[Iterable[int], NeighboursOf | None]:
            t = self.members[node].table
            return t.neighbours(), t.neighbours_of

        path, d = walk(src, target, exact=exact, view=view, alive=self.members.__contains__, promise=self.cfg.promise)
        return path, isinstance(d, Deliver)

    # -- measurement -------------------------------------------------------------------------------------
    def sample(self, pairs: int) -> float:
        alive = sorted(self.members)
        if len(alive) < 2:
            return math.nan
        ok = 0
        for _ in range(pairs):
            a, b = self.rng.sample(alive, 2)
            path, delivered = self.route(a, b, exact=True)
            ok += delivered and path[-1] == b
        return ok / pairs

    def all_pairs_success(self, limit: int) -> float:
        alive = sorted(self.members)
        pairs = [(a, b) for a in alive for b in alive if a != b]
        if len(pairs) > limit:
            pairs = self.rng.sample(pairs, limit)
        ok = 0
        for a, b in pairs:
            path, delivered = self.route(a, b, exact=True)
            ok += delivered and path[-1] == b
        return ok / len(pairs) if pairs else math.nan

    # -- the run -----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Schedule the initial joins (spread over the warm-up) and the first route sample."""
        for _ in range(self.cfg.nodes):
            self._push(self.rng.uniform(0, self.cfg.warmup), "join")
        self._push(self.cfg.sample_every, "sample")

    def advance(self, until: float, progress: Callable[[str, int, int], None] | None = None) -> None:
        """Process every event up to virtual time `until`."""
        cfg = self.cfg
        churn_end = cfg.warmup + cfg.duration
        while self.events and self.events[0][0] <= until:
            at, _, kind, node = heapq.heappop(self.events)
            self.now = at
            if kind == "tick":
                m = self.members.get(node)
                if m is None or m.tick_at != at:
                    continue
                m.tick_at = math.inf
                for action in m.maint.tick(at):
                    if node in self.members:
                        self._apply(node, action)
                if node in self.members:
                    self._wake(node, max(m.maint.next_deadline(), at + REACT_DELAY))
            elif kind == "join":
                born = self.join()
                self._push(max(cfg.warmup, at) + self.session(), "leave", born)
            elif kind == "arrival":
                if at < churn_end:
                    born = self.join()
                    self._push(at + self.session(), "leave", born)
            elif kind == "leave":
                if at < churn_end and node in self.members:
                    self.leave(node)
                    # Constant population on average: every departure is replaced by a newcomer.
                    self._push(at + self.rng.expovariate(1 / cfg.rejoin_delay), "arrival")
            elif kind == "sample":
                self._record_sample(at)
                self._push(at + cfg.sample_every, "sample")
                if progress is not None:
                    progress("churn", int(at), int(until))
        self.now = until

    def _node_seconds(self) -> float:
        return self.node_seconds + sum(self.now - s for s in self._alive_since.values())

    def _record_sample(self, at: float) -> None:
        node_secs = self._node_seconds()
        msgs_at, secs_at = self._last_sample
        rate = (self.messages - msgs_at) / max(node_secs - secs_at, 1e-9)
        self._last_sample = (self.messages, node_secs)
        success = self.sample(self.cfg.sample_pairs)
        self.samples.append({"t": at, "alive": len(self.members), "success": success, "messages_per_node_s": rate})

    def run(self, progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
        """Warm-up, churn, then a quiet settle period; the report the CLI prints."""
        cfg = self.cfg
        t0 = time.perf_counter()
        churn_end = cfg.warmup + cfg.duration
        end = churn_end + cfg.settle
        self.start()
        self.advance(end, progress)
        mean_session = cfg.weibull_scale * math.gamma(1 + 1 / cfg.weibull_shape)
        during = [s for s in self.samples if cfg.warmup + cfg.sample_every <= s["t"] < churn_end]
        degrees = [len(m.table.neighbours()) for m in self.members.values()]
        return {
            "mode": "churn",
            "nodes_target": cfg.nodes,
            "alive_at_end": len(self.members),
            "joins": self.joins,
            "leaves": self.leaves,
            "weibull": {"shape": cfg.weibull_shape, "scale": cfg.weibull_scale, "mean_session": mean_session},
            "success_during_churn": _mean([s["success"] for s in during]),
            "success_min": min((s["success"] for s in during), default=math.nan),
            "success_after_settle": self.all_pairs_success(cfg.final_pairs),
            "messages_per_node_s": self.messages / max(self._node_seconds(), 1e-9),
            "actions_per_node_s": {k: v / max(self._node_seconds(), 1e-9) for k, v in sorted(self.actions.items())},
            "degree": {"mean": _mean(degrees), "max": max(degrees, default=0)},
            "samples": self.samples,
            "seconds": time.perf_counter() - t0,
        }


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


def run_churn(cfg: ChurnConfig, progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    return ChurnSim(cfg).run(progress)


def print_churn(r: dict[str, Any]) -> None:
    print(
        f"churn: target N={r['nodes_target']} joins={r['joins']} leaves={r['leaves']} "
        f"alive at end={r['alive_at_end']} (Weibull shape {r['weibull']['shape']}, "
        f"scale {r['weibull']['scale']:.0f} s)"
    )
    print(f"  route success during churn {r['success_during_churn']:.4f} (worst {r['success_min']:.4f})")
    print(f"  route success after repair  {r['success_after_settle']:.4f}")
    print(f"  maintenance messages        {r['messages_per_node_s']:.2f} per node per second")
    acts = ", ".join(f"{k} {v:.2f}" for k, v in r["actions_per_node_s"].items())
    print(f"  actions per node per second {acts}")
    print(f"  tunnels                     mean {r['degree']['mean']:.2f} max {r['degree']['max']}")
    print("  t(s)   alive  success  msg/node/s")
    for s in r["samples"]:
        print(f"  {s['t']:6.0f} {s['alive']:6d}  {s['success']:.3f}    {s['messages_per_node_s']:.2f}")
