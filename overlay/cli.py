"""`ipop-overlay`: keygen, join, check, status, graph, group, sim. Every failure is one line on stderr and a
non-zero exit."""

from __future__ import annotations

import argparse
import asyncio
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
from overlay.control import ControlError, query, stream
from overlay.identity import Identity, KeyFileError
from overlay.ids import format_id
from overlay.manual import MANUAL
from overlay.social import friendcmd

log = logging.getLogger("ipop-overlay")
DEFAULT_CONTROL = Path("/run/ipop-overlay/node.sock")


def cmd_keygen(args: argparse.Namespace) -> int:
    identity = Identity.generate()
    identity.save(Path(args.path))
    print(format_id(identity.node_id))
    return 0


def cmd_join(args: argparse.Namespace) -> int:
    # slixmpp colours its XML debug output with pygments whenever pygments can be imported
    # (slixmpp/xmlstream/tostring.py); a node never prints that, and the import holds ~1.5 MB of every node.
    sys.modules.setdefault("pygments", None)  # type: ignore[arg-type]
    # Imported here: the node (slixmpp, PyNaCl, ...) is half a second of start-up that `status`, `graph`
    # and `check` do not need.
    from overlay.run import JoinError, run_node

    cfg = load_config(Path(args.config))
    identity = Identity.load(cfg.key)

    from overlay.social.run import SocialJoinError, run_social

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if cfg.social is not None:
            await run_social(cfg, identity, stop)
        else:
            await run_node(cfg, identity, stop)

    try:
        asyncio.run(main())
    except (JoinError, SocialJoinError) as e:
        print(f"ipop-overlay: {e}", file=sys.stderr)
        return 1
    return 0


def _data_path(lanes: int) -> str:
    return f"compiled, {lanes} lane{'s' if lanes > 1 else ''}" if lanes else "Python"


def _status_table(st: dict[str, Any]) -> str:
    lines = [
        f"node     {st['node_id']}{'  (anchor)' if st.get('anchor') else ''}",
        f"address  {st['address']}" + (f"  {st['address6']}" if st.get("address6") else ""),
        f"room     {st['room']}",
        f"endpoint {st.get('endpoint', '')}",
        f"cipher   {st.get('cipher', '-')}",
        f"data     {_data_path(st.get('lanes', 0))}",
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
    lines += _ice_lines(st)
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
    st = query(_control_path(args))
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        print(_social_table(st) if st.get("mode") == "social" else _status_table(st))
    return 0


def _ice_lines(st: dict[str, Any]) -> list[str]:
    """What the node's ICE agent knows of its NAT and TURN servers (overlay/status.py ice_status)."""
    ice = st.get("ice", {})
    lines = [f"nat      {ice['mapping']}"] if ice.get("mapping") else []
    for t in ice.get("turn", []):
        relay = f"relayed {t['relayed']}" if t["relayed"] else f"no allocation: {t.get('error') or 'asking'}"
        lines.append(f"turn     {t['server']} {relay}")
    return lines


def _social_table(st: dict[str, Any]) -> str:
    """A SocialVPN node's status: each friend, its devices with the address and names they have here."""
    lines = [
        f"node     {st['node_id']}  {st['jid']}",
        f"address  {st['address']}  (names under .{st['domain']} answered at {st['dns']})",
        f"endpoint {st['endpoint']}",
        f"data     {_data_path(st.get('lanes', 0))}",
        f"xmpp     {st['xmpp']}" + ("  (links stay; new ones wait for the session)" if st["xmpp"] != "online" else ""),
        *_ice_lines(st),
    ]
    lines += [f"WARNING  {w}" for w in st["warnings"]]
    if st["requests"]:
        lines.append(f"requests {', '.join(st['requests'])}  ('ipop-overlay friend accept JID')")
    lines.append(f"friends  {len(st['friends'])}")
    for friend in st["friends"]:
        lines.append(f"  {friend['jid']}" + ("" if friend["devices"] else "  (no device online)"))
        for d in friend["devices"]:
            rtt = f"{d['rtt_ms']:.2f} ms" if d["rtt_ms"] is not None else "-"
            link = d["link"] or ("not linked: key changed" if d["warning"] else "not linked yet")
            lines.append(
                f"    {d['device']:30} {d['address']:15} {' '.join(d['names']) or '-':28} {link:8} {rtt:>9} "
                f"{d['tx_bytes']}/{d['rx_bytes']} B"
            )
    return "\n".join(lines)


def _control_path(args: argparse.Namespace) -> Path:
    if args.config and not args.control:
        return load_config(Path(args.config)).control_socket
    return Path(args.control) if args.control else DEFAULT_CONTROL


def cmd_graph(args: argparse.Namespace) -> int:
    from overlay.graphfile import FORMATS, write

    out = Path(args.out)
    if out.suffix.lower() not in FORMATS:
        raise ControlError(f"--out {out}: write .graphml, .dot (.gv) or .png")
    bar = sys.stderr.isatty()
    result: dict[str, Any] | None = None
    for part in stream(_control_path(args), {"cmd": "graph", "timeout": args.timeout}, timeout=args.timeout + 10):
        if "progress" in part and bar:
            done, known = part["progress"]
            filled = int(30 * done / max(known, 1))
            print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{known} members", end="", file=sys.stderr)
        result = part.get("result", result)
    if bar:
        print(file=sys.stderr)
    if result is None:
        raise ControlError("the node ended the collection without a result")
    try:
        g = write(result, out)
    except (ValueError, OSError) as e:
        raise ControlError(str(e)) from None
    print(f"{out}: {g.number_of_nodes()} members, {g.number_of_edges()} links")
    if not result["complete"]:
        silent = result["unanswered"]
        print(f"PARTIAL: {len(silent)} members did not answer within {args.timeout:g} s: {', '.join(silent)}")
        return 1
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
    import importlib.metadata  # here, not at the top: PrintVersion says why

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


class PrintVersion(argparse.Action):
    """`--version`, looked up only when asked for: a node that imported importlib.metadata would hold 1.5 MB
    more for the whole of its life (its `email` and `zipfile` imports)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        kwargs.setdefault("help", "show the version and exit")
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(
        self, p: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        print(f"ipop-overlay {package_version()}")
        p.exit()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ipop-overlay", description="GroupVPN over a structured overlay.")
    p.add_argument("--version", action=PrintVersion)
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
    g = sub.add_parser("graph", help="collect every member's links through the overlay; write GraphML, DOT or PNG")
    g.add_argument("--out", default="overlay.graphml", help="file to write: .graphml, .dot or .png")
    g.add_argument("--timeout", type=_seconds, default=30.0, help="seconds before a partial result (default 30)")
    g.add_argument("--control", help=f"control socket path (default {DEFAULT_CONTROL})")
    g.add_argument("--config", help="read the control socket path from this config file")
    s = sub.add_parser("status", help="show a running node's links and DHT")
    s.add_argument("--json", action="store_true", help="one JSON object")
    s.add_argument("--control", help=f"control socket path (default {DEFAULT_CONTROL})")
    s.add_argument("--config", help="read the control socket path from this config file")
    groupcmd.add_parser(sub)
    friendcmd.add_parser(sub)
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
        if args.command == "graph":
            return cmd_graph(args)
        if args.command == "group":
            return groupcmd.run(args)
        if args.command == "friend":
            return friendcmd.run(args)
        return cmd_status(args)
    except (ConfigError, KeyFileError, ControlError, groupcmd.GroupCommandError, friendcmd.FriendCommandError) as e:
        print(f"ipop-overlay: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
