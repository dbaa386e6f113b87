"""`ipop-overlay friend`: a SocialVPN node's friends, as its own XMPP account, without an XMPP client.

- `friend add|accept|remove JID --config FILE`: log in with the config's `[xmpp]` account (another resource than
  the node's, so the running node keeps its session) and change the roster (xmpp_bootstrap/friends.py). The
  running node sees the change as a roster push, as it would one made in Pidgin.
- `friend list --config FILE`: the roster: friends, pending requests both ways.
- `friend forget JID/RESOURCE --config FILE`: ask the running node (control socket) to drop the key it pinned
  for a friend device, after that device's owner confirmed the new key it now presents.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from overlay.config import load_config
from overlay.control import ControlError, stream


class FriendCommandError(Exception):
    """One line for the person who ran the command."""


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    f = sub.add_parser("friend", help="a SocialVPN node's friends (friend add|accept|remove|list|forget)")
    fs = f.add_subparsers(dest="friend_command", required=True)
    for name, text, what in (
        ("add", "ask JID to be a friend (and approve its request)", "JID"),
        ("accept", "approve JID's request to be a friend, and ask back", "JID"),
        ("remove", "end the friendship with JID (or decline its request)", "JID"),
        ("list", "show friends and requests", None),
        ("forget", "drop the key pinned for a friend device (it presents a new one)", "DEVICE"),
    ):
        c = fs.add_parser(name, help=text)
        c.add_argument("--config", required=True, help="the SocialVPN node's config (its [xmpp] account)")
        if what is not None:
            c.add_argument("jid", metavar=what, help="user@domain" if what == "JID" else "user@domain/resource")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(Path(args.config))
    if cfg.social is None:
        raise FriendCommandError(f"{args.config} has no [social] section: friends are for a SocialVPN node")
    if args.friend_command == "forget":
        return _forget(cfg.control_socket, args.jid)
    # Imported here: slixmpp is most of a second of start-up that `status` and `friend forget` do not need.
    from slixmpp import JID

    from xmpp_bootstrap.friends import friend_accept, friend_add, friend_list, friend_remove
    from xmpp_bootstrap.session import BootstrapError, log_in, new_client

    account = JID(cfg.jid)
    # Our own resource: logging in with the node's would end the node's session (RFC 6120 §7.7.2.2).
    jid = f"{account.bare}/ipop-overlay-friend-{os.getpid()}"
    ca = str(cfg.ca_file) if cfg.ca_file else None

    async def session() -> int:
        client = new_client(jid, cfg.password, ca)
        await log_in(client, cfg.host or str(account.domain), cfg.port, ca, 10.0)
        try:
            if args.friend_command == "add":
                await friend_add(client, args.jid)
                print(f"asked {args.jid} to be a friend: the link comes up once they accept")
            elif args.friend_command == "accept":
                await friend_accept(client, args.jid)
                print(f"{args.jid} is a friend")
            elif args.friend_command == "remove":
                await friend_remove(client, args.jid)
                print(f"{args.jid} is no longer a friend")
            else:
                for entry in await friend_list(client):
                    state = "friend" if entry.friend else entry.subscription
                    extra = " (asked by us)" if entry.asking else ""
                    extra += " (asks to be a friend: 'friend accept')" if entry.requested else ""
                    print(f"{state:8} {entry.jid}{extra}")
        finally:
            client.disconnect(wait=1.0)
        return 0

    try:
        return asyncio.run(session())
    except BootstrapError as e:
        raise FriendCommandError(str(e)) from None


def _forget(control: Path, device: str) -> int:
    try:
        for line in stream(control, {"cmd": "forget", "device": device}):
            if "error" in line:
                raise FriendCommandError(str(line["error"]))
            if "result" in line:
                result = line["result"]
                said = "forgot the key pinned for" if result["forgotten"] else "no key was pinned for"
                print(f"{said} {device}: its current key is pinned when it next comes online")
    except ControlError as e:
        raise FriendCommandError(str(e)) from None
    return 0
