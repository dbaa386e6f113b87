"""What both bootstraps share: the interface the node uses (XmppBootstrap in xmpp_bootstrap/client.py,
MemoryBootstrap in xmpp_bootstrap/memory.py), their counters, and the words for a refused join.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from xmpp_bootstrap.protocol import HelloHandler, Occupant


class Bootstrap(Protocol):
    """What the node layer uses; XmppBootstrap and MemoryBootstrap both follow it.

    - `start()`: log in (if not logged in) and join the room (if not in it) without the anchor mark. Raises
      BootstrapError with one line; leaves nothing connected when it does.
    - `occupants`: nick -> Occupant for everyone in the room as we last saw it, ourselves included.
    - `exchange(hellos, timeout)`: send each nick its hello, return the answers that came within `timeout`.
    - `send_signal(nick, payload)`: a one-way message to an occupant (False when it is not there).
    - `set_anchor(overlay)`: mark our presence as an anchor of `overlay`, or unmark it with None.
    - `set_issuer(on)`: mark our presence as a certificate issuer's, or unmark it; unlike the anchor mark it is
      kept across stop() and start(), so every join carries it.
    - `issuers`: sorted nicks of the other occupants whose presence carries the issuer mark.
    - `fetch_affiliations(timeout)`: bare JID -> "owner"/"admin"/"member" of the room; BootstrapError unless
      we are an owner or admin of it.
    - `removed_from_room`: why the room threw us out (our membership revoked, a kick, a ban), or None; cleared
      by a successful join. Such a removal leaves us logged in but out of the room (`in_room` False).
    - `stop()`: leave the room and log out; idempotent.
    Callbacks: `on_hello(payload, nick)` answers a request; `on_signal(payload, nick)` takes a one-way
    message; `on_change()` is called after the room view or the session changed.
    """

    nick: str
    on_hello: HelloHandler | None
    on_signal: Callable[[bytes, str], None] | None
    on_change: Callable[[], None] | None
    occupants: dict[str, Occupant]
    stats: dict[str, int]
    removed_from_room: str | None

    @property
    def in_room(self) -> bool: ...
    @property
    def is_anchor(self) -> bool: ...
    @property
    def issuers(self) -> list[str]: ...
    async def start(self) -> None: ...
    async def exchange(self, hellos: dict[str, bytes], timeout: float = 5.0) -> dict[str, bytes]: ...
    def send_signal(self, nick: str, payload: bytes) -> bool: ...
    def set_anchor(self, overlay: int | None) -> None: ...
    def set_issuer(self, on: bool) -> None: ...
    async def fetch_affiliations(self, timeout: float = 10.0) -> dict[str, str]: ...
    async def stop(self) -> None: ...


def new_stats() -> dict[str, int]:
    """Counters both implementations keep; tests and `ipop-overlay status` read them."""
    keys = (
        "stanzas_in",
        "stanzas_out",
        "presences_in",
        "hellos_in",
        "hellos_out",
        "hellos_dropped",
        "answers_in",
        "answers_late",
        "signals_in",
        "signals_out",
        "logins",
        "sessions_lost",
    )
    return dict.fromkeys(keys, 0)


# Why a server refuses a join, as XEP-0045 section 7.2 defines the conditions, with what to do. `forbidden` is
# a ban (outcast) on Prosody 0.12 and ejabberd 23.01, but ejabberd also answers it when the room is gone and the
# account may not create rooms: the server's own text ({said}) tells the two apart.
JOIN_REFUSALS = {
    "registration-required": "{jid} is not a member of room {room}: ask the room owner to add it as a member",
    "forbidden": "room {room} refused {jid} (forbidden{said}): a ban, or a room that no longer exists; ask its owner",
    "conflict": "nick {nick} is already in use in room {room}: is this node running twice?",
    "not-authorized": "room {room} needs a room password, which groups do not use: check the room config",
    "service-unavailable": "room {room} is full: raise its occupant limit",
    # ejabberd 23.01's answer to a full room ("Too many users in this conference") and to an account in too many
    # rooms ("You have joined too many conferences"): XEP-0045 section 7.2.10 names service-unavailable instead.
    "resource-constraint": "room {room} refused {jid} at a server limit (resource-constraint{said}): "
    "raise the room's occupant cap or the server's limits",
    "not-allowed": "room {room} does not exist and {jid} may not create it: check the room name",
    "item-not-found": "room {room} does not exist: check the room name",
}

ROOM_FULL = frozenset({"service-unavailable", "resource-constraint"})
