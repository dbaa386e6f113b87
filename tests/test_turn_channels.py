"""What arrives on a TURN channel (overlay/transport/turn.py): link packets, chunks joined, STUN to ICE."""

from __future__ import annotations

import random
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.transport.chunks import pieces, split
from overlay.transport.paths import TurnServer
from overlay.transport.turn import TurnAllocation
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
