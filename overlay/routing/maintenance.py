"""Maintenance rules: which links a node opens, keeps and closes, and when; fed events and `now`, no I/O.

The node driver and the simulator's churn mode both run these rules: they report what happened (a link came
up or went down, a neighbour list arrived, a long-link search ended) and act on the list `tick(now)` returns.

Rules:
- Ring: link to the `ring_size` nearest known successors and predecessors. Candidates come from neighbours'
  lists (Chord-style stabilisation through gossip of neighbour lists), so a failed successor is replaced by
  the next one its other neighbours know of.
- Long links: `long_links` slots, each aimed at a point drawn from the harmonic distribution for the current
  size estimate; the node routes a FIND to the point and links to whoever is closest (Symphony, section 3).
  A slot is re-drawn when its link fails, when the found node refuses (incoming cap), or when the size
  estimate has moved by more than a factor of 2 since the draw (Symphony's re-linking rule).
- Keepalive: the gossip is the keepalive. A link silent for `ping_interval` (a round and a margin) is pinged
  every PING_RETRY; DEAD_GRACE after the first ping it is declared dead. That holds for the links failures must
  be found on quickly: ring links (repair, DHT replicas) and links that carry traffic. An idle long or incoming
  link is gossiped to every SLOW_FACTOR rounds and pinged after SLOW_FACTOR times as long (still inside the
  ~30 s a NAT keeps an idle mapping): most of a node's links are idle, and on a machine of a hundred nodes
  their keepalives were most of the idle CPU (bench/scale.py). A link something was just sent on and that
  has not answered since is pinged after BUSY_PING and avoided by routes (`suspects`).
- The clock: `next_deadline` says when `tick` next has work (a round, a link's silence running out, an attempt
  or search to retry, a surplus link's grace ending) and moves on as links are heard from, so a driver sleeps
  through the deadlines that gossip made moot.
- Links with no role are closed after `surplus_grace` (they may be someone's ring link about to be replaced).
- Failed attempts back off exponentially, so an unreachable peer is not hammered.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from overlay.routing.ring import RingTable, Role, harmonic_target, stratified_draw

# Our choices, all in seconds. An idle node's cost is its packets (bench/scale.py: ~0.3 ms of a core per
# wake-up, most of it Python), so healthy links exchange one gossip each way per round and nothing else; a
# link silent for longer than a round allows is pinged every PING_RETRY and dead after three unanswered pings.
# Ring links: gossip every ~10 s (7.5-12.5 s jittered, or on the 10 s marks: tick), pinged after 13 s of silence,
# dead after 19 s, well inside the ~32 s an ICE consent check takes to notice (RFC 7675), so our repair runs first.
STABILIZE_INTERVAL = 10.0
PING_INTERVAL = 13.0  # the longest a jittered round leaves a link silent, and a margin
PING_RETRY = 2.0
DEAD_GRACE = 3 * PING_RETRY
DEAD_AFTER = PING_INTERVAL + DEAD_GRACE
ATTEMPT_TIMEOUT = 6.0
BACKOFF_FIRST = 5.0
BACKOFF_MAX = 120.0
SURPLUS_GRACE = 30.0
RELINK_FACTOR = 2.0
LINK_SLACK = 2
# Idle non-ring links: gossip every 2nd round (15-25 s: a NAT keeps an idle UDP mapping ~30 s, RFC 4787 asks
# for >= 2 min but home routers do less), pinged after 26 s of silence, dead after 32 s.
SLOW_FACTOR = 2
# Rounds with an unchanged neighbour list after which a node's rounds align with the wall clock (see tick).
ALIGN_AFTER = 3
# A link that carried data and has heard nothing since is suspect, like unacknowledged data in TCP: pinged
# after BUSY_PING, dead after BUSY_DEAD of such silence, however sparse the data. Routes through a crashed
# node's links then heal in seconds, not at the next keepalive timeout (bench/scale.py: after killing 10 %
# of 60 nodes, half the sampled pairs failed for 30 s while idle long links to the dead waited out 48 s).
BUSY_WINDOW = 5.0
BUSY_PING = PING_RETRY
BUSY_DEAD = BUSY_PING + DEAD_GRACE
# Routes avoid a silent busy link only once its ping has had a second to come back: one-way data on a healthy
# link (pinged every BUSY_PING) must not be rerouted for the ping's round trip.
SUSPECT_AFTER = BUSY_PING + 1.0
DEAD_REASON = "no answer to keepalives"
# An ICMP "unreachable" for a link's endpoint (overlay/transport/underlay.py): pinged at once, again PING_RETRY
# later, and dead UNREACHABLE_DEAD after the ICMP unless the peer answers. Only a hint (a forged ICMP costs two
# pings, which a live peer answers), but a strong one: the process behind the port is gone, or the route to it.
UNREACHABLE_DEAD = 2 * PING_RETRY
UNREACHABLE_REASON = "unreachable (ICMP) and no answer to keepalives"
DEAD_REASONS = frozenset({DEAD_REASON, UNREACHABLE_REASON})  # a link that failed, not one closed by choice


@dataclass(frozen=True, slots=True)
class OpenLink:
    peer: int


@dataclass(frozen=True, slots=True)
class FindLong:
    slot: int
    target: int


@dataclass(frozen=True, slots=True)
class CloseLink:
    peer: int
    reason: str


@dataclass(frozen=True, slots=True)
class Ping:
    peer: int
    idle: bool = False  # the slow keepalive of an idle link: its silence is expected, not a sign of trouble


@dataclass(frozen=True, slots=True)
class SendNeighbours:
    peers: tuple[int, ...]
    neighbours: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TellUse:
    """Tell `peer` what we use its link for (USE_* flags): it keeps a link that either end uses."""

    peer: int
    use: int


Action = OpenLink | FindLong | CloseLink | Ping | SendNeighbours | TellUse

# What a node uses a link for; the node carries these flags in its HELLO message (overlay/wire.py HELLO_*).
USE_LONG = 0x01  # one of our long links: counts against the peer's incoming cap
USE_RING = 0x02  # the peer is one of our ring neighbours
USE_ONLY = 0x04  # our only link (we are joining through the peer)
USE_DEMAND = 0x08  # one of our on-demand links (a pair that talks a lot)
# Our choice: a long-link search that keeps landing on a ring neighbour (a small group) is accepted after this
# many tries instead of being drawn again forever.
RING_HITS_ACCEPTED = 3


@dataclass
class _LongSlot:
    target: int | None = None
    peer: int | None = None
    searching_since: float | None = None
    drawn_for: float = 0.0
    retry_at: float = 0.0
    ring_hits: int = 0


@dataclass
class _Attempt:
    started: float
    failures: int = 0
    retry_at: float = 0.0


@dataclass
class Maintenance:
    table: RingTable
    rng: random.Random
    stabilize_interval: float = STABILIZE_INTERVAL
    ping_interval: float = PING_INTERVAL
    dead_after: float = DEAD_AFTER
    surplus_grace: float = SURPLUS_GRACE
    _last_rx: dict[int, float] = field(default_factory=dict)
    _last_ping: dict[int, float] = field(default_factory=dict)
    _surplus_since: dict[int, float] = field(default_factory=dict)
    _attempts: dict[int, _Attempt] = field(default_factory=dict)
    _slots: list[_LongSlot] = field(default_factory=list)
    _use_told: dict[int, int] = field(default_factory=dict)
    _busy: dict[int, float] = field(default_factory=dict)  # peer -> when its link last carried traffic
    _unreachable: dict[int, float] = field(default_factory=dict)  # peer -> the first ICMP error since we heard it
    _awaiting: dict[int, float] = field(default_factory=dict)  # peer -> first data sent since its last rx
    _fast_since: dict[int, float] = field(default_factory=dict)  # peer -> since when on the fast keepalive
    _slow_round: int = -1  # the last round that gossiped to every link
    _steady: int = 0  # rounds since our neighbour list last changed
    _gossiped: tuple[int, ...] = ()
    _next_stabilize: float = 0.0
    _due: dict[int, float] = field(default_factory=dict)  # peer -> when its link's silence next needs a look
    _quiet: dict[int, float] = field(default_factory=dict)  # peer -> the silence its class allowed at the last tick
    _work_at: float = 0.0  # when an attempt, a long-link search or a surplus link next needs a tick
    due_peer: int | None = None  # the link whose silence `next_deadline` waits for, if any

    def __post_init__(self) -> None:
        self._slots = [_LongSlot() for _ in range(self.table.params.long_links)]

    # -- events ------------------------------------------------------------------------------------------------
    def on_link_up(self, peer: int, now: float) -> None:
        self._last_rx[peer] = now
        self._attempts.pop(peer, None)
        # Tell the new neighbour who we know at once: that is what lets a joining node find its ring place.
        self._next_stabilize = min(self._next_stabilize, now)

    def forget_told_use(self, peer: int) -> None:
        """The peer's end of the link is new (it restarted): tell it again what we use the link for."""
        self._use_told.pop(peer, None)

    def on_link_down(self, peer: int, now: float, *, dead: bool = False) -> None:
        """A link closed. `dead`: it failed (keepalives unanswered), so the peer is no candidate either until
        a neighbour that still reaches it mentions it again."""
        if dead:
            # Our other neighbours, told (SUSPECT), check their own links to it within BUSY_DEAD: a list from
            # one of them after that still naming the peer means it is alive there (overlay/routing/ring.py).
            self.table.forget(peer, until=now + BUSY_DEAD + PING_RETRY)
        self._last_rx.pop(peer, None)
        self._last_ping.pop(peer, None)
        self._surplus_since.pop(peer, None)
        self._use_told.pop(peer, None)
        self._busy.pop(peer, None)
        self._unreachable.pop(peer, None)
        self._awaiting.pop(peer, None)
        self._fast_since.pop(peer, None)
        self._due.pop(peer, None)
        self._quiet.pop(peer, None)
        for slot in self._slots:
            if slot.peer == peer:
                slot.peer, slot.target, slot.retry_at = None, None, now
        self._next_stabilize = min(self._next_stabilize, now)

    def relink_now(self, now: float) -> None:
        """Gossip at the next tick: our place changed (we moved into another overlay, or joined again)."""
        self._next_stabilize = min(self._next_stabilize, now)

    def on_busy(self, peer: int, now: float) -> None:
        """The link to `peer` carried data: find a failure on it quickly."""
        self._busy[peer] = now
        self._await(peer, now)

    def on_sent(self, peer: int, now: float) -> None:
        """A routed control packet (a lookup, a find, a signal) went out on the link to `peer`: expect to hear
        from the peer soon, as after data, but without putting the link on the fast keepalive."""
        self._await(peer, now)

    def _await(self, peer: int, since: float) -> None:
        since = self._awaiting.setdefault(peer, since)
        if peer in self._due:
            self._due[peer] = min(self._due[peer], since + BUSY_PING)

    def suspect(self, peer: int, now: float) -> None:
        """A neighbour's link to `peer` died: check ours as a busy link (pinged at once, dead after BUSY_DEAD of
        silence from now). Links to a crashed node that carry nothing would otherwise live on for the slow
        keepalive's 48 s, and their owners would keep gossiping the dead node as a ring candidate."""
        if self.table.is_linked(peer):
            self._await(peer, now - BUSY_PING)  # ping at the next tick, avoided a second later
            self._busy[peer] = now

    def unreachable(self, peer: int, now: float) -> None:
        """An ICMP error said the link's endpoint is unreachable: ping it at once, and unless it answers within
        UNREACHABLE_DEAD it is dead. Routes avoid it a second after the first ping, as a silent busy link."""
        if self.table.is_linked(peer):
            self._await(peer, now - BUSY_PING)
            self._busy[peer] = now
            self._unreachable.setdefault(peer, now)

    def suspects(self, now: float) -> frozenset[int]:
        """Links that carried data and have not answered since, even their ping: routes avoid them meanwhile."""
        return frozenset(p for p, t in self._awaiting.items() if now - t >= SUSPECT_AFTER)

    def watching(self, now: float) -> bool:
        """Whether some link carries data (the node then ticks every second: data marks links busy between
        ticks). A link that only awaits an answer to a control packet needs no beat: `next_deadline` holds its
        ping and suspect times (bench/scale.py: a second's beat after each routed lookup was half the ticks of
        an idle node)."""
        return any(now - t <= BUSY_WINDOW for t in self._busy.values())

    def on_rx(self, peer: int, now: float) -> None:
        self._last_rx[peer] = now
        self._awaiting.pop(peer, None)
        self._unreachable.pop(peer, None)
        if peer in self._due:
            self._due[peer] = now + self._quiet.get(peer, self.ping_interval)

    def on_neighbours(self, peer: int, ids: list[int], now: float) -> bool:
        """A neighbour's list; whether it told us anything (RingTable.set_neighbours_of)."""
        return self.table.set_neighbours_of(peer, ids, now)

    def on_peer_use(self, peer: int, use: int) -> None:
        """The peer told us what it uses our link for (TellUse at its end)."""
        self.table.set_role(peer, Role.LONG_IN, bool(use & USE_LONG))
        self.table.set_role(peer, Role.PEER_RING, bool(use & USE_RING))
        self.table.set_role(peer, Role.BOOTSTRAP, bool(use & USE_ONLY))
        self.table.set_role(peer, Role.PEER_ON_DEMAND, bool(use & USE_DEMAND))

    def link_use(self, peer: int, ring: set[int] | None = None, long_peers: set[int] | None = None) -> int:
        """USE_* flags: what this node uses its link to `peer` for. `ring` (our ring peers and wanted ring
        peers) and `long_peers` may be passed in when asking for every link at once."""
        t = self.table
        if ring is None:
            ring = t.ring_peers() | set(t.wanted_ring_peers())
        use = USE_LONG if peer in (long_peers if long_peers is not None else self.long_link_peers()) else 0
        if peer in ring:
            use |= USE_RING
        if t.link_count() == 1 and t.is_linked(peer):
            use |= USE_ONLY
        if Role.ON_DEMAND in t.role(peer):
            use |= USE_DEMAND
        return use

    def on_attempt_failed(self, peer: int, now: float) -> None:
        a = self._attempts.setdefault(peer, _Attempt(now))
        a.failures += 1
        a.retry_at = now + min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (a.failures - 1))
        self._work_at = min(self._work_at, a.retry_at)
        # A peer we cannot reach is no ring candidate until someone mentions it again.
        if a.failures >= 3:
            self.table.forget(peer, until=math.inf)
            del self._attempts[peer]

    def on_long_found(self, slot: int, peer: int | None, now: float) -> None:
        """A long-link search ended: linked to `peer`, or None (refused, or no answer)."""
        if not 0 <= slot < len(self._slots):
            return
        s = self._slots[slot]
        s.searching_since = None
        if peer is not None and peer in self.table.ring_peers() and s.ring_hits < RING_HITS_ACCEPTED - 1:
            # A long link to a ring neighbour adds nothing: draw again (docs/topology.md: with stratified
            # draws this cut mean hops 6.42 -> 6.08 at N=10^4).
            s.ring_hits += 1
            peer = None
        if peer is None or peer == self.table.self_id:
            s.target, s.retry_at = None, now + BACKOFF_FIRST
            self._work_at = min(self._work_at, s.retry_at)
        else:
            s.peer, s.ring_hits = peer, 0

    def _fast_peers(self, linked: list[int], ring: set[int], now: float) -> set[int]:
        """Links on the fast keepalive: ring links (ours or the peer's) and links busy within `dead_after`."""
        fast = set()
        for peer in linked:
            busy = self._busy.get(peer)
            if busy is not None and now - busy > self.dead_after:
                del self._busy[peer]
                busy = None
            if peer in ring or busy is not None or self.table.role(peer) & (Role.PEER_RING | Role.BOOTSTRAP):
                fast.add(peer)
        return fast

    def max_links(self) -> int:
        """The most links this node keeps once its surplus is closed: ring, own long links, incoming cap,
        and LINK_SLACK for links being replaced."""
        p = self.table.params
        return 2 * p.ring_size + p.long_links + p.incoming_cap + LINK_SLACK

    def long_link_peers(self) -> set[int]:
        return {s.peer for s in self._slots if s.peer is not None}

    # -- the clock -----------------------------------------------------------------------------------------
    def next_deadline(self) -> float:
        """When `tick` next has work: the next gossip round, or the first link whose silence runs out. Kept up
        to date by `on_rx`, so a driver that hears from `due_peer` can sleep on instead of waking for a silence
        that has ended: an idle node's links are heard from every round, and waking at each one's old deadline
        was most of its ticks (30 idle node processes: 0.5 ticks per second with ~8 links, 0.13 once it slept
        through them)."""
        deadline, self.due_peer = min(self._next_stabilize, self._work_at), None
        for peer, due in self._due.items():
            if due < deadline:
                deadline, self.due_peer = due, peer
        return deadline

    def tick(self, now: float) -> list[Action]:
        t = self.table
        actions: list[Action] = []
        linked = t.neighbours()
        ring = t.ring_peers() | set(t.wanted_ring_peers())
        fast = self._fast_peers(linked, ring, now)
        # Keepalive and failure detection: a link silent for longer than its class allows is pinged, again every
        # PING_RETRY, and dead DEAD_GRACE after the first ping.
        for peer in linked:
            last = self._last_rx.setdefault(peer, now)
            awaiting = self._awaiting.get(peer)
            if peer in fast:
                # A link that just turned fast was allowed a longer silence: count from then.
                last = max(last, self._fast_since.setdefault(peer, now) - self.ping_interval)
                self._quiet[peer] = quiet = self.ping_interval
            else:
                self._fast_since.pop(peer, None)
                self._quiet[peer] = quiet = self.ping_interval * SLOW_FACTOR
            if awaiting is not None:
                last, quiet = awaiting, BUSY_PING
            silent = now - last
            unreachable = self._unreachable.get(peer)
            if unreachable is not None and now >= unreachable + UNREACHABLE_DEAD:
                actions.append(CloseLink(peer, UNREACHABLE_REASON))
                self._due.pop(peer, None)
            elif silent >= quiet + (self.dead_after - self.ping_interval):
                actions.append(CloseLink(peer, DEAD_REASON))
                self._due.pop(peer, None)
            elif silent >= quiet:
                if now - self._last_ping.get(peer, -1e18) >= PING_RETRY:
                    self._last_ping[peer] = now
                    actions.append(Ping(peer, idle=awaiting is None and peer not in fast))
                self._due[peer] = self._last_ping[peer] + PING_RETRY
            else:
                self._due[peer] = last + quiet
            if awaiting is not None and now < awaiting + SUSPECT_AFTER:
                self._due[peer] = min(self._due[peer], awaiting + SUSPECT_AFTER)  # when `suspects` changes
            if unreachable is not None and peer in self._due:
                self._due[peer] = min(self._due[peer], unreachable + UNREACHABLE_DEAD)
        # Ring: open links to the nearest successors/predecessors we know of. `work` is when an attempt, a
        # long-link search or a surplus link next needs a look (next_deadline: an idle node's timer waits for
        # it and its rounds only, so a retry must not wait for a round).
        work = math.inf
        for peer in t.wanted_ring_peers():
            if t.is_linked(peer):
                continue
            a = self._attempts.get(peer)
            if a is None:
                a = self._attempts[peer] = _Attempt(now)
                actions.append(OpenLink(peer))
            elif a.retry_at <= a.started and now - a.started >= ATTEMPT_TIMEOUT:
                # No link came of it (the request found no route, or the peer is gone): a failure.
                self.on_attempt_failed(peer, now)
                a = self._attempts.get(peer, a)
            elif a.started < a.retry_at <= now:
                a.started = now
                actions.append(OpenLink(peer))
            if peer in self._attempts:
                work = min(work, a.started + ATTEMPT_TIMEOUT if a.retry_at <= a.started else a.retry_at)
        # Long links.
        n = t.size_estimate()
        for i, s in enumerate(self._slots):
            if s.peer is not None and not t.is_linked(s.peer):
                s.peer, s.target = None, None
            if s.peer is not None and (n > s.drawn_for * RELINK_FACTOR or n * RELINK_FACTOR < s.drawn_for):
                s.peer, s.target = None, None
            if s.peer is None and now >= s.retry_at and n >= 2 * t.params.ring_size + 1:
                if s.searching_since is None or now - s.searching_since >= ATTEMPT_TIMEOUT:
                    u = stratified_draw(i, len(self._slots), self.rng.random())
                    s.target = harmonic_target(t.self_id, u, n)
                    s.drawn_for, s.searching_since = n, now
                    actions.append(FindLong(i, s.target))
            if s.peer is None and n >= 2 * t.params.ring_size + 1:
                searched = s.searching_since + ATTEMPT_TIMEOUT if s.searching_since is not None else 0.0
                work = min(work, max(s.retry_at, searched))
        # Surplus links: close after a grace period, or at once, oldest surplus first, while the node has
        # more links than its bound (an anchor that many joiners bootstrapped through).
        long_peers = self.long_link_peers()
        surplus = [p for p in t.surplus_links() if p not in long_peers]
        for peer in surplus:
            self._surplus_since.setdefault(peer, now)
        excess = len(linked) - self.max_links()
        for peer in sorted(surplus, key=lambda p: self._surplus_since[p]):
            if excess > 0 or now - self._surplus_since[peer] >= self.surplus_grace:
                actions.append(CloseLink(peer, "no longer needed"))
                self._surplus_since.pop(peer)
                excess -= 1
        surplus_now = set(surplus)
        for peer in list(self._surplus_since):
            if peer not in surplus_now:
                self._surplus_since.pop(peer)  # closed, or in use again: a later surplus spell starts afresh
            else:
                work = min(work, self._surplus_since[peer] + self.surplus_grace)
        self._work_at = work
        # Roles: our long links, and what we use each link for, told to the peer when it changes.
        for peer in linked:
            t.set_role(peer, Role.LONG_OUT, peer in long_peers)
            use = self.link_use(peer, ring, long_peers)
            if self._use_told.get(peer) != use:
                self._use_told[peer] = use
                actions.append(TellUse(peer, use))
        # Gossip neighbour lists: to the fast links every round, to all of them every SLOW_FACTOR rounds or as
        # soon as the list changed (lookahead reads it).
        if now >= self._next_stabilize:
            current = tuple(linked)
            changed = current != self._gossiped
            self._steady = 0 if changed else self._steady + 1
            round_no = math.floor(now / self.stabilize_interval)
            if self._steady >= ALIGN_AFTER:
                # A settled node's rounds fall on the multiples of the interval on the wall clock that all
                # members share: its neighbours then gossip to it at the same moment, and it reads their packets
                # in one or two wake-ups instead of one each (an idle node's cost is its wake-ups: 90 idle nodes
                # 4.3 -> 2.6 % of a core in bench/scale.py). The packets are small, so the bursts cost nothing
                # on a wire. While its neighbours change, rounds stay jittered (Floyd and Jacobson, "The
                # Synchronization of Periodic Routing Messages"): aligned rounds in a join storm of 100 on 2
                # cores woke every process at once and starved joiners' XMPP logins (ring 56 -> 71 s).
                self._next_stabilize = (round_no + 1) * self.stabilize_interval
            else:
                self._next_stabilize = now + self.stabilize_interval * (0.75 + 0.5 * self.rng.random())
            slow_round = round_no % SLOW_FACTOR == 0 and round_no != self._slow_round
            if slow_round:
                self._slow_round = round_no
            if changed or slow_round:
                self._gossiped = current
                to = current
            else:
                to = tuple(p for p in linked if p in fast)
            if to:
                actions.append(SendNeighbours(to, current))
        # Idle, a node wakes for its gossip rounds and when a link's silence runs out (then every PING_RETRY
        # while it is pinged): next_deadline. A finer beat cost a hundred idle nodes most of their CPU
        # (bench/scale.py).
        return actions
