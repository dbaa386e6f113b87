"""Underlays: how link packets reach another node's endpoint. Real UDP here; the in-memory twin is
overlay/transport/memory.py.

Contract (both implementations):
- `start(on_datagram)`: from now on every datagram that arrives is handed to on_datagram(data, endpoint),
  from the event loop, in arrival order.
- `send(data, endpoint)`: never blocks and never raises for network trouble; a datagram that cannot be sent
  (full buffer, unreachable, blocked) is counted in `counters["send_failed"]` and dropped, as UDP would.
- `close()`: idempotent; stops delivery.
- `on_unreachable(endpoint)`: an ICMP error said `endpoint` takes no datagrams (port or host unreachable) after
  we sent it one. A hint, never proof (anyone on the path can forge one): the links there are checked at once
  (overlay/routing/maintenance.py `unreachable`). The in-memory network sends them only if asked to
  (`MemoryNetwork.unreachable`): by default it behaves as a host that vanished, which answers nothing.
- `on_stun`: datagrams whose first byte is below 0x80 (STUN, RFC 8489 section 5, and TURN ChannelData; RFC
  7983's demultiplexing) go here instead, for ICE (overlay/transport/ice.py); every packet of ours starts
  with a byte >= 0x80 (overlay/wire.py). Without ICE they are counted and dropped.

The UDP side reads with `loop.add_reader` and drains up to DRAIN_BATCH datagrams per wakeup (ARCHITECTURE.md:
1 frame per wakeup gave 0.7-0.9 Gbit/s, 64 per wakeup 1.2-1.6; asyncio DatagramProtocol 0.3-0.4). The socket
is unconnected: uvloop's add_reader on a connected UDP socket stops after one ICMP error. It has IP_RECVERR, so
ICMP errors are queued for it (an unconnected socket otherwise drops them), read from its error queue when the
socket has nothing else to read (`_drain_errors`; the Engine reads it in overlay/_udp_read.h). The kernel also
reports a queued error on the socket's next call, a send to another peer included, and that send sends nothing:
a send that fails so is made once more (`_ICMP_REPORTED`). The host of a killed process answers our next
datagram with "port unreachable", so a link to it is dead UNREACHABLE_DEAD after that instead of after a
keepalive's 13-19 s: in `bench/scale.py`'s kill of 10 of 100 nodes every sampled pair answered again after
13.7 and 16.7 s (two runs), against 21-39 s in seven runs before (docs/scale.md).

A datagram bigger than its path carries unfragmented leaves as chunks in one UDP GSO send and is joined again on
arrival, coalesced by UDP GRO where the kernel can (overlay/transport/chunks.py). Chunks are sized for each
endpoint's path from the MTU of the kernel's route to it (`chunk_for`), asked again when the route refuses a
send (its MTU shrank: path MTU discovery, RFC 1191 and 8201, or a new route). A kernel without UDP GSO gets the
datagram whole, for IP to fragment, and so does a datagram that would need more than MAX_CHUNKS chunks.

Between `hold()` and `flush()` (one TAP batch, one drain of the socket) small datagrams wait, and each run of
equal-sized ones to one endpoint leaves as one GSO send: one syscall instead of dozens, and the receiver's
kernel hands them over in one read. Each endpoint's datagrams keep their order.
"""

from __future__ import annotations

import asyncio
import errno
import random
import socket
import struct
import time
from collections.abc import Callable

from overlay._fast import EXPRESS_LANES, steer_lanes
from overlay.transport.chunks import ETHERNET_MTU, MAX_CHUNKS, Reassembly, chunk_count, chunk_size, pieces, split
from overlay.wire import Endpoint, PacketType

DatagramHandler = Callable[[bytes, Endpoint], None]
DRAIN_BATCH = 256  # our choice: bounds the time one busy socket holds the loop (~256 x 5 us)
MAX_DATAGRAM = 65535
SOCKET_BUFFER = 4 << 20  # our choice: absorbs bursts of TSO-sized writes at multi-Gbit/s
# From linux/socket.h (not in Python's socket module): send IPv4 UDP with a zero checksum (RFC 768 allows it).
# Every packet we send is AEAD-authenticated, so the checksum protects nothing more, and a 60 KB datagram
# that is IP-fragmented cannot have it offloaded: the sender sums it in software, the receiver again. Only
# without UDP GSO, which refuses a socket that sends no checksums (and offloads them itself).
SO_NO_CHECK = 11
# From linux/udp.h: UDP GSO (per send, a cmsg with the segment size) and GRO (a cmsg with it on receive).
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
_GRO_SPACE = socket.CMSG_SPACE(4)
# From linux/in.h and linux/in6.h: a connected socket's path MTU (the route's, or the smaller one path MTU
# discovery learned). Python's socket module has IPV6_MTU but not IP_MTU.
IP_MTU = 14
IPV6_MTU = 24
# A TURN server relays what reaches a relayed address to its client inside a ChannelData (4 bytes, RFC 8656
# section 12) or, without a channel, a Data indication (20 + an XOR-PEER-ADDRESS of 8 or 20 + 4 and a DATA
# header of 4, padded to 4: at most 52). Chunks to such an address are that much smaller, so that the server's
# datagram to its client fits the same path: a full-size chunk was relayed as two IP fragments, or not at all
# by a server that sets DF.
TURN_HEADROOM = 52
PATHS_KEPT = 1024  # our choice: endpoints whose chunk size is remembered (links, ICE candidates), then forgotten
# UDP GSO takes at most 64 segments (UDP_MAX_SEGMENTS; newer kernels allow more) and one IP datagram's worth of bytes.
MAX_RUN = 64
MAX_RUN_BYTES = 65000
_U16 = struct.Struct("=H")  # the cmsg's segment size (native order, as the kernel reads it)
# From linux/in.h, linux/in6.h and linux/errqueue.h: queue ICMP errors on the socket, and their record.
IP_RECVERR = 11
IPV6_RECVERR = 25
_EXTENDED_ERR = struct.Struct("=IBBBBII")  # ee_errno, ee_origin, ee_type, ee_code, ee_pad, ee_info, ee_data
_ORIGIN_ICMP, _ORIGIN_ICMP6 = 2, 3
_ERR_SPACE = 512
_ICMP_REPORTED = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN})
_INT = struct.Struct("=i")
_CHUNK = int(PacketType.CHUNK)


def segments(size: int) -> list[tuple[int, int, bytes]]:
    """The ancillary data of a UDP GSO send: the kernel cuts the buffer into datagrams of `size` bytes."""
    return [(SOL_UDP, UDP_SEGMENT, _U16.pack(size))]


def route_mtu(endpoint: Endpoint, version: int, local_host: str = "") -> int:
    """The MTU of the kernel's route to `endpoint` over IPv`version` (from `local_host`, as a socket bound there
    sends). Connecting a UDP socket sends nothing: the kernel only looks up the route and keeps its MTU. A
    1,500-byte path if the kernel has no route to say."""
    try:
        with socket.socket(socket.AF_INET6 if version == 6 else socket.AF_INET, socket.SOCK_DGRAM) as probe:
            if local_host not in ("", "0.0.0.0", "::"):
                probe.bind((local_host, 0))
            probe.connect(endpoint)
            if version == 6:
                return int(probe.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU))
            return int(probe.getsockopt(socket.IPPROTO_IP, IP_MTU))
    except OSError:
        return ETHERNET_MTU


class UnderlayError(Exception):
    """The underlay cannot be set up (address in use, not an address of this host)."""


class UdpUnderlay:
    """The node's UDP socket. `gso`/`gro`: use UDP GSO to send and GRO to receive where the kernel has them
    (False: as a kernel without them would; the tests cover each case).

    `lanes` above 1: as many sockets on the one port (SO_REUSEPORT), one for each of the compiled data path's
    Engines (overlay/fastpath.py); the kernel gives each datagram to its lane's socket (overlay/_lanes.h
    steer_lanes). Everything this class sends and reads goes through the first.

    `express`: one more socket per lane (at most EXPRESS_LANES lanes; with more, none), for the datagrams of the
    lane's express lane, which its Engine reads first (docs/datapath.md, Express lanes)."""

    def __init__(
        self, listen: Endpoint, *, gso: bool = True, gro: bool = True, lanes: int = 1, express: bool = False
    ) -> None:
        family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
        express = express and lanes <= EXPRESS_LANES
        group = lanes * (2 if express else 1)
        self._sock = _bound(family, listen, group > 1)
        host, port = self._sock.getsockname()[:2]
        self.local_endpoint: Endpoint = (host, port)
        self.lane_socks: list[socket.socket] = []
        self.express_socks: list[socket.socket] = []  # lane k's at k
        try:
            # Bound in the order the steering program counts them: the lanes', then the express sockets.
            while len(self.lane_socks) < lanes - 1:
                self.lane_socks.append(_bound(family, (host, port), True))
            while express and len(self.express_socks) < lanes:
                self.express_socks.append(_bound(family, (host, port), True))
            if group > 1:
                steer_lanes(self._sock.fileno(), lanes, express)
        except (OSError, UnderlayError) as e:
            for sock in self._socks():
                sock.close()
            raise UnderlayError(
                f"cannot open {group} sockets on udp {host}:{port} for [vnic] lanes: {e}; "
                "try [vnic] lanes = 1, or fast_path = false for one socket"
            ) from None
        self.counters: dict[str, int] = {"send_failed": 0, "recv_errors": 0, "stun_dropped": 0}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handler: DatagramHandler | None = None
        self.on_stun: DatagramHandler = self._no_stun
        self._version = 6 if family == socket.AF_INET6 else 4
        self._chunks: dict[Endpoint, int] = {}  # chunk_for's answers
        self._relayed: dict[Endpoint, None] = {}  # peers' TURN relayed addresses (a bounded, ordered set)
        self._message_id = random.getrandbits(32)
        self._reassembly = Reassembly(self.counters)
        self.gso = gso and try_option(self._sock, SOL_UDP, UDP_SEGMENT, 0)
        self._held: dict[Endpoint, list[bytes]] | None = None  # by endpoint, between hold() and flush()
        for sock in self._socks():
            _set_options(sock, self.gso, gro)
        self.on_unreachable: Callable[[Endpoint], None] = ignore_endpoint

    def _no_stun(self, data: bytes, endpoint: Endpoint) -> None:
        self.counters["stun_dropped"] += 1

    def start(self, on_datagram: DatagramHandler) -> None:
        self._handler = on_datagram
        self._loop = asyncio.get_running_loop()
        # The lanes' sockets too, until the Engines take them over: a datagram steered to a socket nobody reads
        # would be lost.
        for sock in self._socks():
            self._loop.add_reader(sock.fileno(), self._drain, sock)

    def fileno(self) -> int:
        return self._sock.fileno()

    def _socks(self) -> tuple[socket.socket, ...]:
        return (self._sock, *self.lane_socks, *self.express_socks)

    @property
    def chunk(self) -> int:
        """A 1,500-byte path's chunk size (overlay/transport/chunks.py): the largest this socket sends."""
        return chunk_size(self._version)

    def chunk_for(self, endpoint: Endpoint) -> int:
        """The chunk size on the path to `endpoint`, from the MTU of the kernel's route to it: asked once per
        endpoint, and again after `forget_paths` (a send the route refused)."""
        chunk = self._chunks.get(endpoint)
        if chunk is None:
            if len(self._chunks) >= PATHS_KEPT:
                self._chunks.clear()
            chunk = chunk_size(self._version, self._route_mtu(endpoint))
            if endpoint in self._relayed:
                chunk -= TURN_HEADROOM
            self._chunks[endpoint] = chunk
        return chunk

    def through_turn(self, endpoint: Endpoint) -> None:
        """`endpoint` is a peer's TURN relayed address: its chunks leave room for what the server puts in front."""
        if endpoint not in self._relayed:
            if len(self._relayed) >= PATHS_KEPT:
                del self._relayed[next(iter(self._relayed))]
            self._relayed[endpoint] = None
            self._chunks.pop(endpoint, None)

    def forget_paths(self) -> None:
        """Ask the routes again (their MTU may have shrunk)."""
        self._chunks.clear()

    def _route_mtu(self, endpoint: Endpoint) -> int:
        return route_mtu(endpoint, self._version, self.local_endpoint[0])

    def hand_over_reads(self) -> None:
        """The compiled data path (overlay/fastpath.py) reads the socket from now on; what it does not handle
        itself comes back through `deliver`."""
        if self._loop is not None:
            for sock in self._socks():
                self._loop.remove_reader(sock.fileno())

    def deliver(self, data: bytes, source: Endpoint) -> None:
        """A datagram read by someone else, handled as one this socket read."""
        self._dispatch(data, source)

    def unreachable(self, endpoint: Endpoint) -> None:
        """An ICMP error said `endpoint` is unreachable (read here or by the Engine)."""
        self._count("ICMP: unreachable")
        self.on_unreachable(endpoint)

    def _drain_errors(self, sock: socket.socket) -> None:
        """The socket's error queue (IP_RECVERR): epoll says "readable" while it holds anything."""
        recv = sock.recvmsg
        for _ in range(DRAIN_BATCH):
            try:
                _, ancillary, _, addr = recv(1, _ERR_SPACE, socket.MSG_ERRQUEUE)
            except OSError:  # empty (EAGAIN), or nothing queued on this kernel
                return
            if addr and icmp_unreachable(ancillary):
                self.unreachable((addr[0], addr[1]))

    def _drain(self, sock: socket.socket) -> None:
        """Up to DRAIN_BATCH reads; with GRO one read may hold many datagrams of one size (its cmsg says which).
        `recvmsg` whether or not GRO is on: without it the cmsg is empty, at ~0.3 µs more per read than
        `recvfrom` (measured on loopback), which keeps one receive path."""
        recv = sock.recvmsg
        self.hold()
        read = reported = False
        try:
            for _ in range(DRAIN_BATCH):
                try:
                    data, ancillary, _, addr = recv(MAX_DATAGRAM, _GRO_SPACE)
                except BlockingIOError:
                    # The error queue only when a read reported an error or there was nothing to read (the
                    # selector calls us, EPOLLERR, while an error is queued): as the Engine's drain_udp.
                    if reported or not read:
                        self._drain_errors(sock)
                    return
                except OSError as e:
                    if e.errno in _ICMP_REPORTED:  # its details are in the error queue
                        reported = True
                    else:
                        self.counters["recv_errors"] += 1
                    continue
                read = True
                source = (addr[0], addr[1])
                segment = _gro_segment(ancillary) if ancillary else 0
                if 0 < segment < len(data):
                    self._on_coalesced(data, segment, source)
                else:
                    self._dispatch(data, source)
        finally:
            self.flush()

    def _dispatch(self, data: bytes | memoryview, source: Endpoint) -> None:
        """One datagram: STUN to ICE, a chunk to the reassembly, anything else (an empty one too, which the link
        layer counts) to the handler."""
        first = data[0] if data else 0x80
        if first < 0x80:
            self.on_stun(bytes(data), source)
        elif first == _CHUNK:
            self._on_chunk(data, source)
        else:
            assert self._handler is not None
            self._handler(bytes(data), source)

    def _on_coalesced(self, data: bytes, segment: int, source: Endpoint) -> None:
        if data[0] == _CHUNK:
            whole = self._reassembly.add_coalesced(data, segment, source, time.monotonic())
            if whole is not None:
                assert self._handler is not None
                self._handler(whole, source)
                return
        for piece in pieces(data, segment):
            self._dispatch(piece, source)

    def _on_chunk(self, chunk: bytes | memoryview, source: Endpoint) -> None:
        whole = self._reassembly.take(chunk, source, time.monotonic())
        if whole is not None:
            assert self._handler is not None
            self._handler(whole, source)

    def send(self, data: bytes, endpoint: Endpoint) -> None:
        held = self._held
        if held is not None:
            if len(data) <= self.chunk_for(endpoint):
                queue = held.get(endpoint)
                if queue is None:
                    held[endpoint] = [data]
                else:
                    queue.append(data)
                return
            if endpoint in held:
                self._send_runs(endpoint, held.pop(endpoint))  # what came first leaves first
        self._send_now(data, endpoint)

    def hold(self) -> None:
        """Queue small datagrams until flush() (see the module docstring); without GSO there is nothing to gain."""
        if self.gso and self._held is None:
            self._held = {}

    def flush(self) -> None:
        held, self._held = self._held, None
        if held:
            for endpoint, queue in held.items():
                self._send_runs(endpoint, queue)

    def _send_runs(self, endpoint: Endpoint, queue: list[bytes]) -> None:
        """Each run of equal-sized datagrams (the last of a run may be shorter) as one GSO send."""
        i, n = 0, len(queue)
        while i < n:
            size = len(queue[i])
            j, total = i + 1, size
            while j < n and j - i < MAX_RUN and len(queue[j]) <= size and total + size <= MAX_RUN_BYTES:
                total += len(queue[j])
                j += 1
                if len(queue[j - 1]) < size:
                    break  # only a run's last datagram may be shorter
            if j - i == 1:
                self._send_now(queue[i], endpoint)
            elif self._send_gso(b"".join(queue[i:j]), size, endpoint, j - i):
                self._one_by_one(queue[i:j], endpoint)
            i = j

    def _send_now(self, data: bytes, endpoint: Endpoint) -> None:
        if self.gso:
            chunk = self.chunk_for(endpoint)
            if len(data) > chunk and self._send_chunks(data, endpoint, chunk):
                return
        self._sendto(data, endpoint)

    def _sendto(self, data: bytes, endpoint: Endpoint) -> None:
        for _ in range(2):
            try:
                self._sock.sendto(data, endpoint)
                return
            except OSError as e:
                if e.errno not in _ICMP_REPORTED:
                    break
        self.counters["send_failed"] += 1

    def _send_chunks(self, data: bytes, endpoint: Endpoint, chunk: int) -> bool:
        """`data` as chunks of `chunk` bytes (the path's) in one GSO send; False when it must go whole: it makes
        too many chunks, or the route refused them and, asked again, has no smaller MTU to offer."""
        while chunk_count(len(data), chunk) <= MAX_CHUNKS:
            self._message_id += 1
            if not self._send_gso(split(data, self._message_id, chunk), chunk, endpoint, 1):
                return True
            smaller = self.chunk_for(endpoint)
            if smaller >= chunk:
                break
            chunk = smaller
        self._count("gso: sent one by one")
        return False

    def _send_gso(self, buffer: bytes, segment: int, endpoint: Endpoint, datagrams: int) -> bool:
        """One GSO send of `buffer` (`datagrams` of ours) cut at `segment` bytes. True when the route cannot take
        it (its MTU is below a segment, or the device cannot segment): the caller sends otherwise, and the
        route's MTU is asked again next time."""
        cmsg = segments(segment)
        try:
            try:
                self._sock.sendmsg([buffer], cmsg, 0, endpoint)
            except OSError as e:
                if e.errno not in _ICMP_REPORTED:
                    raise
                self._sock.sendmsg([buffer], cmsg, 0, endpoint)
            return False
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.EMSGSIZE):  # a segment above the route's MTU
                self._chunks.pop(endpoint, None)
                return True
            if e.errno == errno.EIO:  # a route UDP GSO cannot take (IPsec transforms it)
                return True
            self.counters["send_failed"] += datagrams
            return False

    def _one_by_one(self, datagrams: list[bytes], endpoint: Endpoint) -> None:
        """A run the route refused as one GSO send, for IP to fragment where it must."""
        self._count("gso: sent one by one")
        for data in datagrams:
            self._sendto(data, endpoint)

    def _count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    def close(self) -> None:
        self._held = None
        for sock in self._socks():
            if self._loop is not None and sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
            sock.close()


def _bound(family: int, listen: Endpoint, reuse_port: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        sock.bind(listen)
    except OSError as e:
        sock.close()
        where = f"udp {listen[0]}:{listen[1]}"
        raise UnderlayError(f"cannot listen on {where}: {e.strerror}; check [node] listen") from None
    sock.setblocking(False)
    return sock


def _set_options(sock: socket.socket, gso: bool, gro: bool) -> None:
    if gro:
        try_option(sock, SOL_UDP, UDP_GRO, 1)  # without it (or without kernel support) reads are single
    if not gso and sock.family == socket.AF_INET:
        sock.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
    if sock.family == socket.AF_INET:
        try_option(sock, socket.IPPROTO_IP, IP_RECVERR, 1)
    else:
        try_option(sock, socket.IPPROTO_IPV6, IPV6_RECVERR, 1)


def try_option(sock: socket.socket, level: int, option: int, value: int) -> bool:
    """Whether this kernel takes the socket option (UDP GSO needs Linux 4.18, GRO 5.0)."""
    try:
        sock.setsockopt(level, option, value)
    except OSError:
        return False
    return True


def ignore_endpoint(endpoint: Endpoint) -> None:
    pass


def icmp_unreachable(ancillary: list[tuple[int, int, bytes]]) -> bool:
    """Whether an error-queue message is an ICMP "unreachable" (port, host or network): its IP_RECVERR record
    (struct sock_extended_err) came from ICMP and carries one of those errors. Anything else is False."""
    for level, kind, value in ancillary:
        ours = (level, kind) in ((socket.IPPROTO_IP, IP_RECVERR), (socket.IPPROTO_IPV6, IPV6_RECVERR))
        if ours and len(value) >= _EXTENDED_ERR.size:
            err, origin = _EXTENDED_ERR.unpack_from(value)[:2]
            if origin in (_ORIGIN_ICMP, _ORIGIN_ICMP6) and err in _ICMP_REPORTED:
                return True
    return False


def _gro_segment(ancillary: list[tuple[int, int, bytes]]) -> int:
    for level, kind, value in ancillary:
        if level == SOL_UDP and kind == UDP_GRO and len(value) >= 4:
            return int(_INT.unpack_from(value)[0])
    return 0
