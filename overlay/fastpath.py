"""The compiled data path's driver: keeps overlay._fast.Engine's tables current and takes what it passes up.

The Engine (overlay/_fast.c) runs on a thread of its own: it reads the TAP and the UDP socket, and handles data
between this node and the members it has links to (direct, or tunnelled through a neighbour) and a neighbour's
RELAY, without entering Python. Everything else comes up here through a SOCK_SEQPACKET socketpair, one message
per frame or datagram, and goes where the node's own reads would have sent it (DataPath.from_tap,
UdpUnderlay.deliver). This side:
- mirrors each link the Engine can serve: its session's Keys; the previous session's, still opened after a
  rekey; the next one's, which the peer's first packet on it makes current (the Engine says so, take()), as
  on the Python path; its path (a UDP endpoint or the neighbour a tunnel goes through), whether 60 KB
  datagrams cross it, the address the sender's certificate gives it;
- tells it, for each destination address the Python path just sent to over a link to its owner, to send the
  next packets there itself; a flow FLOW_TTL old, and every flow when routes change (Router.forget_routes), is
  checked again (DataPath.flow) while the Engine goes on using it. A flow is handed over after the batch's
  flush, when what this side sent has left; if frames to that address are still on their way up, the Engine
  holds the flow's next frames until this side says (Engine.sent) it has sent those: the Engine's packets
  never overtake the ones sent from here. Of the frames to an address without a flow only the first comes up;
  the Engine holds the next ones until this side has taken it, then sends them on the flow set meanwhile or
  passes them up;
- folds what the Engine carried into the links (bytes, liveness for maintenance, "busy" for the busy
  keepalive) when the Engine says something happened (at most every 100 ms), and on each tick.
With `lanes` above 1 there is an Engine per lane, each with a thread, a queue of the multi-queue TAP and a
socket on the node's port of its own (docs/datapath.md, Lanes): each gets every table change, each passes up
through its own socketpair (frames are numbered per Engine), and what they carried is added up. Engine k seals
in lane k for peers whose HELLO said they take lanes (HELLO_LANES), in lane 0 for the others, except the TCP
connections this node opens: each is sealed in the lane least busy at its SYN (the Engines share their load and
those lanes), whichever Engine reads it, which brings the connection to that lane at both ends.
A SocialVPN node drives it the same way (`social`, overlay/social/datapath.py): its flows are friend devices' DATA,
each with the device's view of the addresses the Engine writes into the packets.
docs/datapath.md has the measurements behind it.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from typing import Any, NamedTuple

from overlay._fast import UP_HEADER, Engine, Keys
from overlay.link import SEND_LANE, Link, TunnelPath
from overlay.links import LinkManager
from overlay.transport.paths import UdpPath
from overlay.transport.underlay import UdpUnderlay
from overlay.wire import Endpoint

# Our choice: how long the Engine sends to an address on its own before the Python path looks again (DHT
# cache, routes, link), without holding up the packets: one check a second per active destination.
FLOW_TTL = 2.0
UP_BATCH = 256  # messages per wake-up of the loop, as the underlay's DRAIN_BATCH
UP_BUFFER = 8 << 20  # our choice: absorbs a burst of passed-up super-frames while the loop is busy
UP_MAX = UP_HEADER + 65536 + 512
_UP_DATAGRAM, _UP_FRAME, _UP_NOTE, _UP_FLOW, _UP_UNREACHABLE = 1, 2, 3, 4, 5
_HEAD = struct.Struct("!BBH16s")  # type, family (4/6, 0 for none), port, address
_SEQ = struct.Struct("!I")  # a frame's number, at 4


class LinkState(NamedTuple):
    """A link as the Engine sees it: Engine.set_link's arguments after the peer."""

    keys: Keys
    local_index: int
    remote_index: int
    endpoint: tuple[int, bytes, int, int] | None  # family, packed address, port, chunk size; None for a tunnel
    relay: int  # the neighbour a tunnel goes through (0 for none)
    big_ok: bool
    source: int  # the address the peer's certificate gives it; -1 not known (yet), and nothing is checked
    tunnel_ok: bool
    previous: tuple[Keys, int] | None  # the session before the last rekey: its Keys and local index
    next: tuple[Keys, int] | None  # the session we answered the peer's rekey with, until the peer uses it
    lanes_ok: bool  # the peer keeps a replay window per lane (its HELLO said so)


class _Lane:
    """One Engine, the socketpair it passes up through, and the number of the last frame taken from it."""

    def __init__(self, index: int, engine: Engine, up: socket.socket, engine_end: socket.socket) -> None:
        self.index, self.engine, self.up, self.engine_end = index, engine, up, engine_end
        self.sent = 0


class FastPath:
    def __init__(
        self,
        links: LinkManager,
        datapath: Any,
        router: Any,
        underlay: UdpUnderlay,
        heard: Callable[[Link], object],
        node_id: int,
        prefix_len: int,
        *,
        social: bool = False,
    ) -> None:
        """`social`: a SocialVPN node's (overlay/social/datapath.py): flows are DATA messages to friend devices, each
        with the addresses its packets leave with, and what arrives is DATA from a device."""
        tap, vnic = datapath.tap, datapath.vnic
        self._links, self._datapath, self._router = links, datapath, router
        self._underlay, self._heard = underlay, heard
        self._check_sources = datapath.source_of is not None
        taps = (tap.fileno(), *getattr(tap, "queues", ()))
        udps = (underlay.fileno(), *(sock.fileno() for sock in underlay.lane_socks))
        self._lanes: list[_Lane] = []
        # As many TAP queues as sockets (strict): a socket no Engine read would lose its lane's datagrams.
        for lane, (tap_fd, udp_fd) in enumerate(zip(taps, udps, strict=True)):
            up, engine_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            for sock, option in ((up, socket.SO_RCVBUF), (engine_end, socket.SO_SNDBUF)):
                sock.setsockopt(socket.SOL_SOCKET, option, UP_BUFFER)
                sock.setblocking(False)
            engine = Engine(
                tap_fd=tap_fd,
                vnet_hdr=tap.vnet_hdr,
                udp_fd=udp_fd,
                up_fd=engine_end.fileno(),
                gso=underlay.gso,
                chunk=underlay.chunk,
                node_id=node_id,
                address=datapath.address_int,
                prefix_len=prefix_len,
                check_sources=self._check_sources,
                lane=lane,
                # The lanes share what each carries, for the lane a new TCP connection starts in.
                first=self._lanes[0].engine if self._lanes else None,
                address6=None if vnic.address6 is None else vnic.address6.to_bytes(16, "big"),
                prefix6_len=vnic.prefix6_len,
                social=social,
                # Read before udp_fd: the lane's express datagrams (docs/datapath.md, Express lanes).
                express_fd=underlay.express_socks[lane].fileno() if underlay.express_socks else -1,
            )
            self._lanes.append(_Lane(lane, engine, up, engine_end))
        self._pushed: dict[int, LinkState] = {}
        self._refused = 0  # the Engine's GSO sends above a route's MTU, as of the last sync
        # Flows to hand over at the end of this batch (address -> peer, header), and the number of the last
        # frame this side has taken from the Engine (its UP_HEADER, bytes 4-8).
        self._flows: dict[int, tuple[int, bytes, tuple[int, int] | None]] = {}
        self._macs = b""
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._underlay.hand_over_reads()
        for lane in self._lanes:
            self._loop.add_reader(lane.up.fileno(), self._drain, lane)
        self._links.on_change = self.link_changed
        self._datapath.fast = self
        self._router.routes_changed = self._recheck_flows
        self._sync_macs()
        for peer in list(self._links.links):
            self.link_changed(peer)
        for lane in self._lanes:
            lane.engine.start()

    def stop(self) -> None:
        """Stop the threads (before the UDP sockets and the TAP close: they use both)."""
        for lane in self._lanes:
            lane.engine.stop()
            if self._loop is not None:
                self._loop.remove_reader(lane.up.fileno())
        self._links.on_change = lambda peer: None
        self._datapath.fast = None
        self._router.routes_changed = lambda: None
        for lane in self._lanes:
            lane.up.close()
            lane.engine_end.close()

    def _recheck_flows(self) -> None:
        for lane in self._lanes:
            lane.engine.recheck_flows()

    # -- the tables ----------------------------------------------------------------------------------------------
    def link_changed(self, peer: int) -> None:
        link = self._links.links.get(peer)
        state = None if link is None else self._state(link)
        if state is None:
            if self._pushed.pop(peer, None) is not None:
                for lane in self._lanes:
                    lane.engine.drop_link(peer)
            return
        if self._pushed.get(peer) != state:
            self._pushed[peer] = state
            for lane in self._lanes:
                lane.engine.set_link(peer, *state)

    def _state(self, link: Link) -> LinkState | None:
        path = link.path
        endpoint: tuple[int, bytes, int, int] | None
        if isinstance(path, UdpPath):
            endpoint, relay = (*_packed(path.endpoint), self._underlay.chunk_for(path.endpoint)), 0
        elif isinstance(path, TunnelPath):
            endpoint, relay = None, path.relay
        else:
            return None  # through our TURN allocation: the Python path's
        source = -1
        if self._check_sources:
            allowed = self._datapath.source_of(link.peer_id)
            source = -1 if allowed is None else allowed
        session, previous, nxt = link.session, link.previous, link.next_session
        return LinkState(
            session.keys,
            session.local_index,
            session.remote_index,
            endpoint,
            relay,
            link.fragments_ok,
            source,
            link.tunnels_ok,
            None if previous is None else (previous.keys, previous.local_index),
            None if nxt is None else (nxt.keys, nxt.local_index),
            link.lanes_ok,
        )

    def set_flow(self, address: int, peer: int, header: bytes, rewrite: tuple[int, int] | None = None) -> None:
        """The Python path just sent to `address` on its link to `peer`: the Engine takes the next packets, from
        the end of this batch (_hand_over). `rewrite` (SocialVPN): the source and destination they leave with."""
        if peer in self._pushed:  # a link the Engine cannot serve (TURN) would only send every packet back up
            self._flows[address] = (peer, header, rewrite)

    def drop_flow(self, address: int) -> None:
        """What the Python path would send to `address` changed (SocialVPN: a device's addresses): ask again."""
        self._flows.pop(address, None)
        for lane in self._lanes:
            lane.engine.drop_flow(address)

    def _hand_over(self) -> None:
        flows, self._flows = self._flows, {}
        for address, (peer, header, rewrite) in flows.items():
            for lane in self._lanes:
                lane.engine.set_flow(address, peer, header, FLOW_TTL, lane.sent, *(rewrite or ()))

    def _recheck(self, address: int) -> None:
        """The Engine's flow to `address` is FLOW_TTL old: keep it if the Python path would still send there."""
        flow = self._datapath.flow(address)  # (peer, header), or (peer, header, rewrite) for SocialVPN
        if flow is None or flow[0] not in self._pushed:  # gone, or now on a link the Engine cannot serve
            self.drop_flow(address)
        else:
            self.set_flow(address, *flow)

    def _sync_macs(self) -> None:
        vnic = self._datapath.vnic
        macs = vnic.tap_mac + vnic.gateway_mac
        if macs != self._macs:
            self._macs = macs
            for lane in self._lanes:
                lane.engine.set_macs(vnic.tap_mac, vnic.gateway_mac)

    # -- what the Engine did -------------------------------------------------------------------------------------
    def sync(self) -> None:
        """Fold what the Engine carried since the last call into the links, as the Python path would have."""
        hops = self._datapath.hops
        links = self._links.links
        taken = [row for lane in self._lanes for row in lane.engine.take()]
        for peer, tx, rx, delivered, hop_sum, sent, received, next_used in taken:
            hops[0] += delivered
            hops[1] += hop_sum
            link = links.get(peer)
            if link is None:
                continue
            link.tx_bytes += tx
            link.rx_bytes += rx
            if sent and not link.busy:
                link.busy = True
                self._router.on_sent(link, True)
            if received:  # after on_sent: what arrived since answers what went out
                self._heard(link)
            if next_used:
                self._links.next_used(peer)
        refused = sum(lane.engine.counters()["gso: above the route's MTU"] for lane in self._lanes)
        if refused != self._refused:
            # A route refused chunks of the size its MTU had: it shrank. Ask the routes again.
            self._refused = refused
            self._underlay.forget_paths()
            for peer in list(self._pushed):
                self.link_changed(peer)
        if self._check_sources:
            # A sender whose certificate we learn later (from its address record) may use the Engine from then on.
            for peer, state in list(self._pushed.items()):
                if state.source == -1:
                    self.link_changed(peer)
        self._sync_macs()

    @property
    def lanes(self) -> int:
        return len(self._lanes)

    def counters(self) -> dict[str, int]:
        each = [lane.engine.counters() for lane in self._lanes]
        out = {f"fast path: {k}": sum(c[k] for c in each) for k in each[0]}
        out = {k: v for k, v in out.items() if v}
        # The Engines' threads run with a short scheduler slice where the kernel has one (overlay/_thread.h).
        slice_ns = min(lane.engine.slice_ns for lane in self._lanes)
        if slice_ns:
            out["fast path: scheduler slice, us"] = slice_ns // 1000
        if len(each) > 1:
            # How evenly the flows spread over the lanes (the TAP's flow hash picks a flow's lane, except for the TCP
            # connections, UDP flows and pings this node starts: the least busy lane when each started).
            out.update((f"fast path: lane {i}: {k}", v) for i, c in enumerate(each) for k, v in c.items() if v)
        return out

    def _drain(self, lane: _Lane) -> None:
        recv = lane.up.recv
        frames: list[bytes] = []
        underlay = self._underlay
        underlay.hold()
        # What this lane passed up leaves in its lane and reaches the TAP by its queue (SEND_LANE says why).
        token = SEND_LANE.set(lane.index)
        if len(self._lanes) > 1:
            self._datapath.tap.use_queue(lane.index)
        try:
            for _ in range(UP_BATCH):
                try:
                    msg = recv(UP_MAX)
                except BlockingIOError:
                    break
                kind = msg[0]
                if kind == _UP_FRAME:
                    frames.append(msg[UP_HEADER:])
                    lane.sent = _SEQ.unpack_from(msg, 4)[0]
                elif kind == _UP_DATAGRAM:
                    underlay.deliver(msg[UP_HEADER:], _source(msg))
                elif kind == _UP_FLOW:  # the address: 4 bytes IPv4, 16 IPv6
                    self._recheck(int.from_bytes(msg[UP_HEADER:], "big"))
                elif kind == _UP_UNREACHABLE:
                    underlay.unreachable(_source(msg))
                else:
                    self.sync()
            if frames:
                self._datapath.from_tap(frames)
        finally:
            underlay.flush()
            self._hand_over()
            lane.engine.sent(lane.sent)
            SEND_LANE.reset(token)
            if len(self._lanes) > 1:
                self._datapath.tap.use_queue(0)


def _packed(endpoint: Endpoint) -> tuple[int, bytes, int]:
    host, port = endpoint
    host = host.split("%", 1)[0]
    if ":" in host:
        return (6, socket.inet_pton(socket.AF_INET6, host), port)
    return (4, socket.inet_pton(socket.AF_INET, host), port)


def _source(msg: bytes) -> Endpoint:
    _, family, port, address = _HEAD.unpack_from(msg)
    if family == 4:
        return (socket.inet_ntop(socket.AF_INET, address[:4]), port)
    return (socket.inet_ntop(socket.AF_INET6, address), port)
