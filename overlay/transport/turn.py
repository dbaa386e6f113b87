"""One TURN allocation (RFC 8656) serving every link that needs a relay, with data on our own batched path.

aioice's TURN client does the protocol (Allocate with long-term credentials, Refresh, ChannelBind); this module
owns the socket. Over UDP the socket is read with `loop.add_reader` and drained in batches like the underlay
(ARCHITECTURE.md: asyncio datagram protocols cost 0.3-0.4 Gbit/s against 1.2-1.6 for a batched drain); over TCP
aioice's stream framing is kept and ChannelData is taken off it before it reaches aioice.

Data uses channels (RFC 8656 section 12): a 4-byte ChannelData header instead of a 36-byte Send indication. A
channel is bound per peer the first time something is sent to it, and re-bound every CHANNEL_REFRESH while it
is in use: a ChannelBind also refreshes the peer's permission, which lasts only 300 s (section 9), so aioice's
own 500 s re-binding would let the permission lapse.

A datagram bigger than a chunk (a TCP super-frame, the fragment probe: docs/datapath.md) goes as chunks
(overlay/transport/chunks.py), each in a ChannelData of its own, all of them in one UDP GSO send over UDP: the
server relays each as a datagram that fits the path to the peer, which joins them as it joins the chunks of
a peer's own socket. Sent whole, the server had to relay a 60 KB datagram as IP fragments, and coturn relayed
none: the probe went unanswered, and every super-frame to such a link was cut into TCP segments in Python and
each sent on its own.

A node holds one allocation per configured TURN server, whatever its number of links: the sockets it holds
are bounded by the configuration (docs/nat-traversal.md).
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
import struct
import time
from collections.abc import Callable
from typing import Any

from aioice import stun
from aioice.turn import TurnClientTcpProtocol, TurnClientUdpProtocol, is_channel_data

from overlay.transport.chunks import MAX_CHUNKS, Reassembly, chunk_count, chunk_size, cut
from overlay.transport.paths import TurnPath, TurnServer
from overlay.transport.servers import resolve
from overlay.transport.underlay import SOL_UDP, TURN_HEADROOM, UDP_SEGMENT, route_mtu, segments, try_option
from overlay.wire import Endpoint, PacketType

log = logging.getLogger(__name__)

CHANNEL_FIRST = 0x4000  # RFC 8656 section 12: channel numbers 0x4000-0x4FFF
CHANNEL_LAST = 0x4FFF
CHANNEL_REFRESH = 240.0  # our choice: inside the 300 s permission lifetime (RFC 8656 section 9)
ALLOCATION_LIFETIME = 600  # seconds; RFC 8656 section 7.2 default, refreshed by aioice at 5/6 of it
DRAIN_BATCH = 256  # as the underlay: bounds the time one busy socket holds the loop
SOCKET_BUFFER = 4 << 20
_CHANNEL_HEADER = struct.Struct("!HH")


# What an allocation hands up: a STUN message from a peer (an ICE check through the relay), and a link packet.
StunHandler = Callable[[bytes, Endpoint, "TurnAllocation"], None]
PacketHandler = Callable[[bytes, TurnPath], None]


class _UdpShim:
    """The part of a datagram transport aioice's TURN client uses, over our own unconnected socket."""

    def __init__(self, sock: socket.socket, server: Endpoint) -> None:
        self.sock = sock
        self.server = server
        self.closed = False

    def sendto(self, data: bytes, addr: Any = None) -> None:
        try:
            self.sock.sendto(data, self.server)
        except OSError:
            pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class _TcpTurnProtocol(TurnClientTcpProtocol):
    """aioice's TCP client with ChannelData taken off the stream for our own path."""

    owner: TurnAllocation

    def datagram_received(self, data: bytes | str, addr: tuple[str, int]) -> None:
        assert isinstance(data, bytes)
        if len(data) >= 4 and is_channel_data(data):
            self.owner.on_channel_data(data)
        else:
            super().datagram_received(data, addr)


class TurnAllocation:
    def __init__(self, server: TurnServer, on_stun: StunHandler, on_packet: PacketHandler) -> None:
        self.server = server
        self.on_stun = on_stun
        self.on_packet = on_packet
        self.relayed: Endpoint | None = None
        self.mapped: Endpoint | None = None
        self.counters: dict[str, int] = {}
        self.error: str | None = None  # why the last try to allocate failed, until one succeeds (status)
        self._proto: TurnClientUdpProtocol | _TcpTurnProtocol | None = None
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._peer_channel: dict[Endpoint, int] = {}
        self._channel_peer: dict[int, Endpoint] = {}
        self._bound_at: dict[int, float] = {}
        self._binding: dict[Endpoint, asyncio.Task[None]] = {}
        self._queued: dict[Endpoint, list[bytes]] = {}
        # A peer that reaches our relayed address from its own socket cuts big datagrams into chunks there
        # (overlay/transport/underlay.py); the server relays each chunk on the channel, so they are joined here.
        self._reassembly = Reassembly(self.counters)
        self._paths: dict[Endpoint, TurnPath] = {}
        self._next_channel = CHANNEL_FIRST
        self._send_raw: Callable[[bytes], None] = lambda data: None
        # ChannelData messages of chunks, in one send; over UDP each must fit the path to the server.
        self._send_frames: Callable[[list[bytes]], None] = lambda frames: None
        self._server_payload: int | None = None  # UDP: the most a datagram to the server carries unfragmented
        self._message_id = random.getrandbits(32)  # our chunks' IDs, as the underlay's: per sender, random start
        self._gso = False  # UDP: the kernel takes UDP_SEGMENT
        self._relayed: set[Endpoint] = set()  # peers that are TURN relayed addresses themselves (chunk_for)
        self._address: Endpoint = (server.host, server.port)  # UDP: where the name resolved at the allocation

    def count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    @property
    def ready(self) -> bool:
        return self.relayed is not None and not self.closed

    @property
    def closed(self) -> bool:
        proto = self._proto
        return proto is None or proto.transport is None or proto.transport.is_closing()

    # -- allocation ------------------------------------------------------------------------------------------
    async def allocate(self) -> Endpoint:
        """Create the allocation; raises OSError/ConnectionError/stun.TransactionError when it cannot."""
        loop = self._loop = asyncio.get_running_loop()
        s = self.server
        if s.transport in ("tcp", "tls"):
            # RFC 7065: turns: is TURN over TLS over TCP, framed as over TCP. The certificate must name the
            # URL's host (an address needs it as an IP address SAN); `ca_file` replaces the system's trust store.
            tls = ssl.create_default_context(cafile=s.ca_file) if s.transport == "tls" else None
            address = (s.host, s.port)
            _, proto = await loop.create_connection(
                lambda: _TcpTurnProtocol(address, s.username, s.password, ALLOCATION_LIFETIME, int(CHANNEL_REFRESH)),
                host=s.host,
                port=s.port,
                ssl=tls,
                server_hostname=s.host if tls is not None else None,
            )
            proto.owner = self
            self._proto = proto
            tcp_transport = proto.transport

            def send_tcp(data: bytes) -> None:
                tcp_transport.write(proto._padded(data))

            def send_tcp_frames(frames: list[bytes]) -> None:
                # Over a stream each ChannelData is padded to a multiple of 4 bytes (RFC 8656 section 12.5).
                tcp_transport.write(b"".join([proto._padded(frame) for frame in frames]))

            self._send_raw = send_tcp
            self._send_frames = send_tcp_frames
        else:
            address = self._address = await resolve((s.host, s.port))
            family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
            sock = self._sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            sock.setblocking(False)
            udp = TurnClientUdpProtocol(address, s.username, s.password, ALLOCATION_LIFETIME, int(CHANNEL_REFRESH))
            udp.connection_made(_UdpShim(sock, address))  # type: ignore[arg-type]
            self._proto = udp
            loop.add_reader(sock.fileno(), self._drain)

            self._send_raw = self._send_udp
            self._send_frames = self._send_udp_frames
            self._gso = try_option(sock, SOL_UDP, UDP_SEGMENT, 0)
            version = 6 if family == socket.AF_INET6 else 4
            self._server_payload = chunk_size(version, route_mtu(address, version))
        try:
            relayed = await self._proto.connect()
        except BaseException:
            await self.close()
            raise
        self.relayed = (relayed[0], relayed[1])
        mapped = self._proto.mapped_address
        self.mapped = (mapped[0], mapped[1]) if mapped else None
        return self.relayed

    async def still_ours(self, timeout: float) -> bool:
        """Whether the server still knows this allocation by our address and port: a Refresh it accepts. A NAT
        that mapped our socket anew (a rebooted router, a roaming member) leaves the allocation bound to the old
        5-tuple, so the server answers 437 Allocation Mismatch (RFC 8656 section 7.3) or our old mapping gets
        the answer; either way nothing relayed reaches us until we allocate again."""
        proto = self._proto
        if proto is None or not self.ready:
            return False
        request = stun.Message(message_method=stun.Method.REFRESH, message_class=stun.Class.REQUEST)
        request.attributes["LIFETIME"] = ALLOCATION_LIFETIME
        try:
            await asyncio.wait_for(proto.request_with_retry(request), timeout)
        except (TimeoutError, OSError, ConnectionError, stun.TransactionError):
            return False
        return True

    async def close(self) -> None:
        for task in self._binding.values():
            task.cancel()
        self._binding.clear()
        # Channels belong to the allocation: a new one (allocate() again) binds its own.
        self._peer_channel.clear()
        self._channel_peer.clear()
        self._bound_at.clear()
        self._queued.clear()
        self._relayed.clear()
        self._next_channel = CHANNEL_FIRST
        proto, self._proto = self._proto, None
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
        if proto is not None and self.relayed is not None:
            try:
                await asyncio.wait_for(proto.delete(), 2.0)
            except (TimeoutError, OSError, ConnectionError, stun.TransactionError):
                pass
        if proto is not None and proto.transport is not None:
            proto.transport.close()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.relayed = None

    # -- receiving -------------------------------------------------------------------------------------------
    def _drain(self) -> None:
        sock, proto = self._sock, self._proto
        if sock is None or proto is None:
            return
        for _ in range(DRAIN_BATCH):
            try:
                data = sock.recv(65535)
            except BlockingIOError:
                return
            except OSError:
                self.count("receive errors")
                continue
            if len(data) >= 4 and is_channel_data(data):
                self.on_channel_data(data)
            else:
                proto.datagram_received(data, self._address)

    def on_channel_data(self, data: bytes) -> None:
        channel, length = _CHANNEL_HEADER.unpack_from(data)
        peer = self._channel_peer.get(channel)
        if peer is None or len(data) < 4 + length or length == 0:
            self.count("drop: channel data for no channel")
            return
        payload = data[4 : 4 + length]
        if payload[0] == PacketType.CHUNK:
            whole = self._reassembly.take(payload, peer, time.monotonic())
            if whole is None:
                return
            payload = whole
        if payload[0] >= 0x80:  # ours (overlay/wire.py: every link packet type is >= 0x80)
            self.on_packet(payload, self.path(peer))
        else:
            self.on_stun(payload, peer, self)

    # -- sending ---------------------------------------------------------------------------------------------
    def path(self, peer: Endpoint) -> TurnPath:
        path = self._paths.get(peer)
        if path is None:
            path = self._paths[peer] = TurnPath(self, peer)
        return path

    def send_to_peer(self, data: bytes, peer: Endpoint) -> None:
        channel = self._peer_channel.get(peer)
        if channel is not None:
            self._send_channel(channel, data, peer)
            return
        queue = self._queued.setdefault(peer, [])
        if len(queue) < 8:  # our choice: a few checks or handshakes wait for the binding, not a data burst
            queue.append(data)
        if peer not in self._binding and self._loop is not None and self._proto is not None:
            self._binding[peer] = self._loop.create_task(self._bind(peer))

    async def _bind(self, peer: Endpoint) -> None:
        assert self._proto is not None and self._loop is not None
        channel = self._channel_for(peer)
        try:
            await self._proto.channel_bind(channel, peer)
        except (ConnectionError, OSError, stun.TransactionError) as e:
            self.count("channel bind failed")
            # A peer's private host address is refused (403) by a server that relays to public peers only.
            log.debug("TURN channel bind to %s:%d via %s failed: %s", peer[0], peer[1], self.server.describe(), e)
            self._queued.pop(peer, None)
            return
        finally:
            self._binding.pop(peer, None)
        self.count("channels bound")
        self._peer_channel[peer] = channel
        self._channel_peer[channel] = peer
        self._bound_at[channel] = self._loop.time()
        for data in self._queued.pop(peer, []):
            self._send_channel(channel, data, peer)

    def through_turn(self, peer: Endpoint) -> None:
        """`peer` is a relayed address (of this server or another): its server puts a header in front."""
        self._relayed.add(peer)

    def chunk_for(self, peer: Endpoint) -> int:
        """The chunk size to `peer`: what the server's datagram to it carries on a 1,500-byte path (its path is
        not ours to ask), less TURN_HEADROOM if a server relays it on, and over UDP what fits a ChannelData on
        our path to the server."""
        size = chunk_size(6 if ":" in peer[0] else 4) - (TURN_HEADROOM if peer in self._relayed else 0)
        if self._server_payload is not None:
            size = min(size, self._server_payload - _CHANNEL_HEADER.size)
        return size

    def _send_udp_frames(self, frames: list[bytes]) -> None:
        sock = self._sock
        if sock is None:
            return
        # Every frame but the last is one size, so the kernel cuts them where they were joined.
        if self._gso and len(frames) > 1:
            try:
                sock.sendmsg([b"".join(frames)], segments(len(frames[0])), 0, self._address)
                return
            except OSError:  # a route UDP GSO cannot take (its MTU shrank, IPsec): each on its own
                self.count("gso: sent one by one")
        for frame in frames:
            self._send_udp(frame)

    def _send_udp(self, data: bytes) -> None:
        if self._sock is not None:
            try:
                self._sock.sendto(data, self._address)
            except OSError:
                self.count("send failed")

    def _send_channel(self, channel: int, data: bytes, peer: Endpoint) -> None:
        size = self.chunk_for(peer)
        if len(data) <= size or chunk_count(len(data), size) > MAX_CHUNKS:
            self._send_raw(_CHANNEL_HEADER.pack(channel, len(data)) + data)
            return
        self._message_id += 1
        pack = _CHANNEL_HEADER.pack
        self._send_frames(
            [pack(channel, len(head) + len(part)) + head + part for head, part in cut(data, self._message_id, size)]
        )
        self.count("datagrams sent as chunks")

    def _channel_for(self, peer: Endpoint) -> int:
        for channel, known in self._channel_peer.items():
            if known == peer:
                return channel  # re-binding the same number to the same peer is always allowed (section 12)
        if self._next_channel > CHANNEL_LAST:
            # Reuse the oldest binding's number once it has expired: links to it are long gone.
            channel = min(self._bound_at, key=self._bound_at.__getitem__)
            old = self._channel_peer.pop(channel)
            self._peer_channel.pop(old, None)
            self._paths.pop(old, None)
            return channel
        channel = self._next_channel
        self._next_channel += 1
        return channel

    def forget_peer(self, peer: Endpoint) -> None:
        """No link uses `peer` any more: stop refreshing its channel (the server drops it after 600 s)."""
        channel = self._peer_channel.pop(peer, None)
        if channel is not None:
            self._bound_at.pop(channel, None)
        self._paths.pop(peer, None)
        self._relayed.discard(peer)

    def tick(self, now: float) -> None:
        """Re-bind the channels still in use before their permissions lapse (`now`: the loop's clock)."""
        if self._loop is None or self._proto is None:
            return
        for peer, channel in list(self._peer_channel.items()):
            if now - self._bound_at.get(channel, now) >= CHANNEL_REFRESH and peer not in self._binding:
                self._bound_at[channel] = now
                self._binding[peer] = self._loop.create_task(self._bind(peer))
