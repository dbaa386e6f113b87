"""Datagrams bigger than one path MTU, cut into chunks the kernel sends as one UDP GSO buffer.

A TCP super-frame crosses a link as one ~60 KB datagram (docs/datapath.md). Sent whole, the sending kernel
cuts it into ~42 IP fragments and the receiving kernel reassembles them: most of the sending node's time went
there (bench/iperf_tap.py under py-spy: 55-74 % of the sender's and the relay's samples in `sendto`). Instead
the underlay cuts it into chunks that each fit its path's MTU, puts them back to back in one buffer and
hands it to the kernel with `UDP_SEGMENT` (UDP GSO, Linux 4.18): one syscall, no IP fragments, segmentation
by the NIC or by the kernel at the last moment. A receiver with `UDP_GRO` (Linux 5.0) gets the chunks of a
message coalesced in one read, and joins them; chunks read one by one are reassembled here. Measured in two
namespaces on one veth (60 KB messages, one Python sender and receiver): 10.2k messages/s whole, 19.8-32.5k
sent and 13.0-21.5k received chunked.

A chunk: type CHUNK (0x85, >= 0x80 like every packet of ours, never STUN), message ID (4 bytes, per sender),
index and count (1 byte each), then its part of the datagram. Chunks are not authenticated: the datagram they
rebuild is (it is a link packet with its AEAD tag), so a forged or corrupted chunk costs the message, as a
forged IP fragment would. What a peer can make us hold is bounded: MAX_PENDING partial messages, each at most
MAX_CHUNKS chunks of at most MAX_CHUNK bytes, for PENDING_TTL seconds.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from overlay.wire import DecodeError, Endpoint, PacketType

CHUNK_HEADER = struct.Struct("!BIBB")  # type, message ID, index, count
# IP and UDP headers in front of a chunk: 20 + 8 over IPv4, 40 + 8 over IPv6.
HEADERS = {4: 28, 6: 48}
# A chunk is the largest UDP payload its path carries unfragmented, from the path's MTU (the underlay asks the
# kernel's route), and never more than a 1,500-byte path's: 1,472 bytes over IPv4, 1,452 over IPv6, the most a
# receiver takes. On a 1,500-byte path ordinary packets (a 1,400-byte TAP MTU plus our 57 bytes) stay below, so
# only super-frames, tunnelled full-size packets and fragment probes are cut; on a smaller one (a VXLAN or cloud
# network of 1,450 or 1,460 bytes) full-size packets are cut too, where IP would have fragmented them.
ETHERNET_MTU = 1500
# What every path carries: 576 bytes over IPv4 (RFC 791), 1,280 over IPv6 (RFC 8200 section 5).
MIN_MTU = {4: 576, 6: 1280}
# UDP GSO takes at most 64 segments per buffer (UDP_MAX_SEGMENTS; newer kernels allow more); a 65,535-byte datagram in
# 1,445-byte parts (IPv6) is 46.
MAX_CHUNKS = 64
MAX_DATAGRAM = 65535
MAX_CHUNK = ETHERNET_MTU - HEADERS[4]  # an IPv4 1,500-byte path's: a longer chunk is not one of ours
MAX_PENDING = 64  # our choice: messages being reassembled at once, from all peers (at most ~6 MB held)
PENDING_TTL = 1.0  # our choice: a chunk later than this after its first sibling belongs to a lost message


def chunk_size(family_version: int, mtu: int = ETHERNET_MTU) -> int:
    """The size of every chunk but the last, header included, on an IPv4 (4) or IPv6 (6) path of `mtu` bytes."""
    mtu = min(max(mtu, MIN_MTU[family_version]), ETHERNET_MTU)
    return mtu - HEADERS[family_version]


def chunk_count(size: int, chunk: int) -> int:
    """How many chunks of `chunk` bytes a datagram of `size` bytes makes (more than MAX_CHUNKS: it goes whole)."""
    return -(-size // (chunk - CHUNK_HEADER.size))


def cut(datagram: bytes, message_id: int, size: int) -> Iterator[tuple[bytes, memoryview]]:
    """`datagram` as chunks of `size` bytes (the last shorter): each chunk's header and its part."""
    part = size - CHUNK_HEADER.size
    count = chunk_count(len(datagram), size)
    if not 1 < count <= MAX_CHUNKS:
        raise ValueError(f"a datagram of {len(datagram)} bytes makes {count} chunks of {size}")
    message_id &= 0xFFFFFFFF
    view = memoryview(datagram)
    for i in range(count):
        yield CHUNK_HEADER.pack(PacketType.CHUNK, message_id, i, count), view[i * part : (i + 1) * part]


def split(datagram: bytes, message_id: int, size: int) -> bytes:
    """`datagram` as chunks of `size` bytes (the last shorter), back to back: a UDP GSO buffer."""
    return b"".join(piece for chunk in cut(datagram, message_id, size) for piece in chunk)


def pieces(buffer: bytes, segment: int) -> Iterator[memoryview]:
    """The datagrams of a buffer the kernel coalesced (UDP_GRO): `segment` bytes each, the last shorter."""
    view = memoryview(buffer)
    if segment <= 0:
        raise DecodeError(f"coalesced segment size {segment}")
    for offset in range(0, len(buffer), segment):
        yield view[offset : offset + segment]


class Reassembly:
    """Chunks in, whole datagrams out; bounded state, stale and broken messages dropped and counted."""

    def __init__(self, counters: dict[str, int]) -> None:
        self.counters = counters
        # (source, message ID) -> when it began, count, parts so far by index (dicts keep insertion order:
        # the first entry is the oldest).
        self._pending: dict[tuple[Endpoint, int], tuple[float, int, dict[int, bytes]]] = {}

    def _count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    def add_coalesced(self, buffer: bytes, segment: int, source: Endpoint, now: float) -> bytes | None:
        """A coalesced buffer that holds exactly the chunks of one message, in order (what GRO makes of one GSO
        send), joined without state; None when it is anything else (then feed its pieces to `add`)."""
        size = len(buffer)
        if not CHUNK_HEADER.size < segment <= MAX_CHUNK or size <= segment:
            return None
        ptype, message_id, index, count = CHUNK_HEADER.unpack_from(buffer)
        if ptype != PacketType.CHUNK or index != 0 or count != -(-size // segment) or count > MAX_CHUNKS:
            return None
        last = (count - 1) * segment
        if CHUNK_HEADER.unpack_from(buffer, last) != (PacketType.CHUNK, message_id, count - 1, count):
            return None
        hlen = CHUNK_HEADER.size
        view = memoryview(buffer)
        return b"".join([view[o + hlen : o + segment] for o in range(0, size, segment)])

    def take(self, chunk: bytes | memoryview, source: Endpoint, now: float) -> bytes | None:
        """`add` for a chunk off the wire: a malformed one is counted ("chunks: malformed") and gives None."""
        try:
            return self.add(chunk, source, now)
        except DecodeError:
            self._count("chunks: malformed")
            return None

    def add(self, chunk: bytes | memoryview, source: Endpoint, now: float) -> bytes | None:
        """One chunk; the whole datagram when this chunk completes it. DecodeError for a malformed chunk."""
        if not CHUNK_HEADER.size < len(chunk) <= MAX_CHUNK:
            raise DecodeError(f"chunk of {len(chunk)} bytes")
        ptype, message_id, index, count = CHUNK_HEADER.unpack_from(chunk)
        if ptype != PacketType.CHUNK:
            raise DecodeError(f"not a chunk (type 0x{ptype:02x})")
        if not 1 < count <= MAX_CHUNKS or index >= count:
            raise DecodeError(f"chunk {index} of {count}")
        key = (source, message_id)
        entry = self._pending.get(key)
        if entry is not None and (entry[1] != count or now - entry[0] > PENDING_TTL):
            del self._pending[key]  # a message ID reused after a loss, or chunks that disagree
            self._count("chunks: message dropped (incomplete or inconsistent)")
            entry = None
        if entry is None:
            self._expire(now)
            entry = self._pending[key] = (now, count, {})
        parts = entry[2]
        parts[index] = bytes(chunk[CHUNK_HEADER.size :])
        if len(parts) < count:
            return None
        del self._pending[key]
        whole = b"".join(parts[i] for i in range(count))
        if len(whole) > MAX_DATAGRAM:
            self._count("chunks: message dropped (too big)")
            return None
        return whole

    def _expire(self, now: float) -> None:
        """Before a new message is taken: drop the stale ones, and the oldest if the table is full."""
        pending = self._pending
        while pending:
            key, (began, _, _) = next(iter(pending.items()))
            if now - began <= PENDING_TTL and len(pending) < MAX_PENDING:
                return
            del pending[key]
            self._count("chunks: message dropped (incomplete or inconsistent)")

    @property
    def pending(self) -> int:
        return len(self._pending)
