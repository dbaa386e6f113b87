"""`ipop-overlay group`: the group's key, and its member list as the room's owner, without an XMPP client.

- `group init --out DIR`: a new group signing key (DIR/group.key, mode 0600) and its public key (DIR/group.pub);
  prints the public key every member pins in `[group] public_key`.
- `group create|add|remove|list --config FILE [JID ...]`: log in with the `[xmpp]` account of a node config
  (the room's owner, or an admin for add/remove/list) and create the members-only room or edit its member list
  (xmpp_bootstrap/admin.py). The issuer notices a removal within its poll interval and revokes the member.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from overlay.config import load_config
from overlay.identity import KeyFileError
from overlay.trust.groupkey import GroupKey, format_public_key, write_public


class GroupCommandError(Exception):
    """One line for the person who ran the command."""


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    g = sub.add_parser("group", help="the group's key and member list (group init|create|add|remove|list)")
    gs = g.add_subparsers(dest="group_command", required=True)
    i = gs.add_parser("init", help="write a new group key (DIR/group.key, 0600) and DIR/group.pub")
    i.add_argument("--out", required=True, help="directory for group.key and group.pub (created if missing)")
    for name, text in (
        ("create", "create the members-only room (as its owner) with these members"),
        ("add", "add members to the room's member list"),
        ("remove", "remove members: the issuer revokes their certificates"),
        ("list", "show the room's owners, admins and members"),
    ):
        c = gs.add_parser(name, help=text)
        c.add_argument("--config", required=True, help="a node config whose [xmpp] account owns the room")
        if name != "list":
            c.add_argument("jids", nargs="*" if name == "create" else "+", metavar="JID", help="bare JIDs")


def run(args: argparse.Namespace) -> int:
    if args.group_command == "init":
        return _init(Path(args.out))
    from xmpp_bootstrap.admin import AdminSettings, group_add, group_create, group_list, group_remove
    from xmpp_bootstrap.session import BootstrapError

    cfg = load_config(Path(args.config))
    settings = AdminSettings(
        jid=cfg.jid, password=cfg.password, room=cfg.room, host=cfg.host, port=cfg.port, ca_file=cfg.ca_file
    )
    try:
        if args.group_command == "create":
            asyncio.run(group_create(settings, args.jids))
            print(f"created {cfg.room} with {len(args.jids)} member(s)")
        elif args.group_command == "add":
            asyncio.run(group_add(settings, args.jids))
            print(f"added {', '.join(args.jids)} to {cfg.room}")
        elif args.group_command == "remove":
            asyncio.run(group_remove(settings, args.jids))
            print(f"removed {', '.join(args.jids)} from {cfg.room}")
        else:
            for jid, affiliation in asyncio.run(group_list(settings)).items():
                print(f"{affiliation:8} {jid}")
    except BootstrapError as e:
        raise GroupCommandError(str(e)) from None
    return 0


def _init(out: Path) -> int:
    try:
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise GroupCommandError(f"cannot create {out}: {e.strerror}") from None
    key = GroupKey.generate()
    try:
        key.save(out / "group.key")
        write_public(out / "group.pub", key.public_key)
    except KeyFileError as e:
        raise GroupCommandError(str(e)) from None
    public = format_public_key(key.public_key)
    print(public)
    pub, private = out / "group.pub", out / "group.key"
    print(f'# every member\'s config: [group] public_key = "{public}"  (or public_key_file = "{pub}")')
    print(f'# the issuer\'s config:   [issuer] group_key = "{private}"  (keep this file secret)')
    return 0
