"""MemoryBootstrap follows the XMPP bootstrap's rules; the hello codec survives hostile bytes."""

from __future__ import annotations

import asyncio
import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xmpp_bootstrap import MAX_HELLO, BootstrapError, MemoryBootstrap, MemoryRoom, decode_hello, encode_hello
from xmpp_bootstrap.protocol import MAX_HELLO_TEXT, should_become_anchor, should_stand_down

MEMBERS = [f"m{i}@example.test" for i in range(4)]


def new_room(name: str = "group@conference.example.test") -> MemoryRoom:
    return MemoryRoom(name, MEMBERS)


def test_member_joins_room() -> None:
    room = new_room()
    node = MemoryBootstrap(room, "m0@example.test/laptop", "aa01")
    asyncio.run(node.start())
    assert node.in_room and list(room.occupants) == ["aa01"]
    assert node.stats["presences_in"] == 1  # its own presence only


def test_wrong_password_is_reported_as_password() -> None:
    node = MemoryBootstrap(new_room(), MEMBERS[0], "aa02", password_ok=False)
    with pytest.raises(BootstrapError, match="password"):
        asyncio.run(node.start())
    assert not node.in_room


def test_non_member_is_refused() -> None:
    room = new_room()
    node = MemoryBootstrap(room, "stranger@example.test", "aa03")
    with pytest.raises(BootstrapError, match=r"stranger@example\.test is not a member of room group@"):
        asyncio.run(node.start())
    assert room.occupants == {}


def test_missing_room_is_named() -> None:
    room = new_room("gone@conference.example.test")
    room.destroy()
    with pytest.raises(BootstrapError, match=r"room gone@conference\.example\.test does not exist"):
        asyncio.run(MemoryBootstrap(room, MEMBERS[0], "aa04").start())


def test_duplicate_nick_is_refused() -> None:
    room = new_room()
    asyncio.run(MemoryBootstrap(room, MEMBERS[0], "aa05").start())
    with pytest.raises(BootstrapError, match="nick aa05 is already in use"):
        asyncio.run(MemoryBootstrap(room, MEMBERS[1], "aa05").start())


def test_joiner_gets_the_anchors_answer() -> None:
    async def body() -> None:
        room = new_room()
        first = MemoryBootstrap(room, MEMBERS[0], "bb01")
        seen: list[bytes] = []
        first.on_hello = lambda hello: seen.append(hello) or b"hello from bb01"
        await first.start()
        assert await first.exchange(b"hello from bb01") == []
        await first.settle()
        assert first.is_anchor
        second = MemoryBootstrap(room, MEMBERS[1], "bb02")
        await second.start()
        assert await second.exchange(b"hello from bb02") == [b"hello from bb01"]
        assert seen == [b"hello from bb02"]

    asyncio.run(body())


def test_settled_non_anchor_leaves_the_room() -> None:
    async def body() -> None:
        room = new_room()
        nodes = [MemoryBootstrap(room, MEMBERS[0], f"cc0{i}", anchors=2) for i in range(3)]
        for node in nodes:
            await node.start()
            await node.settle()
        assert [n.is_anchor for n in nodes] == [True, True, False]
        assert sorted(room.occupants) == ["cc00", "cc01"]
        assert not nodes[2].in_room

    asyncio.run(body())


def test_extra_anchors_from_simultaneous_settles_stand_down() -> None:
    async def body() -> None:
        room = new_room()
        nodes = [MemoryBootstrap(room, MEMBERS[0], f"dd0{i}", anchors=2) for i in range(4)]
        for node in reversed(nodes):  # recruited at once: each takes the role, the largest nicks give it back
            await node.become_anchor()
        assert room.anchors() == ["dd00", "dd01"]
        assert not nodes[2].in_room and not nodes[3].in_room

    asyncio.run(body())


def test_become_anchor_rejoins_after_leaving() -> None:
    async def body() -> None:
        room = new_room()
        anchor = MemoryBootstrap(room, MEMBERS[0], "ee00", anchors=1)
        node = MemoryBootstrap(room, MEMBERS[1], "ee01", anchors=1)
        for n in (anchor, node):
            await n.start()
            await n.settle()
        assert anchor.is_anchor and not node.in_room
        await anchor.stop()  # the last anchor goes; the overlay recruits a replacement
        await node.become_anchor()
        assert node.in_room and room.anchors() == ["ee01"]

    asyncio.run(body())


def join_cost(settled: int, *, settle: bool = True) -> int:
    async def body() -> int:
        room = new_room()
        for i in range(settled):
            node = MemoryBootstrap(room, MEMBERS[i % 4], f"ff{i:03d}")
            node.on_hello = lambda _hello: b"anchor hello"
            await node.start()
            if settle:
                await node.settle()
        joiner = MemoryBootstrap(room, MEMBERS[0], "zzzz")
        await joiner.start()
        await joiner.exchange(b"joiner hello")
        return joiner.stats["stanzas_in"]

    return asyncio.run(body())


def test_join_cost_is_constant_in_a_200_node_group() -> None:
    assert join_cost(10) == join_cost(200) == 3 + 1 + 3  # 3 anchor presences, our own, 3 answers
    assert join_cost(200, settle=False) == 200 + 1  # a plain room: one presence per occupant


def test_anchor_role_rules() -> None:
    assert should_become_anchor(False, 2, 3) and not should_become_anchor(False, 3, 3)
    assert should_become_anchor(True, 5, 3)  # already an anchor: stand_down decides, not settle
    assert should_stand_down("d", ["a", "b", "c", "d"], 3)
    assert not should_stand_down("a", ["a", "b", "c", "d"], 3)
    assert not should_stand_down("d", ["b", "d"], 3)


def test_codec_round_trip_and_limits() -> None:
    for payload in (b"\x00", b"x" * MAX_HELLO):
        assert decode_hello(encode_hello(payload)) == payload
    with pytest.raises(ValueError, match="limit is 4096"):
        encode_hello(b"x" * (MAX_HELLO + 1))
    assert decode_hello(base64.b64encode(b"x" * (MAX_HELLO + 1)).decode()) is None
    assert decode_hello("") is None and decode_hello(None) is None
    assert decode_hello("aGVsbG8=\n") == b"hello"
    assert decode_hello("aGVsbG8") is None  # missing padding
    assert decode_hello("aGVs*G8=") is None


@given(st.binary(max_size=MAX_HELLO_TEXT + 64))
def test_decoder_never_raises_on_bytes(data: bytes) -> None:
    payload = decode_hello(data.decode("latin-1"))
    assert payload is None or 0 < len(payload) <= MAX_HELLO


@given(st.one_of(st.none(), st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_hostile_hello_is_a_counted_drop(text: str | None) -> None:
    room = new_room()
    anchor = MemoryBootstrap(room, MEMBERS[0], "aa")
    asked: list[bytes] = []
    anchor.on_hello = lambda hello: asked.append(hello) or b"answer"
    asyncio.run(anchor.start())
    assert room.deliver("someone", "aa", text)
    payload = decode_hello(text)
    if payload is None:
        assert anchor.stats["hellos_dropped"] == 1 and asked == []
    else:
        assert asked == [payload] and anchor.stats["hellos_dropped"] == 0


def test_late_answer_is_not_taken_for_a_request() -> None:
    room = new_room()
    node = MemoryBootstrap(room, MEMBERS[0], "gg01")
    asked: list[bytes] = []
    node.on_hello = lambda hello: asked.append(hello) or b"reply"
    asyncio.run(node.start())
    assert room.deliver("gg02", "gg01", encode_hello(b"answer nobody waits for"), answer=True)
    assert asked == [] and node.stats["answers_late"] == 1
