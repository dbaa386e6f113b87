"""XmppBootstrap against a real Prosody on 127.0.0.1: login, membership refusal, errors, hellos, join cost, the
issuer mark, real JIDs, affiliations and being thrown out of the room."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.prosody import ADMIN_PASSWORD, NEEDS_PROSODY, ProsodyServer
from xmpp_bootstrap import BootstrapError, XmppBootstrap, XmppSettings, encode_hello
from xmpp_bootstrap.admin import MUC_ADMIN_NS, set_affiliation
from xmpp_bootstrap.protocol import Occupant

pytestmark = NEEDS_PROSODY

PASSWORD = "member-password"


class Group:
    """The server plus a few member accounts and one non-member; each test makes its own rooms."""

    def __init__(self, server: ProsodyServer) -> None:
        self.server = server
        self.members = [server.register(f"member{i}", PASSWORD) for i in range(3)]
        self.outsider = server.register("outsider", PASSWORD)
        self._rooms = 0

    async def room(self) -> str:
        self._rooms += 1
        return await self.server.create_room(f"group{self._rooms}", self.members)

    def owner(self, room: str, nick: str) -> XmppSettings:
        """The room's owner: the admin account that created it (tests/support/prosody.py)."""
        return self.settings(room, nick, jid=self.server.admin_jid, password=ADMIN_PASSWORD)

    def settings(self, room: str, nick: str, **overrides: Any) -> XmppSettings:
        values: dict[str, Any] = {
            "jid": self.members[0],
            "password": PASSWORD,
            "room": room,
            "nick": nick,
            "host": self.server.host,
            "port": self.server.port,
            "ca_file": str(self.server.ca_file),
            "timeout": 5.0,
        }
        values.update(overrides)
        return XmppSettings(**values)


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Group]:
    server = ProsodyServer(tmp_path_factory.mktemp("prosody"))
    server.start()
    try:
        yield Group(server)
    finally:
        server.stop()


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 60))


async def expect_failure(settings: XmppSettings) -> tuple[str, float, XmppBootstrap]:
    node = XmppBootstrap(settings)
    started = time.monotonic()
    with pytest.raises(BootstrapError) as info:
        await node.start()
    return str(info.value), time.monotonic() - started, node


def test_member_logs_in_and_joins_room(group: Group) -> None:
    async def body() -> None:
        room = await group.room()
        node = XmppBootstrap(group.settings(room, "aa01"))
        await node.start()
        try:
            # The room shows every occupant its own real JID, moderator or not.
            assert node.occupants == {"aa01": Occupant(jid=group.members[0])}
            assert not node.is_anchor
            assert node.stats["stanzas_in"] > 0 and node.stats["stanzas_out"] > 0
        finally:
            await node.stop()
        await node.stop()  # idempotent

    run(body)


def test_wrong_password_is_reported_as_password(group: Group) -> None:
    async def body() -> None:
        room = await group.room()
        message, _, node = await expect_failure(group.settings(room, "aa02", password="not-it"))
        assert "password" in message and group.members[0] in message
        assert node._client is None

    run(body)


def test_non_member_is_refused_at_once(group: Group) -> None:
    async def body() -> None:
        room = await group.room()
        message, elapsed, node = await expect_failure(group.settings(room, "aa03", jid=group.outsider))
        assert "not a member" in message and group.outsider in message and room in message
        assert elapsed < 3.0
        assert node._client is None

    run(body)


def test_missing_room_is_named(group: Group) -> None:
    async def body() -> None:
        room = f"no-such-group@{group.server.muc_domain}"
        message, _, _ = await expect_failure(group.settings(room, "aa04"))
        assert room in message and "does not exist" in message

    run(body)


def test_unreachable_port_names_host_and_port(group: Group) -> None:
    async def body() -> None:
        with socket.socket() as sock:  # a port that was free a moment ago and has no listener now
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        message, elapsed, node = await expect_failure(group.settings("g@conference.x", "aa05", port=port))
        assert f"127.0.0.1:{port}" in message
        assert elapsed < 5.0
        assert node._client is None

    run(body)


def test_wrong_ca_is_reported_as_certificate(group: Group, tmp_path: Path) -> None:
    other_ca = tmp_path / "other-ca.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=other CA",
         "-keyout", str(tmp_path / "other-ca.key"), "-out", str(other_ca)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip

    async def body() -> None:
        message, _, node = await expect_failure(group.settings("g@conference.x", "aa06", ca_file=str(other_ca)))
        assert "certificate" in message and str(other_ca) in message
        assert node._client is None

    run(body)


def test_joiner_gets_the_anchors_answer(group: Group) -> None:
    async def body() -> None:
        room = await group.room()
        first = XmppBootstrap(group.settings(room, "bb01"))
        second = XmppBootstrap(group.settings(room, "bb02", jid=group.members[1]))
        seen: list[tuple[bytes, str]] = []

        def answer(hello: bytes, nick: str) -> bytes:
            seen.append((hello, nick))
            return b"hello from bb01"

        first.on_hello = answer
        try:
            await first.start()
            first.set_anchor(0xABC)
            await second.start()
            await asyncio.sleep(0.2)  # the anchor mark is a presence update after the join
            assert second.occupants["bb01"] == Occupant(True, 0xABC)
            assert await second.exchange({"bb01": b"hello from bb02"}, timeout=5.0) == {"bb01": b"hello from bb01"}
            assert seen == [(b"hello from bb02", "bb02")]
            # An answer nobody waits for (exchange() already gave up) is dropped, never answered again.
            second._send_hello("bb01", encode_hello(b"late answer"), kind="answer")
            await asyncio.sleep(0.3)
            assert len(seen) == 1 and first.stats["answers_late"] == 1
            # A signal is one-way: handed to on_signal, never answered.
            got: list[tuple[bytes, str]] = []
            first.on_signal = lambda payload, nick: got.append((payload, nick))
            assert second.send_signal("bb01", b"an offer to pass on")
            await asyncio.sleep(0.3)
            assert got == [(b"an offer to pass on", "bb02")] and len(seen) == 1
        finally:
            await second.stop()
            await first.stop()

    run(body)


def test_a_node_that_leaves_is_seen_to_go_and_logs_out(group: Group) -> None:
    async def body() -> None:
        room = await group.room()
        nodes = [XmppBootstrap(group.settings(room, f"cc0{i}")) for i in range(3)]
        try:
            for node in nodes:
                await node.start()
            nodes[0].set_anchor(5)
            await nodes[2].stop()
            assert nodes[2]._client is None and not nodes[2].in_room  # logged out of XMPP entirely
            await asyncio.sleep(0.3)
            assert sorted(nodes[0].occupants) == ["cc00", "cc01"]
            # Same account: Prosody shows an occupant the real JIDs of its own account's occupants.
            assert nodes[1].occupants["cc00"] == Occupant(True, 5, jid=group.members[0])
        finally:
            for node in nodes:
                await node.stop()

    run(body)


async def join_cost(group: Group, settled: int, *, plain: bool = False) -> tuple[int, int]:
    """Stanzas one joiner receives for start() and for start()+exchange(), with `settled` nodes before it: the
    first three stay as anchors and the rest leave, or with plain=True all stay (what a plain MUC costs)."""
    room = await group.room()
    nodes = []
    try:
        for i in range(settled):
            node = XmppBootstrap(group.settings(room, f"dd{i:02d}", jid=group.members[i % 3]))
            node.on_hello = lambda _hello, _nick: b"anchor hello"
            await node.start()
            if i < 3 and not plain:
                node.set_anchor(1)
            elif not plain:
                await node.stop()
            nodes.append(node)
        await asyncio.sleep(0.2)
        joiner = XmppBootstrap(group.settings(room, "ffff"))
        await joiner.start()
        after_start = joiner.stats["stanzas_in"]
        anchors = [n for n, o in joiner.occupants.items() if o.anchor]
        answers = await joiner.exchange({n: b"joiner hello" for n in anchors}, timeout=5.0)
        assert len(answers) == (0 if plain else min(settled, 3))
        after_exchange = joiner.stats["stanzas_in"]
        await joiner.stop()
        return after_start, after_exchange
    finally:
        for node in nodes:
            await node.stop()


def test_join_cost_does_not_grow_with_the_group(group: Group) -> None:
    costs: dict[str, tuple[int, int]] = {}

    async def body() -> None:
        costs["2 settled"] = await join_cost(group, 2)
        costs["10 settled"] = await join_cost(group, 10)
        costs["20 settled"] = await join_cost(group, 20)
        costs["10 in plain room"] = await join_cost(group, 10, plain=True)

    run(body)
    print("stanzas received by one joiner (start, start+exchange):", costs)
    # 2 -> 10 settled adds only the third anchor: one presence and one answer.
    assert costs["10 settled"][1] - costs["2 settled"][1] == 2
    assert costs["20 settled"] == costs["10 settled"]
    # A plain room hands the joiner one presence per occupant.
    assert costs["10 in plain room"][0] - costs["2 settled"][0] >= 8


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for a presence to arrive: poll `condition` until it holds or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert condition()


def test_issuer_mark_is_seen_by_members_and_kept_across_rejoin(group: Group) -> None:
    async def body() -> None:
        room = await group.room()
        issuer = XmppBootstrap(group.settings(room, "ab01"))
        other = XmppBootstrap(group.settings(room, "ab02", jid=group.members[1]))
        try:
            issuer.set_issuer(True)  # before start(): the join presence carries it
            await issuer.start()
            await other.start()
            assert other.issuers == ["ab01"] and other.occupants["ab01"] == Occupant(issuer=True)
            assert issuer.issuers == [] and issuer.occupants["ab01"].issuer  # never ourselves
            issuer.set_anchor(0xABC)  # the anchor mark keeps the issuer mark
            await until(lambda: other.occupants["ab01"].anchor)
            assert other.occupants["ab01"] == Occupant(True, 0xABC, True)
            issuer.set_issuer(False)
            await until(lambda: other.issuers == [])
            assert other.occupants["ab01"] == Occupant(True, 0xABC)
            issuer.set_issuer(True)
            await until(lambda: other.issuers == ["ab01"])
            await issuer.stop()
            await until(lambda: "ab01" not in other.occupants)
            await issuer.start()  # rejoins with the issuer mark, without the anchor mark
            await until(lambda: "ab01" in other.occupants)
            assert other.occupants["ab01"] == Occupant(issuer=True) and other.issuers == ["ab01"]
        finally:
            await other.stop()
            await issuer.stop()

    run(body)


def test_owner_sees_real_jids_and_lists_affiliations(group: Group) -> None:
    async def body() -> None:
        room = await group.room()
        owner = XmppBootstrap(group.owner(room, "ac00"))
        member = XmppBootstrap(group.settings(room, "ac01", jid=group.members[1]))
        with pytest.raises(BootstrapError, match="not logged in") as info:
            await owner.fetch_affiliations()
        assert info.value.transient
        try:
            await member.start()
            await owner.start()
            await until(lambda: "ac00" in member.occupants)
            # A moderator sees everyone's bare JID; a member only its own.
            assert owner.occupants["ac01"].jid == group.members[1]
            assert owner.occupants["ac00"].jid == group.server.admin_jid
            assert member.occupants["ac00"].jid is None
            assert member.occupants["ac01"].jid == group.members[1]
            expected = {group.server.admin_jid: "owner"} | dict.fromkeys(group.members, "member")
            assert await owner.fetch_affiliations(timeout=5.0) == expected
            with pytest.raises(BootstrapError, match=r"not an owner/admin of") as info:
                await member.fetch_affiliations(timeout=5.0)
            assert not info.value.transient and group.members[1] in str(info.value)
        finally:
            await member.stop()
            await owner.stop()

    run(body)


async def kick(owner: XmppBootstrap, nick: str) -> None:
    """A moderator's kick (XEP-0045 section 8.2): role none for the occupant `nick`."""
    assert owner._client is not None
    iq = owner._client.make_iq_set(ito=owner.settings.room)
    query = ET.Element(f"{{{MUC_ADMIN_NS}}}query")
    ET.SubElement(query, f"{{{MUC_ADMIN_NS}}}item", {"nick": nick, "role": "none"})
    iq.append(query)
    await iq.send(timeout=5.0)  # type: ignore[no-untyped-call]


def test_a_revoked_member_is_thrown_out_and_cannot_rejoin(group: Group, caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        room = await group.room()
        owner = XmppBootstrap(group.owner(room, "ad00"))
        watcher = XmppBootstrap(group.settings(room, "ad01"))
        revoked = XmppBootstrap(group.settings(room, "ad02", jid=group.members[2]))
        changes: list[bool] = []
        revoked.on_change = lambda: changes.append(revoked.in_room)
        try:
            for node in (owner, watcher, revoked):
                await node.start()
            revoked.set_anchor(9)
            await until(lambda: "ad02" in watcher.occupants and "ad02" in owner.occupants)
            assert owner._client is not None
            with caplog.at_level(logging.WARNING, logger="xmpp_bootstrap.client"):
                await set_affiliation(owner._client, room, group.members[2], "none", timeout=5.0)
                await until(lambda: not revoked.in_room)
            assert revoked.removed_from_room == "membership revoked"
            assert not revoked.is_anchor and revoked.occupants == {} and changes[-1] is False
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert warnings == [f"removed from room {room}: membership revoked"]
            await until(lambda: "ad02" not in watcher.occupants)
            # The server refuses the next join as any non-member's; nothing is left connected.
            with pytest.raises(BootstrapError, match="is not a member of room") as info:
                await revoked.start()
            assert not info.value.transient and group.members[2] in str(info.value)
            assert revoked._client is None and not revoked.in_room
            assert revoked.removed_from_room == "membership revoked"
            # Given back its membership, it joins again and the reason is cleared.
            await set_affiliation(owner._client, room, group.members[2], "member", timeout=5.0)
            await revoked.start()
            assert revoked.in_room and revoked.removed_from_room is None
            # A kick (role none) takes it out too; a member may come straight back.
            await kick(owner, "ad02")
            await until(lambda: not revoked.in_room)
            assert revoked.removed_from_room == "kicked"
            await revoked.start()
            assert revoked.in_room and revoked.removed_from_room is None
        finally:
            for node in (revoked, watcher, owner):
                await node.stop()

    run(body)
