"""`ipop-overlay`: keygen, join, check, status, group, sim. Every failure is one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import logging
import signal
import sys
import tomllib
from pathlib import Path
from typing import Any

from overlay import groupcmd
from overlay.check import DEFAULT_TIMEOUT, report_lines, run_checks
from overlay.config import ConfigError, load_config
from overlay.control import ControlError, query
from overlay.identity import Identity, KeyFileError
from overlay.ids import format_id
from overlay.run import JoinError, run_node

log = logging.getLogger("ipop-overlay")
DEFAULT_CONTROL = Path("/run/ipop-overlay/node.sock")


def cmd_keygen(args: argparse.Namespace) -> int:
    identity = Identity.generate()
    identity.save(Path(args.path))
    print(format_id(identity.node_id))
    return 0


def cmd_join(args: argparse.Namespace) -> int:
    cfg = load_config(Path(args.config))
    identity = Identity.load(cfg.key)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_node(cfg, identity, stop)

    asyncio.run(main())
    return 0


def _status_table(st: dict[str, Any]) -> str:
    lines = [
        f"node     {st['node_id']}{'  (anchor)' if st.get('anchor') else ''}",
        f"address  {st['address']}",
        f"room     {st['room']}",
        f"endpoint {st.get('endpoint', '')}",
        f"dht      {st['dht']['stored']} records stored, {st['dht']['cached']} cached",
        f"links    {len(st['links'])}",
    ]
    tr = st.get("trust")
    if tr:
        issuer = "  (issuer)" if tr.get("issuer") else ""
        lines.insert(
            2,
            f"member   {tr['jid']} certificate {tr['serial']}, expires in {tr['expires_in_s'] // 3600} h, "
            f"{tr['revocations']} revocation(s) known{issuer}",
        )
    ov, ms = st.get("overlay"), st.get("membership")
    if ov:
        lines.insert(4, f"overlay  {ov['id']} beacon {ov['beacon']} ({ov['beacon_age_s']} s ago)")
    if ms:
        state = ms["state"] + (f", retrying in {ms['retry_in_s']} s: {ms['last_error']}" if ms["retry_in_s"] else "")
        lines.insert(5, f"joining  {state}")
    header = ("PEER", "ADDRESS", "KIND", "ENDPOINT", "RTT ms", "TX bytes", "RX bytes", "ROLES")
    rows = [header] + [
        (
            lk["peer_id"],
            lk["peer_address"] or "-",
            lk.get("kind", "-"),
            lk["endpoint"],
            f"{lk['rtt_ms']:.2f}" if lk["rtt_ms"] is not None else "-",
            str(lk["tx_bytes"]),
            str(lk["rx_bytes"]),
            ",".join(lk.get("roles", [])) or "-",
        )
        for lk in st["links"]
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    path = Path(args.control) if args.control else DEFAULT_CONTROL
    if args.config and not args.control:
        path = load_config(Path(args.config)).control_socket
    st = query(path)
    print(json.dumps(st, indent=2) if args.json else _status_table(st))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Exit 2 for a config that cannot be read at all, 1 when a check failed, 0 when `join` has what it needs."""
    try:
        cfg = load_config(Path(args.config))
    except ConfigError as e:
        print(f"ipop-overlay: {e}", file=sys.stderr)
        return 2
    report = run_checks(cfg, args.timeout)
    print("\n".join(report_lines(cfg, report)))
    return 0 if report.ok else 1


def package_version() -> str:
    """The installed distribution's version; in a source tree that was never installed, pyproject.toml's."""
    try:
        return importlib.metadata.version("ipop-overlay")
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        with (Path(__file__).resolve().parent.parent / "pyproject.toml").open("rb") as f:
            return str(tomllib.load(f)["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 0 to 600")
    return value


def cmd_sim(argv: list[str]) -> int:
    from sims.cli import main as sim_main

    return sim_main(argv)


# Each subcommand's manual page for `--help`: what it does, what it needs, its exit status; then examples.
MANUAL: dict[str, tuple[str, str]] = {
    "keygen": (
        """\
Write a new Ed25519 node key to PATH, readable by its owner only (mode 0600), and print
the node ID derived from it (16 hex digits): the node's place on the overlay's ring.

Needs: a PATH that does not exist yet (an existing key is never overwritten) in a
directory the caller may write.

Exit status: 0 when the key was written; 1 with one line on stderr when it was not.""",
        """\
examples:
  ipop-overlay keygen /var/lib/ipop-overlay/office/node.key""",
    ),
    "join": (
        """\
Run a node in the foreground until SIGINT or SIGTERM: log in to the XMPP server with the
config's [xmpp] account, enter the group's room, get a membership certificate from an
issuer (unless [group] open = true), create the TAP device, open the UDP listen socket and
the control socket, and take a place in the overlay. Logs go to stderr. On SIGINT/SIGTERM
the node tells its neighbours, closes its links and removes its TAP device and socket.

Needs: CAP_NET_ADMIN (root, or the systemd unit in dist/systemd) for the TAP device; the
node key ([node] key, from 'ipop-overlay keygen'); a config that passes 'ipop-overlay check'.
A server that does not answer yet is waited for, with backoff.

Exit status: 0 after a clean stop; 1 with one line on stderr when the node cannot start
(bad config or key file, refused login, no such room, not a member), leaving nothing behind.""",
        """\
examples:
  ipop-overlay join --config /etc/ipop-overlay/node.toml
  systemctl start ipop-overlay@office     # the same, as a service: /etc/ipop-overlay/office.toml""",
    ),
    "check": (
        """\
Try what 'join' needs, without joining: read the config and the node key (and on an issuer
the group key and its state file), open a TCP connection to the XMPP server, send one STUN
Binding request to every [ice] STUN server and UDP TURN server (a TCP TURN server gets a TCP
connection), and bind the UDP listen address. No TAP device is created, no login is tried
and the room is not entered. Prints one line per check, "ok" or "FAIL" and the reason, then
what 'join' would do with this config.

Needs: the config and the files it names; no root (a listen port below 1024 needs
CAP_NET_BIND_SERVICE). The password and room membership are only tried by 'join'.

Exit status: 0 when every check passed; 1 when any failed; 2 when the config cannot be
used (one line on stderr).""",
        """\
examples:
  ipop-overlay check --config /etc/ipop-overlay/office.toml
  ipop-overlay check --config node.toml --timeout 2""",
    ),
    "status": (
        """\
Show a running node's state, read from its control socket: node ID, virtual address, room,
membership certificate, overlay and join state, DHT records, and one row per link (peer,
kind of path, endpoint, RTT, bytes each way, roles in the ring).

Needs: a running node and permission to open its control socket: --control, or the
[node] control_socket of --config, or /run/ipop-overlay/node.sock.

Exit status: 0 when the node answered; 1 with one line on stderr when none did.""",
        """\
examples:
  ipop-overlay status
  ipop-overlay status --config /etc/ipop-overlay/office.toml --json""",
    ),
    "group": (
        """\
The group's signing key and the room's member list.
  init --out DIR       write a new group key (DIR/group.key, mode 0600) and DIR/group.pub,
                       and print the public key every member pins in [group] public_key
  create|add|remove|list --config FILE [JID ...]
                       log in with the [xmpp] account of a node config and create the
                       members-only room or edit or show its member list; an issuer
                       revokes a removed member's certificate within a minute

Needs: for init, a directory for the key; for the others, a config whose account owns the
room (or administers it, for add, remove and list).

Exit status: 0 on success; 1 with one line on stderr when the server refused or a file
cannot be used.""",
        """\
examples:
  ipop-overlay group init --out /var/lib/ipop-overlay/office/group
  ipop-overlay group add --config owner.toml alice@example.test bob@example.test""",
    ),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ipop-overlay", description="GroupVPN over a structured overlay.")
    p.add_argument("--version", action="version", version=f"ipop-overlay {package_version()}")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True)
    k = sub.add_parser("keygen", help="write a new node key (mode 0600) and print the node ID")
    k.add_argument("path")
    j = sub.add_parser("join", help="run a node in the foreground until SIGINT/SIGTERM")
    j.add_argument("--config", required=True, help="the node's TOML file")
    c = sub.add_parser("check", help="try what join needs (keys, servers, listen port) without joining")
    c.add_argument("--config", required=True, help="the node's TOML file")
    c.add_argument(
        "--timeout", type=_seconds, default=DEFAULT_TIMEOUT, help=f"seconds per server (default {DEFAULT_TIMEOUT:g})"
    )
    s = sub.add_parser("status", help="show a running node's links and DHT")
    s.add_argument("--json", action="store_true", help="one JSON object")
    s.add_argument("--control", help=f"control socket path (default {DEFAULT_CONTROL})")
    s.add_argument("--config", help="read the control socket path from this config file")
    groupcmd.add_parser(sub)
    sub.add_parser("sim", help="topology simulator (ipop-overlay sim --help)", add_help=False)
    # Set here rather than in each add_parser call because `group` is built in groupcmd.py. `sim` has none:
    # `ipop-overlay sim --help` is the simulator's own parser (sims/cli.py).
    for name, (description, examples) in MANUAL.items():
        page = sub.choices[name]
        page.description, page.epilog = description, examples
        page.formatter_class = argparse.RawDescriptionHelpFormatter
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sim"]:
        return cmd_sim(argv[1:])
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # slixmpp logs its own view of failures (e.g. "No appropriate login method." before a refused login) that
    # BootstrapError already reports in one actionable line: keep its logs for --log-level debug.
    if args.log_level != "debug":
        logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
        # aioice logs every candidate pair's state change at INFO: our own log says what was chosen.
        logging.getLogger("aioice").setLevel(logging.WARNING)
    try:
        if args.command == "keygen":
            return cmd_keygen(args)
        if args.command == "join":
            return cmd_join(args)
        if args.command == "check":
            return cmd_check(args)
        if args.command == "group":
            return groupcmd.run(args)
        return cmd_status(args)
    except (ConfigError, KeyFileError, ControlError, JoinError, groupcmd.GroupCommandError) as e:
        print(f"ipop-overlay: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
