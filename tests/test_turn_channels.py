"""What arrives on a TURN channel (overlay/transport/turn.py): link packets, chunks joined, STUN to ICE."""

from __future__ import annotations

import random
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.transport.chunks import MAX_CHUNKS, chunk_count, pieces, split
from overlay.transport.paths import TurnServer
from overlay.transport.turn import TurnAllocation
from overlay.transport.underlay import SOL_UDP, TURN_HEADROOM, UDP_SEGMENT, try_option
from overlay.wire import Endpoint

PEER: Endpoint = ("127.0.0.1", 5800)
CHANNEL = 0x4000


def allocation() -> tuple[TurnAllocation, list[bytes], list[bytes]]:
    packets: list[bytes] = []
    stun: list[bytes] = []
    server = TurnServer("127.0.0.1", 3478, "udp", "user", "pass")
    alloc = TurnAllocation(server, lambda data, peer, _alloc: stun.append(data), lambda d, p: packets.append(d))
    alloc._channel_peer[CHANNEL] = PEER  # a bound channel, as _bind leaves it
    alloc._peer_channel[PEER] = CHANNEL
    return alloc, packets, stun


def channel_data(payload: bytes | memoryview) -> bytes:
    return struct.pack("!HH", CHANNEL, len(payload)) + bytes(payload)


def test_a_datagram_the_peer_cut_into_chunks_arrives_whole_in_any_order() -> None:
    """A peer sending to our relayed address from its own socket cuts a probe into chunks; the server relays
    each on the channel. Before they were joined here, each chunk was dropped as an unknown packet type."""
    alloc, packets, _ = allocation()
    probe = bytes([0x81]) + random.Random(0).randbytes(60_256)  # a sealed PROBE's size (overlay/wire.py)
    chunks = list(pieces(split(probe, 7, 1472), 1472))
    random.Random(1).shuffle(chunks)
    for chunk in chunks:
        alloc.on_channel_data(channel_data(chunk))
    assert packets == [probe]
    small = bytes([0x80]) + b"x" * 100
    alloc.on_channel_data(channel_data(small))
    assert packets == [probe, small]


def test_a_malformed_chunk_is_counted_and_the_next_datagram_still_arrives() -> None:
    alloc, packets, _ = allocation()
    bad = bytes([0x85]) + b"\x00" * 3  # shorter than a chunk header
    alloc.on_channel_data(channel_data(bad))
    assert alloc.counters["chunks: malformed"] == 1 and packets == []
    whole = bytes([0x81]) + b"y" * 3000
    for chunk in pieces(split(whole, 8, 1000), 1000):
        alloc.on_channel_data(channel_data(chunk))
    assert packets == [whole]


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=2000))
def test_any_channel_payload_is_delivered_dropped_or_counted_never_raises(payload: bytes) -> None:
    alloc, packets, stun = allocation()
    alloc.on_channel_data(channel_data(payload))
    if payload[0] == 0x85:  # one chunk never completes a message (a message has 2 to 64): held or counted
        assert packets == [] and stun == []
        assert alloc.counters.get("chunks: malformed", 0) + alloc._reassembly.pending == 1
    elif payload[0] >= 0x80:
        assert packets == [payload] and stun == []
    else:
        assert stun == [payload] and packets == []


def sender(server_payload: int | None, gso: bool) -> tuple[TurnAllocation, socket.socket]:
    """An allocation whose server is a loopback socket we read: over UDP, as allocate() leaves it."""
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(2.0)
    alloc, _, _ = allocation()
    alloc._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    alloc._address = server.getsockname()
    alloc._server_payload = server_payload
    alloc._gso = gso and try_option(alloc._sock, SOL_UDP, UDP_SEGMENT, 0)
    alloc._send_frames = alloc._send_udp_frames
    alloc._send_raw = alloc._send_udp
    return alloc, server


def received(server: socket.socket, count: int) -> list[bytes]:
    return [server.recv(65535) for _ in range(count)]


@pytest.mark.parametrize("gso", [True, False])
@pytest.mark.parametrize("server_payload", [1472, 1000])
def test_a_big_datagram_leaves_as_chunks_each_in_a_channeldata_the_peer_joins(gso: bool, server_payload: int) -> None:
    """A TCP super-frame (or the fragment probe) to a peer through our allocation: each chunk in a ChannelData of
    its own that fits our path to the server, and what the server relays (the chunks) fits a 1,500-byte path to
    the peer. Sent whole, coturn relayed none of the 60 KB datagrams."""
    alloc, server = sender(server_payload, gso)
    probe = bytes([0x81]) + random.Random(2).randbytes(60_256)
    alloc.send_to_peer(probe, PEER)
    size = alloc.chunk_for(PEER)
    assert size == min(1472, server_payload - 4)
    frames = received(server, chunk_count(len(probe), size))
    assert all(len(f) <= server_payload for f in frames)
    receiver, packets, _ = allocation()
    for frame in random.Random(3).sample(frames, len(frames)):
        channel, length = struct.unpack_from("!HH", frame)
        assert channel == CHANNEL and length == len(frame) - 4 and length <= size
        receiver.on_channel_data(frame)  # as the peer's own allocation gets them (relay to relay)
    assert packets == [probe]
    assert alloc.counters["datagrams sent as chunks"] == 1
    # What fits one chunk goes as it is.
    small = bytes([0x80]) + b"z" * (size - 1)
    alloc.send_to_peer(small, PEER)
    assert received(server, 1) == [channel_data(small)]
    alloc._sock.close()  # type: ignore[union-attr]
    server.close()


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1, max_value=62_000), st.integers(min_value=600, max_value=1472))
def test_any_datagram_size_crosses_a_channel_whole_or_as_chunks(length: int, server_payload: int) -> None:
    """Up to a little above the biggest link datagram (a super-frame's, ~60.3 KB): more than MAX_CHUNKS chunks go
    whole, as the underlay sends them (IP fragments), and a whole one must fit a UDP datagram with its header."""
    alloc, server = sender(server_payload, gso=True)
    data = bytes([0x80]) + bytes(length - 1)
    size = alloc.chunk_for(PEER)
    count = chunk_count(length, size)
    alloc.send_to_peer(data, PEER)
    frames = received(server, 1 if length <= size or count > MAX_CHUNKS else count)
    receiver, packets, _ = allocation()
    for frame in frames:
        receiver.on_channel_data(frame)
    assert packets == [data]
    alloc._sock.close()  # type: ignore[union-attr]
    server.close()


def test_chunks_to_a_peer_that_is_itself_a_relayed_address_leave_room_for_its_servers_header() -> None:
    """Relay to relay: the peer's server relays each chunk on to its client in a ChannelData or Data indication."""
    alloc, server = sender(1472, gso=True)
    assert alloc.chunk_for(PEER) == 1468
    alloc.through_turn(PEER)
    assert alloc.chunk_for(PEER) == 1472 - TURN_HEADROOM
    data = bytes([0x81]) + bytes(30_000)
    alloc.send_to_peer(data, PEER)
    frames = received(server, chunk_count(len(data), 1472 - TURN_HEADROOM))
    assert max(len(f) for f in frames) == 4 + 1472 - TURN_HEADROOM
    receiver, packets, _ = allocation()
    for frame in frames:
        receiver.on_channel_data(frame)
    assert packets == [data]
    alloc.forget_peer(PEER)
    assert alloc.chunk_for(PEER) == 1468
    alloc._sock.close()  # type: ignore[union-attr]
    server.close()
