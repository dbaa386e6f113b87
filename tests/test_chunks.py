"""Big datagrams cut into chunks for one UDP GSO send and joined again (overlay/transport/chunks.py), and the UDP
underlay that uses them: on loopback, with the kernel's coalescing (GRO), without it, and without GSO at all."""

from __future__ import annotations

import asyncio
import errno
import os
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.transport.chunks import (
    CHUNK_HEADER,
    MAX_CHUNKS,
    MAX_PENDING,
    PENDING_TTL,
    Reassembly,
    chunk_count,
    chunk_size,
    pieces,
    split,
)
from overlay.transport.underlay import TURN_HEADROOM, UdpUnderlay
from overlay.wire import DecodeError, PacketType

SIZE = chunk_size(4)
SOURCE = ("198.18.0.1", 5800)


def chunks_of(datagram: bytes, message_id: int = 7, size: int = SIZE) -> list[bytes]:
    return [bytes(p) for p in pieces(split(datagram, message_id, size), size)]


@settings(max_examples=60, deadline=None)
@given(length=st.integers(SIZE - CHUNK_HEADER.size + 1, 65000), seed=st.integers(0, 2**32 - 1))
def test_chunks_in_any_order_with_repeats_give_back_the_datagram_once(length: int, seed: int) -> None:
    datagram = random.Random(seed).randbytes(length)
    parts = chunks_of(datagram)
    assert all(len(p) == SIZE for p in parts[:-1]) and len(parts[-1]) <= SIZE
    shuffled = parts + parts[: len(parts) // 2]  # some arrive twice
    random.Random(seed).shuffle(shuffled)
    r = Reassembly({})
    out = [w for w in (r.add(p, SOURCE, 0.0) for p in shuffled) if w is not None]
    # The first complete set gives the datagram; the repeats after it start a message that never completes.
    assert out[0] == datagram
    assert all(w == datagram for w in out)


def test_a_coalesced_read_of_one_message_is_joined_without_state() -> None:
    datagram = os.urandom(60000)
    buffer = split(datagram, 1, SIZE)
    r = Reassembly({})
    assert r.add_coalesced(buffer, SIZE, SOURCE, 0.0) == datagram
    assert r.pending == 0
    # Two messages in one read, or one cut short, are not joined here: their pieces go through add().
    two = split(os.urandom(2 * (SIZE - CHUNK_HEADER.size)), 2, SIZE) + split(os.urandom(3000), 3, SIZE)
    assert r.add_coalesced(two, SIZE, SOURCE, 0.0) is None
    assert r.add_coalesced(buffer[:-SIZE], SIZE, SOURCE, 0.0) is None


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=1600), segment=st.integers(-5, 1600))
def test_hostile_chunks_give_a_decode_error_or_nothing_and_state_stays_bounded(data: bytes, segment: int) -> None:
    r = Reassembly({})
    try:
        r.add(data, SOURCE, 0.0)
    except DecodeError:
        pass
    joined = r.add_coalesced(data, segment, SOURCE, 0.0)
    assert joined is None or isinstance(joined, bytes)
    try:
        for piece in pieces(data, segment):
            try:
                r.add(piece, SOURCE, 0.0)
            except DecodeError:
                pass
    except DecodeError:
        assert segment <= 0
    assert r.pending <= MAX_PENDING


def test_chunks_that_disagree_stale_messages_and_a_full_table_are_dropped_and_counted() -> None:
    counters: dict[str, int] = {}
    r = Reassembly(counters)
    datagram = os.urandom(5000)
    first = chunks_of(datagram, 9)[0]
    assert r.add(first, SOURCE, 0.0) is None
    # The same message ID with another count: the partial message goes, the new one starts.
    odd = CHUNK_HEADER.pack(PacketType.CHUNK, 9, 0, 7) + b"x" * 10
    assert r.add(odd, SOURCE, 0.1) is None
    assert sum(counters.values()) == 1
    # A message whose last chunk comes after PENDING_TTL is dropped, not completed from stale parts.
    r2 = Reassembly(counters)
    parts = chunks_of(datagram, 10)
    for p in parts[:-1]:
        r2.add(p, SOURCE, 0.0)
    assert r2.add(parts[-1], SOURCE, PENDING_TTL + 0.5) is None
    # Many senders starting messages: never more than MAX_PENDING held.
    r3 = Reassembly(counters)
    for i in range(3 * MAX_PENDING):
        r3.add(chunks_of(datagram, i)[0], ("198.18.0.2", 1000 + i), 0.0)
    assert r3.pending == MAX_PENDING
    with pytest.raises(DecodeError):
        r3.add(CHUNK_HEADER.pack(PacketType.CHUNK, 1, 3, 3) + b"x", SOURCE, 0.0)  # index beyond count
    with pytest.raises(DecodeError):
        r3.add(CHUNK_HEADER.pack(PacketType.CHUNK, 1, 0, 1) + b"x", SOURCE, 0.0)  # one chunk is no message
    with pytest.raises(DecodeError):
        r3.add(CHUNK_HEADER.pack(PacketType.CHUNK, 1, 0, 2) + b"x" * 1500, SOURCE, 0.0)  # longer than ours


Carried = tuple[list[bytes], list[bytes]]


async def carry(a: UdpUnderlay, b: UdpUnderlay, sizes: list[int], *, held: bool = False) -> Carried:
    """Send datagrams of these sizes from a to b (between hold() and flush() if `held`); what was sent, and
    what b's handler got once all arrived or a second passed. Both underlays are closed afterwards."""
    got: list[bytes] = []
    b.start(lambda data, endpoint: got.append(data))
    a.start(lambda data, endpoint: None)
    sent = [bytes([0x83]) + os.urandom(n - 1) for n in sizes]
    if held:
        a.hold()
    for m in sent:
        a.send(m, b.local_endpoint)
    if held:
        assert not got  # held until the flush
        a.flush()
    for _ in range(50):
        if len(got) == len(sent):
            break
        await asyncio.sleep(0.02)
    a.close()
    b.close()
    return sent, got


@pytest.mark.parametrize("mode", ["gso+gro", "gso, no gro", "no gso"])
def test_udp_underlay_carries_every_size_whole_on_loopback(mode: str) -> None:
    sizes = [1, 100, SIZE - 1, SIZE, SIZE + 1, 3000, 30000, 60100, 65000]

    class Watched(Reassembly):
        joined = 0  # messages rebuilt from chunks, one by one or from a coalesced read

        def add(self, chunk: bytes | memoryview, source: tuple[str, int], now: float) -> bytes | None:
            whole = super().add(chunk, source, now)
            Watched.joined += whole is not None
            return whole

        def add_coalesced(self, buffer: bytes, segment: int, source: tuple[str, int], now: float) -> bytes | None:
            whole = super().add_coalesced(buffer, segment, source, now)
            Watched.joined += whole is not None
            return whole

    async def run() -> tuple[list[bytes], list[bytes], dict[str, int]]:
        a = UdpUnderlay(("127.0.0.1", 0), gso=mode != "no gso")
        b = UdpUnderlay(("127.0.0.1", 0), gro=mode == "gso+gro")
        b._reassembly = Watched(b.counters)
        sent, got = await carry(a, b, sizes)
        return sent, got, {**a.counters, **b.counters}

    sent, got, counters = asyncio.run(run())
    assert got == sent, counters
    assert counters["send_failed"] == 0 and not any("chunks" in k for k in counters), counters
    # Every datagram over one chunk's size crossed as chunks, unless the sender has no GSO.
    assert Watched.joined == (0 if mode == "no gso" else sum(n > SIZE for n in sizes))


@pytest.mark.parametrize("gro", [True, False])
def test_held_datagrams_leave_in_runs_and_arrive_whole_and_in_order(gro: bool) -> None:
    # A TAP batch as the data path sends it: runs of equal sizes, a shorter one ending a run, a big one between.
    sizes = [64] * 70 + [1457] * 3 + [900] + [1457] * 2 + [60100] + [100, 100, 40] + [1472] * 40

    async def run() -> tuple[list[bytes], list[bytes], dict[str, int], int]:
        a = UdpUnderlay(("127.0.0.1", 0))
        b = UdpUnderlay(("127.0.0.1", 0), gro=gro)
        sends = 0
        real_sendmsg, real_sendto = a._sock.sendmsg, a._sock.sendto

        def counted(real: Any) -> Any:
            def call(*args: Any) -> Any:
                nonlocal sends
                sends += 1
                return real(*args)

            return call

        a._sock = Wrapped(a._sock, sendmsg=counted(real_sendmsg), sendto=counted(real_sendto))
        sent, got = await carry(a, b, sizes, held=True)
        return sent, got, {**a.counters, **b.counters}, sends

    sent, got, counters, sends = asyncio.run(run())
    assert got == sent, counters
    assert counters["send_failed"] == 0
    # 70 x 64 B: two runs (64 at most per send); 1457 x 3 + 900; 1457 x 2, then the big one chunked; 100, 100, 40;
    # 40 x 1472.
    assert sends == 7, sends


class Wrapped:
    """A socket with some methods replaced (socket objects do not take new attributes)."""

    def __init__(self, sock: Any, **methods: Any) -> None:
        self._sock = sock
        self.__dict__.update(methods)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def test_a_chunk_fits_its_path_mtu_within_what_every_path_carries_and_a_receiver_takes() -> None:
    assert (chunk_size(4), chunk_size(6)) == (1472, 1452)
    assert (chunk_size(4, 1400), chunk_size(6, 1400)) == (1372, 1352)
    assert chunk_size(4, 9000) == chunk_size(4, 65536) == 1472  # jumbo paths: a receiver takes at most MAX_CHUNK
    assert chunk_size(4, 100) == 576 - 28 and chunk_size(6, 600) == 1280 - 48  # below the protocols' minimum
    assert chunk_count(60100, 1472) == 42 and chunk_count(65535, 548) > MAX_CHUNKS  # the latter goes whole


def test_the_chunk_for_a_loopback_endpoint_is_a_1500_byte_paths() -> None:
    u = UdpUnderlay(("127.0.0.1", 0))
    try:
        assert u.chunk_for(("127.0.0.1", 9)) == SIZE  # loopback's 65,536-byte MTU, capped
    finally:
        u.close()


@pytest.mark.parametrize("smaller", [True, False])
def test_chunks_a_route_refuses_are_cut_again_for_its_mtu_as_asked_anew_or_go_whole(smaller: bool) -> None:
    """The route's MTU shrank after the chunk size was asked (path MTU discovery): the kernel refuses the GSO send
    (EINVAL); the underlay asks the route again and cuts the datagram for the smaller MTU, or, if the route has
    none to offer, sends it whole for IP to fragment. Either way it arrives whole."""
    limit = 1200  # the path's MTU, now
    segments: list[int] = []

    async def run() -> tuple[list[bytes], list[bytes], dict[str, int], int]:
        a = UdpUnderlay(("127.0.0.1", 0))
        b = UdpUnderlay(("127.0.0.1", 0))
        real_sendmsg = a._sock.sendmsg
        mtus = iter([1500, limit if smaller else 1500])
        a._route_mtu = lambda endpoint: next(mtus)  # type: ignore[method-assign]

        def sendmsg(buffers: Any, ancillary: Any, flags: int, address: Any) -> int:
            segment = int.from_bytes(ancillary[0][2], "little")
            segments.append(segment)
            if segment + 28 > limit:
                raise OSError(errno.EINVAL, "Invalid argument")
            return int(real_sendmsg(buffers, ancillary, flags, address))

        a._sock = Wrapped(a._sock, sendmsg=sendmsg)
        sent, got = await carry(a, b, [60100])
        return sent, got, {**a.counters, **b.counters}, a.chunk_for(b.local_endpoint)

    sent, got, counters, chunk = asyncio.run(run())
    assert got == sent and counters["send_failed"] == 0, counters
    if smaller:
        assert segments == [1472, limit - 28] and chunk == limit - 28
        assert "gso: sent one by one" not in counters
    else:
        assert segments == [1472] and counters["gso: sent one by one"] == 1


def test_chunks_to_a_peers_turn_relayed_address_leave_room_for_the_servers_header() -> None:
    """The server relays each chunk to its client with a ChannelData or Data indication in front: a full-size
    chunk would then be two IP fragments (or dropped where the server sets DF). Chunks to such an address are
    TURN_HEADROOM smaller and still make the datagram whole."""
    segments: list[int] = []

    async def run() -> tuple[list[bytes], list[bytes], int, int]:
        a = UdpUnderlay(("127.0.0.1", 0))
        b = UdpUnderlay(("127.0.0.1", 0))
        a._route_mtu = lambda endpoint: 1500  # type: ignore[method-assign]
        real_sendmsg = a._sock.sendmsg

        def sendmsg(buffers: Any, ancillary: Any, flags: int, address: Any) -> int:
            segments.append(int.from_bytes(ancillary[0][2], "little"))
            return int(real_sendmsg(buffers, ancillary, flags, address))

        a._sock = Wrapped(a._sock, sendmsg=sendmsg)
        before = a.chunk_for(b.local_endpoint)
        a.through_turn(b.local_endpoint)
        after = a.chunk_for(b.local_endpoint)
        sent, got = await carry(a, b, [60100])
        return sent, got, before, after

    sent, got, before, after = asyncio.run(run())
    assert got == sent
    assert before == 1472 and after == 1472 - TURN_HEADROOM and segments == [after]
