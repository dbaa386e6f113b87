"""In-memory twin of the XMPP bootstrap: a shared room object plays the server, for big groups in one process.

It follows the same rules as XmppBootstrap (the same codec and anchor decisions from protocol.py, the same
error messages) and counts the stanzas a MUC service would send: a joiner gets one presence per occupant plus
its own, every occupant gets the joiner's presence, a private message is one stanza each way. Like a
semi-anonymous room it shows occupants' real JIDs only to its owners (and to each account its own).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from xmpp_bootstrap.bootstrap import JOIN_REFUSALS, new_stats
from xmpp_bootstrap.protocol import (
    REMOVAL_REASONS,
    REVOKED_STATUS,
    HelloHandler,
    Occupant,
    answer_for,
    decode_hello,
    encode_hello,
)
from xmpp_bootstrap.session import BootstrapError

log = logging.getLogger(__name__)


def _bare(jid: str) -> str:
    return jid.split("/", 1)[0].lower()


class MemoryRoom:
    """A members-only room: its member list and owners (bare JIDs) and the occupants currently in it, by nick.

    Owners are members too; they see every occupant's real JID and may list the affiliations."""

    def __init__(self, name: str, members: Iterable[str], *, owners: Iterable[str] = ()) -> None:
        self.name = name
        self.owners = {_bare(o) for o in owners}
        self.members = {_bare(m) for m in members} | self.owners
        self.occupants: dict[str, MemoryBootstrap] = {}
        self.exists = True
        self.server_up = True  # False: a login fails as with the server unreachable (sessions already in stay)

    def add_member(self, jid: str) -> None:
        """Make `jid` a member (an owner stays an owner)."""
        self.members.add(_bare(jid))

    def remove_member(self, jid: str) -> None:
        """Take `jid` out of the group (affiliation none): its occupants are thrown out of the room with status
        321, as a members-only room does, and the others see them leave."""
        bare = _bare(jid)
        self.members.discard(bare)
        self.owners.discard(bare)
        for nick, occupant in list(self.occupants.items()):
            if _bare(occupant.jid) == bare:
                del self.occupants[nick]
                occupant._on_removed(REMOVAL_REASONS[REVOKED_STATUS])
                self.broadcast_presence(nick)

    def affiliations(self) -> dict[str, str]:
        """Bare JID -> "owner" or "member", sorted by JID (what an owner's muc#admin queries return)."""
        return {jid: "owner" if jid in self.owners else "member" for jid in sorted(self.members)}

    def destroy(self) -> None:
        """Remove the room: occupants are thrown out, later joins fail with "room does not exist"."""
        self.exists = False
        for occupant in list(self.occupants.values()):
            occupant._on_removed()
        self.occupants.clear()

    def anchors(self) -> list[str]:
        return sorted(nick for nick, occ in self.occupants.items() if occ.is_anchor)

    def view(self, viewer: MemoryBootstrap | None = None) -> dict[str, Occupant]:
        """The room as `viewer` sees it. Real JIDs as Prosody shows them in a semi-anonymous room: an owner sees
        everyone's, anyone else only those of occupants logged in as its own account (no viewer: none)."""
        mine = _bare(viewer.jid) if viewer is not None else None
        sees_all = mine in self.owners
        view = {}
        for nick, occ in self.occupants.items():
            jid = _bare(occ.jid)
            view[nick] = Occupant(occ.is_anchor, occ.overlay, occ.issuer, jid if sees_all or jid == mine else None)
        return view

    def broadcast_presence(self, nick: str) -> None:
        """Every occupant but `nick` receives `nick`'s presence (available, anchor change or unavailable)."""
        for other, occupant in list(self.occupants.items()):
            if other != nick:
                occupant._count_presence()
        for other, occupant in list(self.occupants.items()):
            if other != nick:
                occupant._changed()

    def deliver(self, sender: str, recipient: str, text: str | None, *, kind: str = "") -> bool:
        """A private message with <hello/> text (kind "answer", "signal" or a request) from `sender` to
        occupant `recipient`; False if there is no such occupant."""
        target = self.occupants.get(recipient)
        if target is None:
            return False
        if sender in self.occupants:
            self.occupants[sender].stats["stanzas_out"] += 1
        target._on_hello_text(sender, text, kind)
        return True


class MemoryBootstrap:
    """Bootstrap through a MemoryRoom; same behaviour and errors as XmppBootstrap, no server."""

    def __init__(self, room: MemoryRoom, jid: str, nick: str, *, password_ok: bool = True) -> None:
        self.room = room
        self.jid = jid
        self.nick = nick
        self.password_ok = password_ok
        self.on_hello: HelloHandler | None = None
        self.on_signal: Callable[[bytes, str], None] | None = None
        self.on_change: Callable[[], None] | None = None
        self.stats = new_stats()
        self.overlay: int | None = None
        self.issuer = False
        """Whether our presence carries the issuer mark; kept across stop() and start()."""
        self.removed_from_room: str | None = None
        """Why the room threw us out (e.g. "membership revoked"), or None; cleared by a successful join."""
        self.logged_in = False
        self._in_room = False
        self._pending: dict[str, bytes | None] = {}
        self._expecting: set[str] = set()

    @property
    def in_room(self) -> bool:
        return self._in_room

    @property
    def is_anchor(self) -> bool:
        return self._in_room and self.overlay is not None

    @property
    def occupants(self) -> dict[str, Occupant]:
        return self.room.view(self) if self._in_room else {}

    @property
    def issuers(self) -> list[str]:
        if not self._in_room:
            return []
        return sorted(nick for nick, occ in self.room.occupants.items() if occ.issuer and nick != self.nick)

    # -- lifecycle --

    async def start(self) -> None:
        if not self.logged_in:
            jid = _bare(self.jid)
            if not self.room.server_up:
                raise BootstrapError("cannot reach the XMPP server: connection refused", unreachable=True)
            if not self.password_ok:
                raise BootstrapError(f"login as {jid} was refused: check the password (or the account name)")
            if not self.room.exists:
                raise BootstrapError(JOIN_REFUSALS["item-not-found"].format(room=self.room.name))
            self.logged_in = True
            self.stats["logins"] += 1
        self._join()

    def set_anchor(self, overlay: int | None) -> None:
        if not self._in_room or overlay == self.overlay:
            return
        self.stats["stanzas_out"] += 1
        self.overlay = overlay
        self._count_presence()
        self.room.broadcast_presence(self.nick)

    def set_issuer(self, on: bool) -> None:
        if on == self.issuer:
            return
        self.issuer = on
        if self._in_room:
            self.stats["stanzas_out"] += 1
            self._count_presence()
            self.room.broadcast_presence(self.nick)

    async def fetch_affiliations(self, timeout: float = 10.0) -> dict[str, str]:
        jid = _bare(self.jid)
        if not self.logged_in:
            raise BootstrapError(
                f"not logged in, so the members of room {self.room.name} cannot be listed: call start() first",
                transient=True,
            )
        # One muc#admin query per list as the XMPP side asks (members, admins, owners); a member's first is refused.
        if not self.room.exists:
            self.stats["stanzas_out"] += 1
            self.stats["stanzas_in"] += 1
            raise BootstrapError(f"no such room {self.room.name}: check the room name, or create the group first")
        if jid not in self.room.owners:
            self.stats["stanzas_out"] += 1
            self.stats["stanzas_in"] += 1
            raise BootstrapError(
                f"you ({jid}) are not an owner/admin of {self.room.name}: listing its members needs one"
            )
        self.stats["stanzas_out"] += 3
        self.stats["stanzas_in"] += 3
        return self.room.affiliations()

    async def stop(self) -> None:
        self._leave()
        self.logged_in = False

    # -- hello exchange --

    async def exchange(self, hellos: dict[str, bytes], timeout: float = 5.0) -> dict[str, bytes]:
        if not self._in_room:
            raise BootstrapError(f"not in room {self.room.name}: call start() before exchange()")
        targets = [nick for nick in hellos if nick != self.nick]
        self._expecting = set(targets)
        self._pending = {}
        for nick in targets:
            self.stats["hellos_out"] += 1
            self.room.deliver(self.nick, nick, encode_hello(hellos[nick]))
        await asyncio.sleep(0)
        self._expecting = set()
        return {nick: a for nick in targets if (a := self._pending.get(nick)) is not None}

    def send_signal(self, nick: str, payload: bytes) -> bool:
        if not self._in_room or nick not in self.room.occupants:
            return False
        self.stats["hellos_out"] += 1
        self.stats["signals_out"] += 1
        return self.room.deliver(self.nick, nick, encode_hello(payload), kind="signal")

    def _on_hello_text(self, sender: str, text: str | None, kind: str) -> None:
        self.stats["stanzas_in"] += 1
        payload = decode_hello(text)
        if payload is None:
            self.stats["hellos_dropped"] += 1
            return
        self.stats["hellos_in"] += 1
        if kind == "answer":
            if sender in self._expecting and sender not in self._pending:
                self.stats["answers_in"] += 1
                self._pending[sender] = payload
            else:
                self.stats["answers_late"] += 1
            return
        if kind == "signal":
            self.stats["signals_in"] += 1
            if self.on_signal is not None:
                self.on_signal(payload, sender)
            return
        reply = answer_for(self.on_hello, payload, sender)
        if reply is not None:
            self.stats["hellos_out"] += 1
            self.room.deliver(self.nick, sender, encode_hello(reply), kind="answer")

    # -- room membership --

    def _join(self) -> None:
        if self._in_room:
            return
        jid = _bare(self.jid)
        if not self.room.exists:
            raise BootstrapError(JOIN_REFUSALS["item-not-found"].format(room=self.room.name))
        refusal = None
        if jid not in self.room.members:
            refusal = "registration-required"
        elif self.nick in self.room.occupants:
            refusal = "conflict"
        if refusal is not None:
            self.logged_in = False
            raise BootstrapError(JOIN_REFUSALS[refusal].format(jid=jid, room=self.room.name, nick=self.nick))
        self.stats["stanzas_out"] += 1
        # The service sends us every current occupant's presence, then our own (XEP-0045 section 7.2.3).
        for _ in self.room.occupants:
            self._count_presence()
        self._count_presence()
        self.overlay = None
        self._in_room = True
        self.removed_from_room = None
        self.room.occupants[self.nick] = self
        self.room.broadcast_presence(self.nick)
        self._changed()

    def _leave(self) -> None:
        if not self._in_room:
            return
        self.stats["stanzas_out"] += 1
        self._count_presence()
        self._in_room = False
        self.overlay = None
        del self.room.occupants[self.nick]
        self.room.broadcast_presence(self.nick)
        self._changed()

    def _on_removed(self, reason: str | None = None) -> None:
        """The room threw us out: destroyed (no reason) or our membership revoked; we stay logged in."""
        self._count_presence()
        self._in_room = False
        self.overlay = None
        if reason is not None:
            self.removed_from_room = reason
            log.warning("removed from room %s: %s", self.room.name, reason)
        self._changed()

    def _count_presence(self) -> None:
        self.stats["stanzas_in"] += 1
        self.stats["presences_in"] += 1

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()
