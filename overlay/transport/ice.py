"""ICE for links (RFC 8445), with aioice's connectivity checks on the node's one UDP socket.

aioice's `Connection` runs the check list, pairing, role conflicts and nomination. It normally owns a socket per
host address per connection and a TURN allocation per connection; a node with a dozen links would hold dozens of
sockets and allocations, and its data would ride aioice's per-datagram queue. Here instead:

- every connection's host candidate is the node's underlay socket (the one `[node] listen` binds). STUN
  messages on it are demultiplexed by first byte (RFC 7983: 0-3 STUN, 64-79 ChannelData, ours >= 0x80), then
  responses by transaction ID and Binding requests by the USERNAME's first half, our per-attempt ufrag;
- server-reflexive candidates come from the same socket, asked of every configured STUN server and refreshed
  every SRFLX_REFRESH, so one NAT mapping serves every peer (what makes hole punching work behind
  endpoint-independent NATs, RFC 4787);
- relayed candidates come from one TURN allocation per configured server (overlay/transport/turn.py), shared by
  all links through channels;
- once a pair is nominated the session is closed: the link keeps only the path (an endpoint on our socket, or a
  TURN channel) and sends on the node's own batched data path. Link keepalives (authenticated PING/PONG) replace
  RFC 7675 consent checks, which would cost a STUN transaction per link every 5 s.

So a node holds 1 + (TURN servers) sockets however many links it has. Credentials (ufrag, pwd) are random per
attempt. Our TAP and the VPN's own addresses are never offered as candidates.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ifaddr
from aioice import Candidate, Connection, stun
from aioice.candidate import candidate_foundation, candidate_priority

from overlay.transport.paths import DatagramSender, IcePath, IceSettings, TurnPath, UdpPath
from overlay.transport.servers import Resolved
from overlay.transport.signals import IceCandidate, IceParams
from overlay.transport.turn import TurnAllocation
from overlay.wire import Endpoint

log = logging.getLogger(__name__)

SRFLX_REFRESH = 25.0  # our choice: also keeps the NAT mapping toward the STUN servers (RFC 4787: >= 2 min idle)
HOST_REFRESH = 10.0  # our choice: how soon a new or lost interface address is noticed
# Our choice: a link gone silent asks the STUN servers at once, at most this often. It must come well before
# the link is given up (overlay/routing/maintenance.py BUSY_DEAD, 8 s): a NAT that mapped us anew is then
# noticed while the links it broke still stand, and ICE restarts them in place.
SRFLX_RECHECK = 2.0
ALLOCATION_CHECK_TIMEOUT = 4.0  # our choice: three tries of a Refresh (0.5, 1, 2 s RTO) and a margin
ALLOCATE_TIMEOUT = 10.0  # our choice: an Allocate with its 401 challenge, each retransmitted (RFC 8656 section 7)
TURN_RETRY = 30.0  # our choice: a failed allocation is tried again this often
STUN_TIMEOUT_TRIES = 3  # retransmissions of a gathering request (0.5, 1, 2 s: RFC 8489 section 6.2.1 RTO)
GATHER_WAIT = 2.0  # an offer made before the first STUN/TURN answers would miss our srflx and relay candidates
_ICE_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


# mapping_behaviour's answers where a peer's relay reaches us at our server-reflexive address (or our own).
PUBLIC = "none: a public address"
INDEPENDENT = "endpoint-independent NAT mapping"
REACHABLE_MAPPINGS = (PUBLIC, INDEPENDENT)


def mapping_behaviour(hosts: set[str], answers: list[tuple[str, Endpoint]]) -> str:
    """What the STUN servers' answers say of the NAT in front of us (RFC 4787 section 4.1's mapping behaviour):
    `answers` are (the server's address, the address it saw us at). Two servers at different addresses that see us
    at one address mean an endpoint-independent mapping, which hole punching needs; at two, an address-dependent
    one (a "symmetric" NAT), through which only TURN or a tunnel reaches members behind other NATs (RFC 5780
    section 4.3 tells them apart the same way, with one server's alternate address)."""
    if not answers:
        return "unknown: no STUN server answered"
    if any(mapped[0] in hosts for _, mapped in answers):
        return PUBLIC
    servers = {server for server, _ in answers}
    if len(servers) < 2:
        return "a NAT; its mapping needs two STUN server addresses to tell"
    if len({mapped for _, mapped in answers}) == 1:
        return f"{INDEPENDENT} ({len(servers)} STUN server addresses agree)"
    return "address-dependent NAT mapping (a symmetric NAT): members behind other NATs only through TURN or a tunnel"


def _random_text(n: int) -> str:
    return "".join(secrets.choice(_ICE_ALPHABET) for _ in range(n))


class _View:
    """What aioice's Connection needs of a local 'protocol': a candidate, STUN transactions and sends. Sends
    go out of the shared underlay socket (host view) or through a TURN allocation (relay view)."""

    def __init__(self, agent: IceAgent, candidate: Candidate, allocation: TurnAllocation | None) -> None:
        self.agent = agent
        self.local_candidate = candidate
        self.allocation = allocation

    async def request(
        self,
        request: stun.Message,
        addr: tuple[str, int],
        integrity_key: bytes | None = None,
        retransmissions: int | None = None,
    ) -> tuple[stun.Message, tuple[str, int]]:
        if integrity_key is not None:
            request.add_message_integrity(integrity_key)
        transaction = stun.Transaction(
            request, addr, self, retransmissions=retransmissions, integrity_key=integrity_key
        )
        self.agent.transactions[request.transaction_id] = transaction
        try:
            return await transaction.run()
        finally:
            del self.agent.transactions[request.transaction_id]

    def send_stun(self, message: stun.Message, addr: tuple[str, int]) -> None:
        self.agent.count("ice stun sent")
        self.send(bytes(message), (addr[0], addr[1]))

    def send(self, data: bytes, addr: Endpoint) -> None:
        if self.allocation is not None:
            self.allocation.send_to_peer(data, addr)
        else:
            self.agent.underlay.send(data, addr)

    async def send_data(self, data: bytes, addr: tuple[str, int]) -> None:
        self.send(data, (addr[0], addr[1]))

    async def close(self) -> None:
        """The socket is shared: nothing to close."""


class _SessionConnection(Connection):
    """aioice's Connection with its candidates set by the agent instead of gathered per connection."""

    def set_local(self, views: list[_View], candidates: list[Candidate]) -> None:
        self._protocols = views  # type: ignore[assignment]
        self._local_candidates = candidates
        self._local_candidates_start = True
        self._local_candidates_end = True


class IceSession:
    """One link attempt's ICE agent: its credentials and candidates, and the checks against one peer's."""

    def __init__(self, agent: IceAgent, controlling: bool, *, relay: bool, peer_relays: bool | None = None) -> None:
        self.agent = agent
        self.ufrag = _random_text(8)
        self.connection = _SessionConnection(
            ice_controlling=controlling, local_username=self.ufrag, local_password=_random_text(24)
        )
        host_candidates = agent.host_candidates()
        views: list[_View] = []
        if host_candidates:
            views.append(_View(agent, host_candidates[0], None))
        self.relay_views: dict[TurnAllocation, _View] = {}
        candidates = host_candidates + agent.srflx_candidates()
        # In a round with relays, a side whose NAT maps endpoint-independently (or that has a public address) is
        # reached through the other side's relay at its own server-reflexive address, and offers its relay only
        # when the other side offered none. aioice nominates the first pair that answers, and with relays on both
        # sides that was often relay to relay: every datagram crossed the TURN server twice, and what went to the
        # peer's relayed address met coturn's 128 KB relay socket, which drops chunk trains (bench/nat_links.py,
        # symmetric NAT -> NAT b over TURN, 2026-12-07: ~400 Mbit/s relay to relay, ~950 relay to server-reflexive).
        if relay and not agent.needs_own_relay and peer_relays is not False:
            agent.count("ice: own relay left out (the peer's relay reaches us)")
            relay = False
        if relay:
            for allocation, candidate in agent.relay_candidates():
                view = _View(agent, candidate, allocation)
                self.relay_views[allocation] = view
                views.append(view)
                candidates.append(candidate)
        self.host_view = views[0] if host_candidates else None
        self.connection.set_local(views, candidates)
        self.selected: IcePath | None = None
        agent.sessions[self.ufrag] = self

    def params(self) -> IceParams:
        return IceParams(
            self.ufrag,
            self.connection.local_password,
            tuple(
                IceCandidate(c.type, c.host, c.port, c.priority, c.foundation) for c in self.connection.local_candidates
            ),
        )

    async def establish(self, remote: IceParams, timeout: float) -> IcePath | None:
        """Run the checks against the peer's parameters; the chosen path, or None (failed or timed out)."""
        conn = self.connection
        conn.remote_username = remote.ufrag
        conn.remote_password = remote.pwd
        for c in remote.candidates:
            if c.type == "prflx" or ipaddress.ip_address(c.host).version != 4:
                continue  # aioice pairs IPv4 host/srflx/relay only; prflx is learned from checks
            await conn.add_remote_candidate(Candidate(c.foundation, 1, "udp", c.priority, c.host, c.port, c.type))
        await conn.add_remote_candidate(None)
        self.agent.count("ice checks started")
        try:
            await asyncio.wait_for(conn.connect(), timeout)
        except (TimeoutError, ConnectionError):
            self.agent.count("ice checks failed")
            return None
        pair = conn._nominated.get(1)
        if pair is None:
            return None
        self.agent.count("ice checks succeeded")
        view = pair.protocol
        remote_addr = (pair.remote_addr[0], pair.remote_addr[1])
        relayed = pair.remote_candidate.type == "relay"  # the peer's TURN address: its server adds a header
        if isinstance(view, _View) and view.allocation is not None:
            self.selected = view.allocation.path(remote_addr)
            if relayed:
                view.allocation.through_turn(remote_addr)
        else:
            self.selected = UdpPath(self.agent.underlay, remote_addr, pair.remote_candidate.type)
            if relayed:
                self.agent.underlay.through_turn(remote_addr)
        return self.selected

    def view_for(self, allocation: TurnAllocation | None) -> _View | None:
        return self.relay_views.get(allocation) if allocation is not None else self.host_view

    async def close(self) -> None:
        self.agent.sessions.pop(self.ufrag, None)
        await self.connection.close()


@dataclass
class IceAgent:
    """The node's ICE machinery: candidates, STUN demultiplexing, TURN allocations, sessions by ufrag."""

    settings: IceSettings
    underlay: DatagramSender
    on_relay_packet: Callable[[bytes, TurnPath], None]
    counters: dict[str, int] = field(default_factory=dict)
    sessions: dict[str, IceSession] = field(default_factory=dict)
    transactions: dict[bytes, Any] = field(default_factory=dict)
    allocations: list[TurnAllocation] = field(default_factory=list)
    # Called when our host or server-reflexive addresses change (a new network, a NAT rebinding).
    on_address_change: Callable[[], None] = lambda: None
    _srflx: dict[Endpoint, Endpoint] = field(default_factory=dict)
    _srflx_via: dict[Endpoint, str] = field(default_factory=dict)  # the address each STUN server was asked at
    _host: list[Candidate] = field(default_factory=list)
    _host_at: float = -1e18
    _srflx_at: float = -1e18
    _turn_retry: dict[int, float] = field(default_factory=dict)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _started: float | None = None
    _now: float = 0.0  # the clock of the latest tick
    _checking: set[int] = field(default_factory=set)  # allocations whose Refresh check is out
    _first_round: set[Any] = field(default_factory=set)  # STUN servers and TURN allocations not answered yet
    _unresolved: set[Endpoint] = field(default_factory=set)  # STUN servers whose names did not resolve last time

    def __post_init__(self) -> None:
        self.local_endpoint = self.underlay.local_endpoint
        # STUN goes out of the underlay socket: a named server must resolve to an address of its family.
        self._names = Resolved(socket.AF_INET6 if ":" in self.local_endpoint[0] else socket.AF_INET)
        self._gather_view = _View(self, self._candidate("host", self.local_endpoint[0], self.local_endpoint[1]), None)
        for server in self.settings.turn:
            self.allocations.append(TurnAllocation(server, self.on_relayed_stun, self.on_relay_packet))

    def session(self, controlling: bool, *, relay: bool, peer_relays: bool | None = None) -> IceSession:
        """A new link attempt's ICE session on this agent (its caller need not load this module). `relay`: a round
        with TURN relays; `peer_relays`: whether the peer's offer carried any (None when we offer first)."""
        return IceSession(self, controlling, relay=relay, peer_relays=peer_relays)

    def count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    # -- candidates ----------------------------------------------------------------------------------------
    @staticmethod
    def _candidate(kind: str, host: str, port: int, local_pref: int = 65535, base: str | None = None) -> Candidate:
        return Candidate(
            foundation=candidate_foundation(kind, "udp", base or host),
            component=1,
            transport="udp",
            priority=candidate_priority(1, kind, local_pref),
            host=host,
            port=port,
            type=kind,
        )

    def _host_addresses(self) -> list[str]:
        bound = self.local_endpoint[0]
        if bound not in ("0.0.0.0", "::"):
            return [bound]
        s = self.settings
        found = []
        for adapter in ifaddr.get_adapters():
            if adapter.nice_name in s.exclude_interfaces or adapter.name in s.exclude_interfaces:
                continue
            for ip in adapter.ips:
                if not isinstance(ip.ip, str):
                    continue  # IPv6: the underlay socket is IPv4 when bound to 0.0.0.0
                address = ipaddress.IPv4Address(ip.ip)
                if address.is_loopback or address.is_link_local or any(address in n for n in s.exclude_networks):
                    continue
                found.append(ip.ip)
        return found

    def host_candidates(self) -> list[Candidate]:
        return list(self._host)

    def mapping(self) -> str:
        """Our NAT's mapping behaviour, as the STUN servers' last answers show it (status)."""
        answers = [(self._srflx_via.get(server, server[0]), mapped) for server, mapped in self._srflx.items()]
        return mapping_behaviour({c.host for c in self._host}, answers)

    @property
    def needs_own_relay(self) -> bool:
        """Whether peers may need our TURN relay to reach us: yes unless the STUN servers showed a public address
        or an endpoint-independent mapping (unknown counts as needing it)."""
        return not self.mapping().startswith(REACHABLE_MAPPINGS)

    def srflx_candidates(self) -> list[Candidate]:
        hosts = {c.host for c in self._host}
        seen: set[Endpoint] = set()
        out = []
        for mapped in self._srflx.values():
            if mapped[0] in hosts or mapped in seen:
                continue  # a public host address: the srflx candidate adds nothing (RFC 8445 5.1.3)
            seen.add(mapped)
            c = self._candidate("srflx", mapped[0], mapped[1], base=self.local_endpoint[0])
            c.related_address, c.related_port = self.local_endpoint
            out.append(c)
        return out

    def relay_candidates(self) -> list[tuple[TurnAllocation, Candidate]]:
        out = []
        for i, allocation in enumerate(self.allocations):
            if allocation.ready and allocation.relayed is not None:
                host, port = allocation.relayed
                # Prefer relays over UDP to relays over TCP or TLS (RFC 8445 5.1.2.1: local preference).
                pref = 65535 - i - (1000 if allocation.server.transport != "udp" else 0)
                out.append((allocation, self._candidate("relay", host, port, pref, base=allocation.server.host)))
        return out

    @property
    def has_relay(self) -> bool:
        return any(a.ready for a in self.allocations)

    # -- the clock -------------------------------------------------------------------------------------------
    def start(self, now: float) -> None:
        self._started = now
        self._first_round = set(self.settings.stun) | set(self.allocations)
        self.tick(now)

    def refresh_soon(self, now: float) -> None:
        """Ask the STUN servers and look at our interfaces again at the next tick (at most every SRFLX_RECHECK)."""
        if now - self._srflx_at >= SRFLX_RECHECK:
            self._srflx_at = -1e18
            self._host_at = -1e18

    def gathering(self, now: float) -> bool:
        """Whether the first round of STUN and TURN requests is still out (for at most GATHER_WAIT): an offer
        made now would lack our server-reflexive and relayed candidates."""
        return bool(self._first_round) and self._started is not None and now - self._started < GATHER_WAIT

    async def gathered(self) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + GATHER_WAIT
        while self._first_round and loop.time() < end:
            await asyncio.sleep(0.05)

    def tick(self, now: float) -> None:
        """Refresh host and server-reflexive candidates, keep TURN allocations and channels up."""
        self._now = now
        if now - self._host_at >= HOST_REFRESH:
            self._host_at = now
            addresses = self._host_addresses()
            port = self.local_endpoint[1]
            fresh = [self._candidate("host", a, port, 65535 - i) for i, a in enumerate(addresses)]
            if [c.host for c in fresh] != [c.host for c in self._host]:
                changed = bool(self._host)
                self._host = fresh
                if changed:
                    log.info("host addresses now %s", ", ".join(addresses) or "none")
                    self._addresses_changed()
        if self.settings.stun and now - self._srflx_at >= SRFLX_REFRESH:
            self._srflx_at = now
            for server in self.settings.stun:
                self._spawn(self._ask_stun(server))
        loop_now = asyncio.get_running_loop().time()
        for i, allocation in enumerate(self.allocations):
            if allocation.ready:
                allocation.tick(loop_now)
            elif now >= self._turn_retry.get(i, now):
                self._turn_retry[i] = now + TURN_RETRY
                self._spawn(self._allocate(allocation))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ask_stun(self, server: Endpoint) -> None:
        request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
        try:
            address = await self._names.address(server, self._now)
        except OSError as e:
            self._first_round.discard(server)
            self.count("stun server names not resolved")
            if server not in self._unresolved:  # once until it resolves again, not every round
                self._unresolved.add(server)
                log.warning("STUN server %s:%d: %s; asking again every %.0f s", *server, e, SRFLX_REFRESH)
            return
        if server in self._unresolved:
            self._unresolved.discard(server)
            log.info("STUN server %s:%d resolves again: %s", *server, address[0])
        try:
            response, _ = await self._gather_view.request(request, address, retransmissions=STUN_TIMEOUT_TRIES)
        except stun.TransactionError:
            self.count("stun requests unanswered")
            self._names.forget(server)
            return
        finally:
            self._first_round.discard(server)
        mapped = response.attributes.get("XOR-MAPPED-ADDRESS")
        if not mapped:
            return
        mapped = (str(mapped[0]), int(mapped[1]))
        old = self._srflx.get(server)
        self._srflx[server] = mapped
        self._srflx_via[server] = address[0]
        if old is not None and old != mapped:
            log.info("server-reflexive address changed %s:%d -> %s:%d", *old, *mapped)
            self._addresses_changed()

    def _addresses_changed(self) -> None:
        self.count("address changes")
        # Whatever moved our underlay socket's mapping may have moved our TURN sockets' too: an allocation is
        # bound to the 5-tuple it was made from (RFC 8656 section 2.2), and aioice would notice only at its next
        # refresh, 500 s on. Check each now, so the relayed candidates the ICE restarts offer are alive.
        for i, allocation in enumerate(self.allocations):
            if allocation.ready and i not in self._checking:
                self._checking.add(i)
                self._spawn(self._check_allocation(i, allocation))
        self.on_address_change()

    async def _check_allocation(self, i: int, allocation: TurnAllocation) -> None:
        try:
            if await allocation.still_ours(ALLOCATION_CHECK_TIMEOUT) or not allocation.ready:
                return
            self.count("turn allocations lost")
            log.info("TURN allocation at %s no longer reaches us (our mapping changed): allocating anew",
                     allocation.server.describe())  # fmt: skip
            self._turn_retry[i] = self._now + TURN_RETRY  # so the tick starts no second allocation meanwhile
            await allocation.close()
            await self._allocate(allocation)
        finally:
            self._checking.discard(i)

    async def _allocate(self, allocation: TurnAllocation) -> None:
        try:
            relayed = await asyncio.wait_for(allocation.allocate(), ALLOCATE_TIMEOUT)
        except (TimeoutError, OSError, ConnectionError, stun.TransactionError) as e:
            self._first_round.discard(allocation)
            self.count("turn allocations failed")
            error = str(e) or f"no answer within {ALLOCATE_TIMEOUT:g} s"
            # Once, and again when the reason changes: a server down for a day would otherwise log every try.
            say = log.warning if error != allocation.error else log.debug
            say("TURN allocation at %s failed: %s; trying again every %.0f s (status shows the last error)",
                allocation.server.describe(), error, TURN_RETRY)  # fmt: skip
            allocation.error = error
            return
        self._first_round.discard(allocation)
        self.count("turn allocations")
        after = f" (after: {allocation.error})" if allocation.error else ""
        allocation.error = None
        log.info("TURN allocation at %s: relayed address %s:%d%s", allocation.server.describe(), *relayed, after)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for session in list(self.sessions.values()):
            await session.close()
        for allocation in self.allocations:
            await allocation.close()

    # -- STUN demultiplexing -----------------------------------------------------------------------------------
    def on_stun(self, data: bytes, addr: Endpoint) -> None:
        """A datagram on the underlay socket whose first byte says STUN (or ChannelData, which we never expect
        there)."""
        self._dispatch(data, addr, None)

    def on_relayed_stun(self, data: bytes, peer: Endpoint, allocation: TurnAllocation) -> None:
        self._dispatch(data, peer, allocation)

    def _dispatch(self, data: bytes, addr: Endpoint, allocation: TurnAllocation | None) -> None:
        try:
            message = stun.parse_message(data)
        except Exception:  # aioice's parser raises several types on hostile bytes; all mean "not STUN"
            self.count("drop: malformed STUN")
            return
        if message.message_class in (stun.Class.RESPONSE, stun.Class.ERROR):
            transaction = self.transactions.get(message.transaction_id)
            if transaction is None:
                self.count("drop: STUN response to no request")
                return
            transaction.response_received(message, addr)
            return
        if message.message_class != stun.Class.REQUEST:
            self.count("drop: STUN indication")
            return
        username = message.attributes.get("USERNAME")
        session = self.sessions.get(username.split(":", 1)[0]) if isinstance(username, str) else None
        view = session.view_for(allocation) if session is not None else None
        if session is None or view is None:
            self.count("drop: ICE check for no session")
            return
        self.count("ice checks received")
        try:
            session.connection.request_received(message, addr, view)  # type: ignore[arg-type]
        except (KeyError, ValueError, TypeError):
            self.count("drop: malformed ICE check")
