"""The overlay's picture, collected through the overlay itself: `ipop-overlay graph` asks the running node,
which asks every member it learns of for its link list (Kind.GRAPH_GET, routed to that exact member) and
follows the peers in each answer (Kind.GRAPH), breadth first, until no member is left unasked or the time is up.

The cost stays bounded on both sides: the asking node keeps at most WINDOW questions outstanding and sends at
most RATE a second (a 1,000-member overlay takes ~20 s), asks a silent member again after RETRY_AFTER and gives
up on it after TRIES; a member answers at most ANSWER_RATE questions a second (burst ANSWER_BURST), whoever asks,
so a member cannot turn others into an amplifier. What a member tells is what `status` already shows its
neighbours' gossip: its peers, each link's path kind and role, and its virtual address.

Wire formats (bodies of routed packets; see overlay/wire.py's Kind):
- GRAPH_GET: token (4)
- GRAPH: token (4), virtual IPv4 (4), count (1), count x [peer ID (8), path kind (1), roles (1)]
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from overlay.ids import format_id
from overlay.port import OverlayPort
from overlay.routing.ring import Role
from overlay.wire import FLAG_EXACT, DecodeError, Kind, Routed

RATE = 50.0  # our choice: questions a second from the asking node
WINDOW = 16  # questions outstanding at once
RETRY_AFTER = 3.0  # seconds: a routed question and its answer cross the overlay in well under one
TRIES = 3
ANSWER_RATE = 20.0  # answers a second a member gives, whoever asks (token bucket)
ANSWER_BURST = 40.0
DEFAULT_TIMEOUT = 30.0  # seconds a collection may take before a partial result
MAX_LINKS = 255  # one count byte; a node's bound on links is ~20 (RingParams)

PATH_KINDS = ("host", "srflx", "prflx", "relay", "tunnel")
ROLE_BITS = {"ring": 0x01, "long_out": 0x02, "long_in": 0x04, "on_demand": 0x08}

_GET = struct.Struct("!I")
_HEAD = struct.Struct("!I4sB")
_ENTRY = struct.Struct("!QBB")


@dataclass(frozen=True)
class LinkView:
    peer: int
    kind: str  # one of PATH_KINDS
    roles: frozenset[str]  # subset of ROLE_BITS


@dataclass(frozen=True)
class NodeView:
    address: str
    links: tuple[LinkView, ...]


def encode_get(token: int) -> bytes:
    return _GET.pack(token)


def decode_get(body: bytes) -> int:
    if len(body) != _GET.size:
        raise DecodeError(f"graph question of {len(body)} bytes, not {_GET.size}")
    token: int = _GET.unpack(body)[0]
    return token


def encode_answer(token: int, view: NodeView) -> bytes:
    links = view.links[:MAX_LINKS]
    parts = [_HEAD.pack(token, ipaddress.IPv4Address(view.address).packed, len(links))]
    for link in links:
        roles = 0
        for role in link.roles:
            roles |= ROLE_BITS[role]
        parts.append(_ENTRY.pack(link.peer, PATH_KINDS.index(link.kind), roles))
    return b"".join(parts)


def decode_answer(body: bytes) -> tuple[int, NodeView]:
    """(token, the member's view); DecodeError for anything encode_answer does not write."""
    if len(body) < _HEAD.size:
        raise DecodeError("graph answer shorter than its header")
    token, packed, count = _HEAD.unpack_from(body)
    if len(body) != _HEAD.size + count * _ENTRY.size:
        raise DecodeError(f"graph answer of {len(body)} bytes for {count} links")
    links = []
    for i in range(count):
        peer, kind, roles = _ENTRY.unpack_from(body, _HEAD.size + i * _ENTRY.size)
        if kind >= len(PATH_KINDS) or roles & ~0x0F:
            raise DecodeError(f"graph answer with link kind {kind} / roles {roles:#x}")
        names = frozenset(name for name, bit in ROLE_BITS.items() if roles & bit)
        links.append(LinkView(peer, PATH_KINDS[kind], names))
    return token, NodeView(str(ipaddress.IPv4Address(packed)), tuple(links))


@dataclass
class Crawl:
    """One collection, breadth first from our own links (pure: the caller sends what `due` returns)."""

    token: int
    nodes: dict[int, NodeView] = field(default_factory=dict)
    _queue: deque[int] = field(default_factory=deque)
    _seen: set[int] = field(default_factory=set)
    _asked: dict[int, float] = field(default_factory=dict)  # member -> when last asked
    _tries: dict[int, int] = field(default_factory=dict)
    _next_send: float = 0.0

    def learn(self, node: int, view: NodeView) -> None:
        self._asked.pop(node, None)
        self.nodes[node] = view
        self._seen.add(node)
        for link in view.links:
            if link.peer not in self._seen:
                self._seen.add(link.peer)
                self._queue.append(link.peer)

    def asked(self, node: int) -> bool:
        """Whether we asked `node` (an answer from anyone else is not taken, whatever token it carries)."""
        return node in self._tries

    def due(self, now: float) -> list[int]:
        """Members to ask now (new ones and repeats), within WINDOW outstanding and RATE a second."""
        for node, when in list(self._asked.items()):
            if now - when >= RETRY_AFTER:
                del self._asked[node]
                if self._tries[node] < TRIES:  # else given up: it shows as unanswered
                    self._queue.appendleft(node)
        self._next_send = max(self._next_send, now - 1.0)  # after an idle spell, no more than a second's worth
        out: list[int] = []
        while self._queue and len(self._asked) < WINDOW and self._next_send <= now:
            node = self._queue.popleft()
            if node in self.nodes:
                continue
            self._tries[node] = self._tries.get(node, 0) + 1
            self._asked[node] = now
            self._next_send += 1.0 / RATE
            out.append(node)
        return out

    def next_time(self, now: float) -> float:
        """When `due` may next have something to send."""
        times = [when + RETRY_AFTER for when in self._asked.values()]
        if self._queue and len(self._asked) < WINDOW:
            times.append(self._next_send)
        return max(now, min(times)) if times else now + 1.0

    @property
    def finished(self) -> bool:
        return not self._queue and not self._asked

    def progress(self) -> tuple[int, int]:
        """(members that answered, members known)."""
        return len(self.nodes), len(self._seen)

    def result(self) -> dict[str, Any]:
        unanswered = sorted(self._seen - set(self.nodes))
        return {
            "complete": not unanswered,
            "nodes": {
                format_id(n): {
                    "address": v.address,
                    "links": [[format_id(lk.peer), lk.kind, sorted(lk.roles)] for lk in v.links],
                }
                for n, v in sorted(self.nodes.items())
            },
            "unanswered": [format_id(n) for n in unanswered],
        }


class GraphService:
    """The node's side: answers questions (rate-limited) and runs collections for the control socket."""

    def __init__(self, port: OverlayPort, view: Callable[[], NodeView]) -> None:
        self.port = port
        self.view = view  # our own links, as we would answer
        self.crawls: dict[int, Crawl] = {}
        self._tokens = ANSWER_BURST
        self._refilled = port.clock()

    def on_get(self, pkt: Routed) -> None:
        port = self.port
        try:
            token = decode_get(pkt.body)
        except DecodeError:
            port.count("drop: malformed graph question")
            return
        now = port.clock()
        self._tokens = min(ANSWER_BURST, self._tokens + (now - self._refilled) * ANSWER_RATE)
        self._refilled = now
        if self._tokens < 1.0:
            port.count("drop: graph questions over the rate")
            return
        self._tokens -= 1.0
        port.send_routed(pkt.src, Kind.GRAPH, encode_answer(token, self.view()), FLAG_EXACT)

    def on_answer(self, pkt: Routed) -> None:
        try:
            token, view = decode_answer(pkt.body)
        except DecodeError:
            self.port.count("drop: malformed graph answer")
            return
        crawl = self.crawls.get(token)
        if crawl is not None and crawl.asked(pkt.src) and pkt.src not in crawl.nodes:
            crawl.learn(pkt.src, view)
        else:
            self.port.count("drop: graph answer not awaited")

    def start(self, token: int) -> Crawl:
        crawl = Crawl(token)
        crawl.learn(self.port.id, self.view())
        self.crawls[token] = crawl
        return crawl

    def ask(self, crawl: Crawl, now: float) -> None:
        for node in crawl.due(now):
            self.port.send_routed(node, Kind.GRAPH_GET, encode_get(crawl.token), FLAG_EXACT)

    def request(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The control socket's "graph" command: {"cmd": "graph", "timeout": seconds (1-600, default 30)}."""
        timeout = request.get("timeout", DEFAULT_TIMEOUT)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 1 <= timeout <= 600:
            raise ValueError("graph timeout must be 1 to 600 seconds")
        return self.collect(float(timeout))

    async def collect(self, timeout: float, every: float = 0.5) -> AsyncIterator[dict[str, Any]]:
        """One collection: {"progress": [answered, known]} about every `every` seconds, then
        {"result": Crawl.result()} when every member answered or was given up on, or at `timeout` (then the
        result says "complete": false and lists who did not answer)."""
        port = self.port
        crawl = self.start(port.rng.getrandbits(32))
        try:
            end = port.clock() + timeout
            next_report = 0.0
            while not crawl.finished and port.clock() < end:
                now = port.clock()
                self.ask(crawl, now)
                if now >= next_report:
                    next_report = now + every
                    yield {"progress": list(crawl.progress())}
                await asyncio.sleep(max(0.01, min(crawl.next_time(now), end, next_report) - now))
            yield {"result": crawl.result()}
        finally:
            self.crawls.pop(crawl.token, None)


def own_view(address: str, links: Iterable[tuple[int, str, Role, bool]]) -> NodeView:
    """A NodeView from (peer, path kind, ring-table role, is a ring neighbour) of each link."""
    out = []
    for peer, kind, role, ring in links:
        roles = set()
        if ring:
            roles.add("ring")
        if role & Role.LONG_OUT:
            roles.add("long_out")
        if role & Role.LONG_IN:
            roles.add("long_in")
        if role & (Role.ON_DEMAND | Role.PEER_ON_DEMAND):
            roles.add("on_demand")
        out.append(LinkView(peer, kind if kind in PATH_KINDS else "host", frozenset(roles)))
    return NodeView(address, tuple(sorted(out, key=lambda lk: lk.peer)))
