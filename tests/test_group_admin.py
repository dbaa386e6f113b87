"""Group administration against a real Prosody on 127.0.0.1: create, add, remove, list, and who may do it."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from tests.support.prosody import ADMIN_PASSWORD, NEEDS_PROSODY, ProsodyServer
from xmpp_bootstrap import BootstrapError, XmppBootstrap, XmppSettings
from xmpp_bootstrap.admin import (
    AdminSettings,
    admin_session,
    fetch_affiliations,
    group_add,
    group_create,
    group_list,
    group_remove,
    set_affiliation,
)

pytestmark = NEEDS_PROSODY

PASSWORD = "member-password"


class Server:
    """The server, its admin (the only account Prosody lets create rooms here), members and one outsider."""

    def __init__(self, server: ProsodyServer) -> None:
        self.server = server
        self.members = [server.register(f"member{i}", PASSWORD) for i in range(4)]
        self.outsider = server.register("outsider", PASSWORD)
        self._rooms = 0

    def new_room(self) -> str:
        self._rooms += 1
        return f"admin-group{self._rooms}@{self.server.muc_domain}"

    def owner(self, room: str, **overrides: Any) -> AdminSettings:
        values: dict[str, Any] = {
            "jid": self.server.admin_jid,
            "password": ADMIN_PASSWORD,
            "room": room,
            "host": self.server.host,
            "port": self.server.port,
            "ca_file": self.server.ca_file,
            "timeout": 5.0,
        }
        values.update(overrides)
        return AdminSettings(**values)

    def as_account(self, room: str, jid: str) -> AdminSettings:
        return self.owner(room, jid=jid, password=PASSWORD)

    async def join(self, room: str, jid: str, nick: str) -> None:
        """Join the room as a node does (raises the node's BootstrapError when refused), then leave."""
        node = XmppBootstrap(
            XmppSettings(
                jid=jid,
                password=PASSWORD,
                room=room,
                nick=nick,
                host=self.server.host,
                port=self.server.port,
                ca_file=str(self.server.ca_file),
                timeout=5.0,
            )
        )
        try:
            await node.start()
        finally:
            await node.stop()


@pytest.fixture(scope="module")
def xmpp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = ProsodyServer(tmp_path_factory.mktemp("prosody"))
    server.start()
    try:
        yield Server(server)
    finally:
        server.stop()


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 30))


def test_owner_creates_group_and_lists_owner_and_members(xmpp: Server) -> None:
    async def body() -> None:
        room = xmpp.new_room()
        # The owner's own JID in the list must not demote it to member; duplicates are one member.
        await group_create(xmpp.owner(room), [*xmpp.members[:2], xmpp.members[0], xmpp.server.admin_jid])
        assert await group_list(xmpp.owner(room)) == {
            xmpp.server.admin_jid: "owner",
            xmpp.members[0]: "member",
            xmpp.members[1]: "member",
        }
        await xmpp.join(room, xmpp.members[1], "aa01")  # a member gets in

    run(body)


def test_created_room_is_members_only_persistent_and_hidden(xmpp: Server) -> None:
    async def body() -> None:
        room = xmpp.new_room()
        await group_create(xmpp.owner(room), [xmpp.members[0]])
        async with admin_session(xmpp.owner(room)) as client:
            iq = client.make_iq_get(queryxmlns="http://jabber.org/protocol/disco#info", ito=room)
            info = await iq.send(timeout=5)
        features = {f.get("var") for f in info.xml.iter("{http://jabber.org/protocol/disco#info}feature")}
        assert {"muc_membersonly", "muc_persistent", "muc_hidden", "muc_unmoderated", "muc_semianonymous"} <= features

    run(body)


def test_group_create_on_an_owned_room_reconfigures_and_adds(xmpp: Server) -> None:
    async def body() -> None:
        room = xmpp.new_room()
        await group_create(xmpp.owner(room), [xmpp.members[0]])
        await group_create(xmpp.owner(room), [xmpp.members[1]])
        assert await group_list(xmpp.owner(room)) == {
            xmpp.server.admin_jid: "owner",
            xmpp.members[0]: "member",
            xmpp.members[1]: "member",
        }

    run(body)


def test_group_add_then_list_shows_the_new_member(xmpp: Server) -> None:
    async def body() -> None:
        room = xmpp.new_room()
        await group_create(xmpp.owner(room), [xmpp.members[0]])
        await group_add(xmpp.owner(room), [xmpp.members[2], xmpp.members[3]])
        listed = await group_list(xmpp.owner(room))
        assert listed[xmpp.members[2]] == "member" and listed[xmpp.members[3]] == "member"
        assert len(listed) == 4

    run(body)


def test_group_remove_drops_the_member_and_bars_its_join(xmpp: Server) -> None:
    async def body() -> None:
        room = xmpp.new_room()
        await group_create(xmpp.owner(room), xmpp.members[:2])
        await group_remove(xmpp.owner(room), [xmpp.members[1]])
        assert await group_list(xmpp.owner(room)) == {xmpp.server.admin_jid: "owner", xmpp.members[0]: "member"}
        with pytest.raises(BootstrapError, match="not a member"):
            await xmpp.join(room, xmpp.members[1], "aa02")

    run(body)


def test_non_member_cannot_join_the_group(xmpp: Server) -> None:
    async def body() -> None:
        room = xmpp.new_room()
        await group_create(xmpp.owner(room), [xmpp.members[0]])
        with pytest.raises(BootstrapError, match="not a member") as info:
            await xmpp.join(room, xmpp.outsider, "aa03")
        assert xmpp.outsider in str(info.value) and not info.value.transient

    run(body)


def test_member_cannot_add_members(xmpp: Server) -> None:
    async def body() -> None:
        room = xmpp.new_room()
        await group_create(xmpp.owner(room), [xmpp.members[0]])
        with pytest.raises(BootstrapError, match="not an owner/admin") as info:
            await group_add(xmpp.as_account(room, xmpp.members[0]), [xmpp.outsider])
        assert room in str(info.value)
        assert xmpp.outsider not in await group_list(xmpp.owner(room))

    run(body)


def test_member_setting_an_affiliation_is_refused(xmpp: Server) -> None:
    async def body() -> None:
        room = xmpp.new_room()
        await group_create(xmpp.owner(room), [xmpp.members[0]])
        async with admin_session(xmpp.as_account(room, xmpp.members[0])) as client:
            with pytest.raises(BootstrapError, match="may not make") as info:
                await set_affiliation(client, room, xmpp.outsider, "member")
        assert "owner/admin" in str(info.value)

    run(body)


def test_admin_lists_members_and_admins_and_adds_members(xmpp: Server) -> None:
    async def body() -> None:
        room = xmpp.new_room()
        await group_create(xmpp.owner(room), [xmpp.members[0]])
        async with admin_session(xmpp.owner(room)) as client:
            await set_affiliation(client, room, xmpp.members[1], "admin")
        admin = xmpp.as_account(room, xmpp.members[1])
        await group_add(admin, [xmpp.members[2]])
        # The owner list is the owner's to read (XEP-0045 section 10.5): an admin sees everyone else.
        assert await group_list(admin) == {
            xmpp.members[0]: "member",
            xmpp.members[1]: "admin",
            xmpp.members[2]: "member",
        }

    run(body)


def test_group_create_by_a_member_of_an_existing_room_says_not_owner(xmpp: Server) -> None:
    async def body() -> None:
        room = xmpp.new_room()
        await group_create(xmpp.owner(room), [xmpp.members[0]])
        with pytest.raises(BootstrapError, match=r"exists and .* is not its owner") as info:
            await group_create(xmpp.as_account(room, xmpp.members[0]), [xmpp.outsider])
        assert room in str(info.value) and xmpp.members[0] in str(info.value)

    run(body)


def test_group_create_without_the_right_to_create_rooms_is_named(xmpp: Server) -> None:
    async def body() -> None:
        room = xmpp.new_room()  # Prosody here lets only its admin create rooms (restrict_room_creation)
        with pytest.raises(BootstrapError, match=r"does not exist and .* may not create rooms"):
            await group_create(xmpp.as_account(room, xmpp.members[0]), [xmpp.members[1]])

    run(body)


def test_last_owner_cannot_remove_itself(xmpp: Server) -> None:
    async def body() -> None:
        room = xmpp.new_room()
        await group_create(xmpp.owner(room), [])
        with pytest.raises(BootstrapError, match="only owner"):
            await group_remove(xmpp.owner(room), [xmpp.server.admin_jid])

    run(body)


def test_missing_room_is_named(xmpp: Server) -> None:
    async def body() -> None:
        room = f"no-such-group@{xmpp.server.muc_domain}"
        with pytest.raises(BootstrapError, match=re.escape(f"no such room {room}")):
            await group_list(xmpp.owner(room))

    run(body)


def test_wrong_password_is_a_lasting_error(xmpp: Server) -> None:
    async def body() -> None:
        with pytest.raises(BootstrapError, match="password") as info:
            await group_list(xmpp.owner(xmpp.new_room(), password="not-it"))
        assert not info.value.transient

    run(body)


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("member", "not a jid", "is not a valid JID"),
        ("member", "user@@example.test", "is not a valid JID"),
        ("member", "example.test", "is not user@domain"),
        ("member", "member0@example.test/laptop", "has a resource"),
        ("room", "group@@conference.example.test", "is not a valid JID"),
        ("jid", "admin@@example.test", "is not a valid JID"),
    ],
)
def test_invalid_jid_is_refused_before_connecting(field: str, value: str, says: str) -> None:
    with socket.socket() as sock:  # a port with no listener: any connection attempt would fail differently
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = AdminSettings("admin@example.test", "x", "g@conference.example.test", host="127.0.0.1", port=port)
    members = ["member0@example.test"]
    if field == "member":
        members = [value]
    elif field == "room":
        settings = AdminSettings(settings.jid, "x", value, host="127.0.0.1", port=port)
    else:
        settings = AdminSettings(value, "x", settings.room, host="127.0.0.1", port=port)

    async def body() -> None:
        with pytest.raises(BootstrapError, match=says) as info:
            await group_add(settings, members)
        assert repr(value) in str(info.value) and not info.value.transient

    run(body)


def test_fetch_affiliations_on_a_running_session(xmpp: Server) -> None:
    async def body() -> None:
        room = xmpp.new_room()
        await group_create(xmpp.owner(room), [xmpp.members[3]])
        async with admin_session(xmpp.owner(room)) as client:
            await set_affiliation(client, room, xmpp.members[2], "outcast")
            # Outcasts are banned accounts, not group members: not listed.
            assert await fetch_affiliations(client, room) == {
                xmpp.server.admin_jid: "owner",
                xmpp.members[3]: "member",
            }

    run(body)
