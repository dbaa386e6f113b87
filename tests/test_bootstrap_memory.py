"""MemoryBootstrap follows the XMPP bootstrap's rules (tests/test_xmpp_bootstrap.py checks the same against
Prosody); the hello codec survives hostile bytes."""

from __future__ import annotations

import asyncio
import base64
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xmpp_bootstrap import MAX_HELLO, BootstrapError, MemoryBootstrap, MemoryRoom, decode_hello, encode_hello
from xmpp_bootstrap.protocol import MAX_HELLO_TEXT, Occupant, should_stand_down

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
        seen: list[tuple[bytes, str]] = []
        first.on_hello = lambda hello, nick: seen.append((hello, nick)) or b"hello from bb01"
        await first.start()
        first.set_anchor(0x1234)
        assert first.is_anchor
        second = MemoryBootstrap(room, MEMBERS[1], "bb02")
        await second.start()
        assert second.occupants["bb01"] == Occupant(True, 0x1234)
        assert await second.exchange({"bb01": b"hello from bb02"}) == {"bb01": b"hello from bb01"}
        assert seen == [(b"hello from bb02", "bb02")]

    asyncio.run(body())


def test_room_changes_are_reported_and_anchor_marks_carry_the_overlay() -> None:
    async def body() -> None:
        room = new_room()
        watcher = MemoryBootstrap(room, MEMBERS[0], "cc00")
        changes: list[dict[str, Occupant]] = []
        watcher.on_change = lambda: changes.append(dict(watcher.occupants))
        await watcher.start()
        other = MemoryBootstrap(room, MEMBERS[1], "cc01")
        await other.start()
        other.set_anchor(7)
        await other.stop()
        me = Occupant(jid=MEMBERS[0])  # the room shows us our own real JID, and no one else's
        assert [sorted(c.items()) for c in changes[-3:]] == [
            [("cc00", me), ("cc01", Occupant())],
            [("cc00", me), ("cc01", Occupant(True, 7))],
            [("cc00", me)],
        ]
        assert not other.in_room and not other.is_anchor

    asyncio.run(body())


def test_a_signal_is_one_way_and_only_to_an_occupant() -> None:
    async def body() -> None:
        room = new_room()
        a, b = MemoryBootstrap(room, MEMBERS[0], "dd00"), MemoryBootstrap(room, MEMBERS[1], "dd01")
        got: list[tuple[bytes, str]] = []
        b.on_signal = lambda payload, nick: got.append((payload, nick))
        b.on_hello = lambda payload, nick: pytest.fail("a signal is not a hello request")
        for n in (a, b):
            await n.start()
        assert a.send_signal("dd01", b"offer for you")
        assert not a.send_signal("nobody", b"lost")
        assert got == [(b"offer for you", "dd00")] and a.stats["signals_out"] == 1

    asyncio.run(body())


def test_stop_leaves_the_room_and_start_comes_back() -> None:
    async def body() -> None:
        room = new_room()
        node = MemoryBootstrap(room, MEMBERS[1], "ee01")
        await node.start()
        await node.stop()
        assert not node.in_room and room.occupants == {}
        await node.start()
        node.set_anchor(3)
        assert node.in_room and room.anchors() == ["ee01"] and node.stats["logins"] == 2

    asyncio.run(body())


def join_cost(settled: int, *, anchors: int = 3, plain: bool = False) -> int:
    """Stanzas a joiner receives for start() and one exchange with the anchors, after `settled` nodes of
    which the first `anchors` stay in the room as anchors and the rest left (in a `plain` room all stay)."""

    async def body() -> int:
        room = new_room()
        for i in range(settled):
            node = MemoryBootstrap(room, MEMBERS[i % 4], f"ff{i:03d}")
            node.on_hello = lambda _hello, _nick: b"anchor hello"
            await node.start()
            if i < anchors:
                node.set_anchor(1)
            elif not plain:
                await node.stop()
        joiner = MemoryBootstrap(room, MEMBERS[0], "zzzz")
        await joiner.start()
        targets = [n for n, o in joiner.occupants.items() if o.anchor]
        await joiner.exchange({n: b"joiner hello" for n in targets})
        return joiner.stats["stanzas_in"]

    return asyncio.run(body())


def test_join_cost_is_constant_in_a_200_node_group() -> None:
    assert join_cost(10) == join_cost(200) == 3 + 1 + 3  # 3 anchor presences, our own, 3 answers
    assert join_cost(200, anchors=0, plain=True) == 200 + 1  # a plain room: one presence per occupant


def test_anchor_role_rules() -> None:
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
    anchor.on_hello = lambda hello, _nick: asked.append(hello) or b"answer"
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
    node.on_hello = lambda hello, _nick: asked.append(hello) or b"reply"
    asyncio.run(node.start())
    assert room.deliver("gg02", "gg01", encode_hello(b"answer nobody waits for"), kind="answer")
    assert asked == [] and node.stats["answers_late"] == 1


OWNER = "Owner@Example.test"


def test_issuer_mark_is_seen_by_members_and_kept_across_rejoin() -> None:
    async def body() -> None:
        room = new_room()
        issuer = MemoryBootstrap(room, MEMBERS[0], "ab01")
        other = MemoryBootstrap(room, MEMBERS[1], "ab02")
        issuer.set_issuer(True)  # before start(): the join carries it
        await issuer.start()
        await other.start()
        assert other.issuers == ["ab01"] and other.occupants["ab01"] == Occupant(issuer=True)
        assert issuer.issuers == [] and issuer.occupants["ab01"].issuer  # never ourselves
        issuer.set_anchor(0xABC)
        assert other.occupants["ab01"] == Occupant(True, 0xABC, True)
        sent, seen = issuer.stats["stanzas_out"], other.stats["presences_in"]
        issuer.set_issuer(False)
        issuer.set_issuer(False)  # no change, no presence
        assert other.issuers == [] and other.occupants["ab01"] == Occupant(True, 0xABC)
        assert issuer.stats["stanzas_out"] == sent + 1 and other.stats["presences_in"] == seen + 1
        issuer.set_issuer(True)
        await issuer.stop()
        assert other.issuers == [] and issuer.issuers == []
        await issuer.start()  # rejoins with the issuer mark, without the anchor mark
        assert other.occupants["ab01"] == Occupant(issuer=True) and other.issuers == ["ab01"]

    asyncio.run(body())


def test_owner_sees_real_jids_and_lists_affiliations() -> None:
    async def body() -> None:
        room = MemoryRoom("group@conference.example.test", MEMBERS, owners=[OWNER])
        assert room.members == {*MEMBERS, "owner@example.test"} and room.owners == {"owner@example.test"}
        owner = MemoryBootstrap(room, OWNER + "/admin", "ac00")
        member = MemoryBootstrap(room, MEMBERS[1] + "/laptop", "ac01")
        twin = MemoryBootstrap(room, MEMBERS[1] + "/phone", "ac02")
        with pytest.raises(BootstrapError, match="not logged in") as info:
            await owner.fetch_affiliations()
        assert info.value.transient
        for node in (member, owner, twin):
            await node.start()
        # An owner sees everyone's bare JID; anyone else only those logged in as its own account.
        assert owner.occupants == {
            "ac00": Occupant(jid="owner@example.test"),
            "ac01": Occupant(jid=MEMBERS[1]),
            "ac02": Occupant(jid=MEMBERS[1]),
        }
        assert member.occupants == {
            "ac00": Occupant(),
            "ac01": Occupant(jid=MEMBERS[1]),
            "ac02": Occupant(jid=MEMBERS[1]),
        }
        expected = {"owner@example.test": "owner"} | dict.fromkeys(MEMBERS, "member")
        assert await owner.fetch_affiliations() == expected
        with pytest.raises(BootstrapError, match=r"you \(m1@example\.test\) are not an owner/admin of group@") as info:
            await member.fetch_affiliations()
        assert not info.value.transient

    asyncio.run(body())


def test_a_revoked_member_is_thrown_out_and_cannot_rejoin(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        room = MemoryRoom("group@conference.example.test", MEMBERS, owners=[OWNER])
        watcher = MemoryBootstrap(room, MEMBERS[0], "ad01")
        revoked = MemoryBootstrap(room, MEMBERS[2], "ad02")
        changes: list[bool] = []
        revoked.on_change = lambda: changes.append(revoked.in_room)
        seen: list[list[str]] = []
        watcher.on_change = lambda: seen.append(sorted(watcher.occupants))
        for node in (watcher, revoked):
            await node.start()
        revoked.set_anchor(9)
        before = watcher.stats["presences_in"]
        with caplog.at_level(logging.WARNING, logger="xmpp_bootstrap.memory"):
            room.remove_member(MEMBERS[2].upper())
        assert MEMBERS[2] not in room.members and list(room.occupants) == ["ad01"]
        assert not revoked.in_room and not revoked.is_anchor and revoked.occupants == {} and changes[-1] is False
        assert revoked.removed_from_room == "membership revoked"
        assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
            "removed from room group@conference.example.test: membership revoked"
        ]
        assert seen[-1] == ["ad01"] and watcher.stats["presences_in"] == before + 1
        # The room refuses the next join as any non-member's.
        with pytest.raises(BootstrapError, match=r"m2@example\.test is not a member of room group@") as info:
            await revoked.start()
        assert not info.value.transient and not revoked.in_room and not revoked.logged_in
        assert revoked.removed_from_room == "membership revoked"
        # Given back its membership, it joins again and the reason is cleared.
        room.add_member(MEMBERS[2])
        await revoked.start()
        assert revoked.in_room and revoked.removed_from_room is None

    asyncio.run(body())


def test_removing_an_owner_takes_its_ownership_too() -> None:
    async def body() -> None:
        room = MemoryRoom("group@conference.example.test", MEMBERS, owners=[OWNER])
        owner = MemoryBootstrap(room, OWNER, "ae00")
        await owner.start()
        room.remove_member(OWNER)
        assert room.owners == set() and "owner@example.test" not in room.members
        assert not owner.in_room and owner.removed_from_room == "membership revoked"
        with pytest.raises(BootstrapError, match="not an owner/admin"):
            await owner.fetch_affiliations()  # still logged in, no longer an owner
        # A destroyed room is no removal for a reason: removed_from_room stays None.
        present = MemoryBootstrap(room, MEMBERS[0], "ae01")
        await present.start()
        room.destroy()
        assert not present.in_room and present.removed_from_room is None

    asyncio.run(body())


def test_room_settings_a_group_should_not_have_are_named_one_line_each() -> None:
    from xmpp_bootstrap.protocol import room_config_problems

    # What `group create` leaves (XEP-0045 disco#info features of a members-only, hidden, unmoderated room).
    room = "g@conference.example.test"
    assert room_config_problems(room, ["muc_membersonly", "muc_hidden", "muc_unmoderated"]) == []
    lines = room_config_problems(room, ["muc_open", "muc_public", "muc_moderated", "muc_temporary"])
    assert len(lines) == 3 and all(line.startswith(f"room {room} is ") for line in lines)
    assert any("members-only" in line for line in lines) and any("public" in line for line in lines)


@pytest.mark.parametrize(
    ("condition", "transient", "words"),
    [
        ("resource-constraint", True, "occupant cap"),  # ejabberd 23.01's full room
        ("service-unavailable", True, "full"),  # XEP-0045 section 7.2.10's full room
        ("forbidden", False, "a ban, or a room that no longer exists"),
        ("registration-required", False, "not a member"),
    ],
)
def test_a_refused_join_names_the_condition_and_only_a_full_room_is_retried(
    condition: str, transient: bool, words: str
) -> None:
    import xml.etree.ElementTree as ET
    from types import SimpleNamespace

    from xmpp_bootstrap import XmppBootstrap, XmppSettings

    async def scenario() -> BootstrapError:
        boot = XmppBootstrap(XmppSettings(jid="a@example.test/n", password="p", room="g@conference.example.test",
                                          nick="0123456789abcdef"))  # fmt: skip
        boot._joined = asyncio.get_running_loop().create_future()
        xml = ET.fromstring(
            "<presence xmlns='jabber:client' type='error'><error type='cancel'>"
            f"<{condition} xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>"
            "<text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'>said by the server</text></error></presence>"
        )
        boot._on_join_refused(SimpleNamespace(xml=xml))
        with pytest.raises(BootstrapError) as refused:
            await boot._joined
        return refused.value

    error = asyncio.run(scenario())
    assert error.transient is transient and words in str(error)
    assert "g@conference.example.test" in str(error)
