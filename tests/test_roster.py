"""SocialVPN friends: the pure FriendRoster with literal `now` values, then the roster commands and FriendWatch
between real clients on a real Prosody (who is a friend, which resources are devices, requests, removal)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from slixmpp import JID, ClientXMPP

from tests.support.prosody import NEEDS_PROSODY, ProsodyServer
from xmpp_bootstrap.friends import (
    FriendWatch,
    friend_accept,
    friend_add,
    friend_list,
    friend_remove,
    hold_subscription_requests,
)
from xmpp_bootstrap.roster import (
    PREAPPROVAL_FEATURE,
    SOCIAL_NS,
    Device,
    DeviceOffline,
    DeviceOnline,
    FriendAdded,
    FriendEntry,
    FriendEvent,
    FriendRemoved,
    FriendRequest,
    FriendRoster,
    PresenceNote,
    RosterItem,
    node_marker,
    parse_presence,
    parse_roster,
)
from xmpp_bootstrap.session import BootstrapError

ME = "me@example.test"
BOB = "bob@example.test"
CAROL = "carol@example.test"


def both(jid: str = BOB) -> RosterItem:
    return RosterItem(jid, "both")


def online(jid: str, resource: str, *, node: bool = True) -> PresenceNote:
    return PresenceNote(jid, resource, "available", node)


def offline(jid: str, resource: str = "") -> PresenceNote:
    return PresenceNote(jid, resource, "unavailable")


def device(resource: str, since: float, last_seen: float | None = None, jid: str = BOB) -> Device:
    return Device(f"{jid}/{resource}", jid, resource, since, since if last_seen is None else last_seen)


def friends_with(*jids: str) -> FriendRoster:
    roster = FriendRoster(ME)
    roster.load([both(jid) for jid in jids], now=0.0)
    return roster


# --- parsing ---------------------------------------------------------------------------------------------------


def test_parse_roster_reads_items_and_skips_what_is_not_a_contact() -> None:
    query = ET.fromstring(
        "<query xmlns='jabber:iq:roster'>"
        "<item jid='Bob@Example.test' subscription='both' name='Bob'/>"
        "<item jid='carol@example.test' ask='subscribe'/>"
        "<item jid='dave@example.test' subscription='remove'/>"
        "<item jid='example.test' subscription='both'/>"  # a server, not an account
        "<item jid='eve@example.test/laptop' subscription='both'/>"  # a full JID
        "<item jid='frank@example.test' subscription='sometimes'/>"
        "<item jid='@@bad' subscription='both'/>"
        "</query>"
    )
    assert parse_roster(query) == [
        RosterItem(BOB, "both", name="Bob"),  # JIDs are compared prepared (lower-case node and domain)
        RosterItem(CAROL, "none", asking=True),
        RosterItem("dave@example.test", "remove"),
    ]


def test_parse_presence_reads_kind_resource_and_node_marker() -> None:
    def parse(xml: str) -> PresenceNote | None:
        return parse_presence(ET.fromstring(xml))

    marked = f"<presence xmlns='jabber:client' from='bob@example.test/laptop'><node xmlns='{SOCIAL_NS}'/></presence>"
    assert parse(marked) == PresenceNote(BOB, "laptop", "available", node=True)
    away = "<presence xmlns='jabber:client' from='bob@example.test/pidgin'><show>away</show></presence>"
    assert parse(away) == PresenceNote(BOB, "pidgin", "available")
    assert parse("<presence from='bob@example.test' type='unavailable'/>") == PresenceNote(BOB, "", "unavailable")
    assert parse("<presence from='carol@example.test' type='subscribe'/>") == PresenceNote(CAROL, "", "subscribe")
    assert parse("<presence from='bob@example.test/x' type='error'/>") is None
    assert parse("<presence from='bob@example.test' type='probe'/>") is None
    assert parse("<presence from='example.test'/>") is None
    assert parse("<presence/>") is None


# --- friends and devices ---------------------------------------------------------------------------------------


def test_only_a_mutual_subscription_makes_a_friend() -> None:
    roster = FriendRoster(ME)
    assert roster.push(RosterItem(BOB, "none", asking=True), now=1.0) == []
    assert roster.push(RosterItem(BOB, "to"), now=2.0) == []
    assert roster.push(RosterItem(BOB, "from"), now=3.0) == []
    assert roster.friends() == []
    assert roster.push(both(), now=4.0) == [FriendAdded(BOB)]
    assert roster.friends() == [BOB]


def test_a_friends_marked_resource_is_a_device_and_a_plain_one_is_not() -> None:
    roster = friends_with(BOB)
    assert roster.presence(online(BOB, "pidgin", node=False), now=5.0) == []
    assert roster.presence(online(BOB, "laptop"), now=6.0) == [DeviceOnline(device("laptop", 6.0))]
    assert roster.devices() == [device("laptop", 6.0)]
    assert roster.online_resources(BOB) == ["laptop", "pidgin"]


def test_devices_are_ordered_most_recently_seen_first() -> None:
    roster = friends_with(BOB, CAROL)
    roster.presence(online(BOB, "laptop"), now=10.0)
    roster.presence(online(BOB, "phone"), now=20.0)
    roster.presence(online(CAROL, "desk"), now=20.0)
    assert [d.jid for d in roster.devices()] == [f"{BOB}/phone", f"{CAROL}/desk", f"{BOB}/laptop"]  # tie: by JID
    # A later presence (a status change) from the laptop is a sighting, not a new device.
    assert roster.presence(online(BOB, "laptop"), now=30.0) == []
    assert roster.devices(BOB) == [device("laptop", 10.0, 30.0), device("phone", 20.0)]


def test_a_device_seen_before_the_friendship_comes_online_when_it_becomes_mutual() -> None:
    roster = FriendRoster(ME)
    roster.push(RosterItem(BOB, "to"), now=1.0)  # we see their presence, they do not see ours yet
    assert roster.presence(online(BOB, "laptop"), now=2.0) == []
    assert roster.push(both(), now=3.0) == [FriendAdded(BOB), DeviceOnline(device("laptop", 2.0))]


def test_unavailable_takes_one_device_offline_and_from_the_bare_jid_all_of_them() -> None:
    roster = friends_with(BOB)
    roster.presence(online(BOB, "laptop"), now=1.0)
    roster.presence(online(BOB, "phone"), now=2.0)
    assert roster.presence(offline(BOB, "phone"), now=3.0) == [DeviceOffline(device("phone", 2.0))]
    roster.presence(online(BOB, "phone"), now=4.0)
    assert roster.presence(offline(BOB), now=5.0) == [
        DeviceOffline(device("laptop", 1.0)),
        DeviceOffline(device("phone", 4.0)),
    ]
    assert roster.devices() == [] and roster.online_resources(BOB) == [] and roster.friends() == [BOB]


def test_dropping_the_marker_takes_a_device_offline_and_adding_it_brings_it_back() -> None:
    roster = friends_with(BOB)
    roster.presence(online(BOB, "laptop"), now=1.0)
    assert roster.presence(online(BOB, "laptop", node=False), now=2.0) == [DeviceOffline(device("laptop", 1.0))]
    assert roster.online_resources(BOB) == ["laptop"]
    assert roster.presence(online(BOB, "laptop"), now=3.0) == [DeviceOnline(device("laptop", 3.0))]


def test_a_device_with_a_new_statement_leaves_and_comes_back_as_a_new_device() -> None:
    """A new key on the same resource is not the same device: the node must judge it anew (pinning)."""
    roster = friends_with(BOB)
    roster.presence(replace(online(BOB, "laptop"), statement=b"key one"), now=1.0)
    roster.presence(replace(online(BOB, "laptop"), statement=b"key one"), now=2.0)  # same: just seen again
    assert roster.presence(replace(online(BOB, "laptop"), statement=b"key two"), now=3.0) == [
        DeviceOffline(replace(device("laptop", 1.0, 2.0), statement=b"key one")),
        DeviceOnline(replace(device("laptop", 3.0), statement=b"key two")),
    ]


def test_parse_presence_passes_the_markers_statement_on() -> None:
    marker = node_marker(b"\x01" * 96)
    stanza = ET.Element("{jabber:client}presence", {"from": "bob@example.test/laptop"})
    stanza.append(marker)
    assert parse_presence(stanza) == PresenceNote(BOB, "laptop", "available", node=True, statement=b"\x01" * 96)
    marker.set("statement", "not base64!")
    assert parse_presence(stanza) == PresenceNote(BOB, "laptop", "available", node=True, statement=b"")


def test_removal_reports_the_devices_offline_before_the_friend() -> None:
    roster = friends_with(BOB)
    roster.presence(online(BOB, "laptop"), now=1.0)
    roster.presence(online(BOB, "phone"), now=2.0)
    assert roster.push(RosterItem(BOB, "remove"), now=3.0) == [
        DeviceOffline(device("laptop", 1.0)),
        DeviceOffline(device("phone", 2.0)),
        FriendRemoved(BOB),
    ]
    assert roster.friends() == [] and roster.online_resources(BOB) == [] and roster.entries() == []


def test_a_cancelled_subscription_ends_the_friendship_but_keeps_the_contact() -> None:
    roster = friends_with(BOB)
    roster.presence(online(BOB, "laptop"), now=1.0)
    # They cancelled our subscription to them (RFC 6121 section 3.2): "both" -> "from".
    assert roster.push(RosterItem(BOB, "from"), now=2.0) == [DeviceOffline(device("laptop", 1.0)), FriendRemoved(BOB)]
    assert roster.entries() == [FriendEntry(BOB, "from", asking=False, requested=False)]


def test_presence_from_strangers_and_from_our_own_account_is_ignored() -> None:
    roster = friends_with(BOB)
    assert roster.presence(online(CAROL, "laptop"), now=1.0) == []
    assert roster.presence(online(ME, "other-device"), now=1.0) == []
    assert roster.online_resources(CAROL) == [] and roster.online_resources(ME) == []
    assert roster.push(RosterItem(ME, "both"), now=2.0) == [] and roster.friends() == [BOB]


# --- requests --------------------------------------------------------------------------------------------------


def subscribe(jid: str) -> PresenceNote:
    return PresenceNote(jid, "", "subscribe")


def test_a_strangers_request_is_listed_once_and_not_expected() -> None:
    roster = FriendRoster(ME)
    assert roster.presence(subscribe(CAROL), now=1.0) == [FriendRequest(CAROL, expected=False)]
    assert roster.presence(subscribe(CAROL), now=2.0) == []  # redelivered or repeated: still one request
    assert roster.presence(subscribe(BOB), now=3.0) == [FriendRequest(BOB, expected=False)]
    assert roster.requests() == [CAROL, BOB]  # oldest first
    assert roster.friends() == []
    assert roster.entries() == [
        FriendEntry(BOB, "none", asking=False, requested=True),
        FriendEntry(CAROL, "none", asking=False, requested=True),
    ]


def test_a_request_that_answers_ours_is_expected() -> None:
    roster = FriendRoster(ME)
    roster.push(RosterItem(BOB, "none", asking=True), now=1.0)  # friend_add: our request waits
    roster.push(RosterItem(CAROL, "to"), now=1.0)  # friend_add, and they approved it already
    assert roster.presence(subscribe(BOB), now=2.0) == [FriendRequest(BOB, expected=True)]
    assert roster.presence(subscribe(CAROL), now=2.0) == [FriendRequest(CAROL, expected=True)]


def test_a_request_is_cleared_by_approval_on_any_resource_withdrawal_or_our_answer() -> None:
    roster = FriendRoster(ME)
    for jid in (BOB, CAROL, "dave@example.test"):
        roster.presence(subscribe(jid), now=1.0)
    roster.push(RosterItem(BOB, "from"), now=2.0)  # approved, here or from Pidgin: the push says so
    roster.presence(PresenceNote(CAROL, "", "unsubscribe"), now=2.0)  # carol changed her mind
    roster.answered("dave@example.test", now=2.0)  # we declined from this session
    assert roster.requests() == []


def test_a_request_from_someone_who_already_sees_us_is_ignored() -> None:
    roster = friends_with(BOB)
    assert roster.presence(subscribe(BOB), now=1.0) == []
    assert roster.requests() == []


# --- sessions --------------------------------------------------------------------------------------------------


def test_a_lost_session_takes_every_device_offline_and_the_next_load_reports_only_changes() -> None:
    roster = friends_with(BOB, CAROL)
    roster.presence(online(BOB, "laptop"), now=1.0)
    roster.presence(subscribe("dave@example.test"), now=1.0)
    assert roster.session_lost(now=2.0) == [DeviceOffline(device("laptop", 1.0))]
    assert roster.requests() == [] and roster.friends() == [BOB, CAROL]
    # Next session: carol was removed meanwhile (from Pidgin), bob is still a friend.
    assert roster.load([both(BOB)], now=3.0) == [FriendRemoved(CAROL)]
    assert roster.presence(online(BOB, "laptop"), now=4.0) == [DeviceOnline(device("laptop", 4.0))]


def test_entries_show_subscription_and_pending_flags() -> None:
    roster = FriendRoster(ME)
    roster.load([both(BOB), RosterItem(CAROL, "none", asking=True, name="Carol")], now=0.0)
    roster.presence(subscribe("dave@example.test"), now=1.0)
    assert roster.entries() == [
        FriendEntry(BOB, "both", asking=False, requested=False),
        FriendEntry(CAROL, "none", asking=True, requested=False, name="Carol"),
        FriendEntry("dave@example.test", "none", asking=False, requested=True),
    ]
    assert [e.jid for e in roster.entries() if e.friend] == [BOB]


# --- against a real Prosody ------------------------------------------------------------------------------------

PASSWORD = "friend-password"
WAIT = 10.0  # bound on each wait for the server's stanzas to arrive (a loaded 2-core box)
_accounts = itertools.count(1)


@dataclass
class Session:
    """One logged-in resource: a node (FriendWatch with the marker), or a chat client (no watch)."""

    client: ClientXMPP
    watch: FriendWatch | None
    events: list[FriendEvent] = field(default_factory=list)

    @property
    def jid(self) -> str:
        return str(self.client.boundjid.full)

    @property
    def roster(self) -> FriendRoster:
        assert self.watch is not None
        return self.watch.roster

    async def close(self) -> None:
        client = self.client
        client.cancel_connection_attempt()
        if client.transport is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(wait=1.0), 2.0)
        client.abort()
        sender = getattr(client, "_run_out_filters", None)
        if sender is not None and not sender.done():
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender


class Server:
    """The Prosody plus sessions to close at the end of each test."""

    def __init__(self, prosody: ProsodyServer) -> None:
        self.prosody = prosody
        self.sessions: list[Session] = []

    def account(self, name: str) -> str:
        """A fresh account per test: rosters outlive sessions."""
        return self.prosody.register(f"{name}{next(_accounts)}", PASSWORD)

    async def login(self, account: str, resource: str, *, node: bool | None = True) -> Session:
        """A resource of `account`: a node (`node` True), a watching session without the marker (False), or a
        bare chat client that only announces a plain presence (None, like Pidgin)."""
        client = ClientXMPP(f"{account}/{resource}", PASSWORD)
        client.enable_direct_tls = False
        client.enable_plaintext = False
        client.ca_certs = self.prosody.ca_file
        session = Session(client, None)
        if node is None:
            hold_subscription_requests(client)  # a chat client asks its user too
        else:
            session.watch = FriendWatch(client, node=node, on_event=session.events.append)
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_session_start(_event: object) -> None:
            if not started.done():
                started.set_result(None)

        client.add_event_handler("session_start", on_session_start)
        client.connect(self.prosody.host, self.prosody.port)
        self.sessions.append(session)
        await asyncio.wait_for(started, WAIT)
        if session.watch is not None:
            await session.watch.start(WAIT)
        else:
            client.send_presence()
            await settle(session)
        return session

    async def close_all(self) -> None:
        for session in self.sessions:
            await session.close()
        self.sessions.clear()


@pytest.fixture(scope="module")
def prosody(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProsodyServer]:
    server = ProsodyServer(tmp_path_factory.mktemp("prosody"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def run(prosody: ProsodyServer, body: Callable[[Server], Awaitable[None]]) -> None:
    async def main() -> None:
        server = Server(prosody)
        try:
            await asyncio.wait_for(body(server), 90)
        finally:
            await server.close_all()

    asyncio.run(main())


async def until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(0.05)


async def settle(*sessions: Session) -> None:
    """Wait until the server has handled everything each session sent, and delivered what that caused to
    sessions on the same server: Prosody handles one session's stanzas in order and routes local stanzas at
    once, so a ping's answer comes after all of it."""
    for session in sessions:
        iq = session.client.make_iq_get(ito=JID(session.client.boundjid.domain))
        iq.append(ET.Element("{urn:xmpp:ping}ping"))
        await iq.send(timeout=WAIT)  # type: ignore[no-untyped-call]


async def befriend(a: Session, b: Session) -> None:
    """`a` asks, `b` accepts, and both watches see the other as a friend."""
    a_bare, b_bare = a.client.boundjid.bare, b.client.boundjid.bare
    await friend_add(a.client, b_bare, timeout=WAIT)
    await until(lambda: a_bare in b.roster.requests(), f"{b_bare} sees the request of {a_bare}")
    await friend_accept(b.client, a_bare, timeout=WAIT)
    await until(lambda: b.roster.friends() == [a_bare], f"{b_bare} is a friend of {a_bare}")
    await until(lambda: a.roster.friends() == [b_bare], f"{a_bare} is a friend of {b_bare}")


async def server_roster(session: Session) -> list[RosterItem]:
    """The account's roster as the server keeps it (a roster get without a version, RFC 6121 section 2.2)."""
    iq = session.client.make_iq_get(queryxmlns="jabber:iq:roster")
    result: Any = await iq.send(timeout=WAIT)  # type: ignore[no-untyped-call]
    return parse_roster(result.xml.find("{jabber:iq:roster}query"))


def entry(entries: list[FriendEntry], jid: str) -> FriendEntry:
    found = [e for e in entries if e.jid == jid]
    assert len(found) == 1, entries
    return found[0]


def needs_prosody(test: Callable[..., None]) -> Callable[..., None]:
    """Mark a test as needing the real server (tests/support/prosody.py): integration, root, prosody."""
    for mark in NEEDS_PROSODY:
        test = mark(test)
    return test


@needs_prosody
def test_add_then_accept_makes_both_sides_friends_and_shows_their_devices(prosody: ProsodyServer) -> None:
    async def body(server: Server) -> None:
        alice_jid, bob_jid = server.account("alice"), server.account("bob")
        alice = await server.login(alice_jid, "node")
        bob = await server.login(bob_jid, "node")
        await friend_add(alice.client, bob_jid, timeout=WAIT)
        await until(lambda: FriendRequest(alice_jid, expected=False) in bob.events, "bob is asked")
        await settle(bob, alice)
        # Nobody accepted for bob: alice still waits, and bob lists the request.
        assert entry(await friend_list(alice.client), bob_jid) == FriendEntry(bob_jid, "none", True, False)
        assert entry(await friend_list(bob.client), alice_jid) == FriendEntry(alice_jid, "none", False, True)
        assert alice.roster.friends() == [] and bob.roster.friends() == []

        await friend_accept(bob.client, alice_jid, timeout=WAIT)
        await until(lambda: alice.roster.devices() != [] and bob.roster.devices() != [], "devices seen")
        assert [d.jid for d in alice.roster.devices()] == [f"{bob_jid}/node"]
        assert [d.jid for d in bob.roster.devices()] == [f"{alice_jid}/node"]
        assert FriendAdded(bob_jid) in alice.events and FriendAdded(alice_jid) in bob.events
        for session, other in ((alice, bob_jid), (bob, alice_jid)):
            assert entry(await friend_list(session.client), other) == FriendEntry(other, "both", False, False)

    run(prosody, body)


@needs_prosody
def test_a_second_marked_resource_is_a_second_device_and_a_chat_client_is_not(prosody: ProsodyServer) -> None:
    async def body(server: Server) -> None:
        alice_jid, bob_jid = server.account("alice"), server.account("bob")
        alice = await server.login(alice_jid, "node")
        bob = await server.login(bob_jid, "laptop")
        await befriend(alice, bob)
        await until(lambda: len(alice.roster.devices()) == 1, "bob's laptop seen")
        pidgin = await server.login(bob_jid, "pidgin", node=None)
        phone = await server.login(bob_jid, "phone")
        await until(lambda: len(alice.roster.devices()) == 2, "bob's phone seen")
        await settle(pidgin, phone)
        # The phone came last: most recently seen first. Pidgin is online but is not a device.
        assert [d.resource for d in alice.roster.devices(bob_jid)] == ["phone", "laptop"]
        assert alice.roster.online_resources(bob_jid) == ["laptop", "phone", "pidgin"]

        await phone.close()
        await until(lambda: any(isinstance(e, DeviceOffline) for e in alice.events), "the phone's offline event")
        offline = [e.device.jid for e in alice.events if isinstance(e, DeviceOffline)]
        assert offline == [f"{bob_jid}/phone"]
        assert [d.resource for d in alice.roster.devices()] == ["laptop"] and alice.roster.friends() == [bob_jid]

    run(prosody, body)


@needs_prosody
def test_removing_a_friend_is_seen_on_the_other_side(prosody: ProsodyServer) -> None:
    async def body(server: Server) -> None:
        alice_jid, bob_jid = server.account("alice"), server.account("bob")
        alice = await server.login(alice_jid, "node")
        bob = await server.login(bob_jid, "node")
        await befriend(alice, bob)
        await until(lambda: len(bob.roster.devices()) == 1, "bob sees alice's device")
        bob.events.clear()

        await friend_remove(alice.client, bob_jid, timeout=WAIT)
        await until(lambda: FriendRemoved(alice_jid) in bob.events, "bob sees alice go")
        assert [type(e) for e in bob.events] == [DeviceOffline, FriendRemoved]
        assert bob.roster.friends() == [] and bob.roster.devices() == []
        assert not entry(await friend_list(bob.client), alice_jid).friend  # bob keeps the contact, not the friend
        assert alice.roster.friends() == [] and FriendRemoved(bob_jid) in alice.events
        assert bob_jid not in [e.jid for e in await friend_list(alice.client)]

    run(prosody, body)


@needs_prosody
def test_a_strangers_request_waits_and_a_chat_client_on_the_account_can_accept_it(prosody: ProsodyServer) -> None:
    async def body(server: Server) -> None:
        alice_jid, carol_jid = server.account("alice"), server.account("carol")
        alice = await server.login(alice_jid, "node")
        carol = await server.login(carol_jid, "pidgin", node=None)
        carol.client.send_presence_subscription(pto=alice_jid)
        await until(lambda: alice.roster.requests() == [carol_jid], "alice sees carol's request")
        await settle(alice, carol)
        # Not accepted automatically: carol still waits and sees nothing of alice.
        assert alice.events == [FriendRequest(carol_jid, expected=False)]
        assert entry(await friend_list(alice.client), carol_jid).requested
        assert await server_roster(carol) == [RosterItem(alice_jid, "none", asking=True)]

        # Alice accepts from Pidgin on her account; carol (also Pidgin) accepts alice's request back.
        alice_pidgin = await server.login(alice_jid, "pidgin", node=None)
        alice_pidgin.client.send_presence_subscription(pto=carol_jid, ptype="subscribed")
        alice_pidgin.client.send_presence_subscription(pto=carol_jid, ptype="subscribe")
        await settle(alice_pidgin)
        carol.client.send_presence_subscription(pto=alice_jid, ptype="subscribed")
        await until(lambda: alice.roster.friends() == [carol_jid], "alice's node sees carol as a friend")
        assert alice.roster.requests() == [] and alice.roster.devices() == []  # carol runs no node

        # Alice removes carol from Pidgin: the roster push tells her node too.
        await alice_pidgin.client.del_roster_item(carol_jid)  # type: ignore[no-untyped-call]
        await until(lambda: FriendRemoved(carol_jid) in alice.events, "alice's node sees carol removed")
        assert alice.roster.entries() == []

    run(prosody, body)


@needs_prosody
def test_friend_remove_declines_a_pending_request(prosody: ProsodyServer) -> None:
    async def body(server: Server) -> None:
        alice_jid, dave_jid = server.account("alice"), server.account("dave")
        alice = await server.login(alice_jid, "node")
        dave = await server.login(dave_jid, "node")
        await friend_add(dave.client, alice_jid, timeout=WAIT)
        await until(lambda: alice.roster.requests() == [dave_jid], "alice sees dave's request")
        await friend_remove(alice.client, dave_jid, timeout=WAIT)
        assert alice.roster.requests() == []
        await until(lambda: not dave.roster.entries()[0].asking, "dave's request is answered")
        assert dave.roster.entries() == [FriendEntry(alice_jid, "none", False, False)]

    run(prosody, body)


@needs_prosody
def test_without_server_preapproval_the_askers_node_approves_the_answer(prosody: ProsodyServer) -> None:
    async def body(server: Server) -> None:
        alice_jid, bob_jid = server.account("alice"), server.account("bob")
        alice = await server.login(alice_jid, "node")
        bob = await server.login(bob_jid, "node")
        alice.client.features.discard(PREAPPROVAL_FEATURE)  # as on a server that does not offer it
        await befriend(alice, bob)
        assert FriendRequest(bob_jid, expected=True) in alice.events  # bob's half, approved by alice's node

    run(prosody, body)


@needs_prosody
def test_a_request_sent_while_offline_is_delivered_at_login(prosody: ProsodyServer) -> None:
    async def body(server: Server) -> None:
        alice_jid, bob_jid = server.account("alice"), server.account("bob")
        alice = await server.login(alice_jid, "node")
        await friend_add(alice.client, bob_jid, timeout=WAIT)
        bob = await server.login(bob_jid, "node")
        assert bob.roster.requests() == [alice_jid]  # start() returns after the server redelivered it
        await friend_accept(bob.client, alice_jid, timeout=WAIT)
        await until(lambda: len(alice.roster.devices()) == 1 and len(bob.roster.devices()) == 1, "friends")

    run(prosody, body)


@needs_prosody
def test_bad_input_and_a_missing_session_are_one_line_errors(prosody: ProsodyServer) -> None:
    async def body(server: Server) -> None:
        alice_jid = server.account("alice")
        alice = await server.login(alice_jid, "node")
        cases = {
            "not-a-jid": "is not user@domain",
            "bob@example.test/laptop": "has a resource",
            alice_jid: "your own account",
            "a@b@c": "not a valid JID",
        }
        for jid, expected in cases.items():
            with pytest.raises(BootstrapError) as info:
                await friend_add(alice.client, jid, timeout=WAIT)
            assert expected in str(info.value) and "\n" not in str(info.value)
        with pytest.raises(BootstrapError, match="not in the roster of") as removed:
            await friend_remove(alice.client, "nobody@example.test", timeout=WAIT)
        assert "nobody@example.test" in str(removed.value)
        idle = ClientXMPP("idle@example.test", PASSWORD)
        with pytest.raises(BootstrapError, match="not logged in") as idle_info:
            await friend_add(idle, "bob@example.test", timeout=WAIT)
        assert idle_info.value.transient

    run(prosody, body)


@needs_prosody
def test_friend_add_keeps_the_name_and_groups_a_chat_client_gave_the_contact(prosody: ProsodyServer) -> None:
    async def body(server: Server) -> None:
        alice_jid, bob_jid = server.account("alice"), server.account("bob")
        alice = await server.login(alice_jid, "node")
        added = alice.client.update_roster(JID(bob_jid), name="Bob", groups=["Work"])  # as Pidgin would
        assert added is not None
        await added

        async def stored() -> tuple[str | None, str | None, list[str | None]]:
            iq = alice.client.make_iq_get(queryxmlns="jabber:iq:roster")
            result: Any = await iq.send(timeout=WAIT)  # type: ignore[no-untyped-call]
            item = result.xml.find("{jabber:iq:roster}query/{jabber:iq:roster}item")
            return item.get("name"), item.get("ask"), [g.text for g in item.iterfind("{jabber:iq:roster}group")]

        await friend_add(alice.client, bob_jid, timeout=WAIT)
        assert await stored() == ("Bob", "subscribe", ["Work"])
        await friend_add(alice.client, bob_jid, name="Bobby", timeout=WAIT)
        assert await stored() == ("Bobby", "subscribe", ["Work"])
        assert entry(alice.roster.entries(), bob_jid) == FriendEntry(bob_jid, "none", True, False, "Bobby")

    run(prosody, body)
