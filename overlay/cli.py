"""`ipop-overlay`: keygen, join, status, sim. Every failure is one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import ipaddress
import json
import logging
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

from overlay import groupcmd
from overlay.config import ConfigError, NodeConfig, load_config
from overlay.control import ControlError, ControlServer, query, socket_in_use
from overlay.identity import Identity, KeyFileError
from overlay.ids import format_id
from overlay.membership import BACKOFF_FIRST, BACKOFF_MAX
from overlay.node import Node, NodeSettings
from overlay.transport.paths import IceSettings
from overlay.transport.underlay import UdpUnderlay, UnderlayError
from overlay.trust.enroll import EnrollError, obtain_certificate
from overlay.trust.groupkey import GroupKey
from overlay.trust.issuer import Issuer, IssuerError
from overlay.trust.members import GroupTrust

log = logging.getLogger("ipop-overlay")
DEFAULT_CONTROL = Path("/run/ipop-overlay/node.sock")


class JoinError(Exception):
    """A node that could not start: one line for the person who ran it."""


def cmd_keygen(args: argparse.Namespace) -> int:
    identity = Identity.generate()
    identity.save(Path(args.path))
    print(format_id(identity.node_id))
    return 0


async def run_node(cfg: NodeConfig, identity: Identity, stop: asyncio.Event) -> None:
    """Start everything in an order where each failure leaves nothing behind, run until `stop`, clean up."""
    from xmpp_bootstrap import XmppBootstrap, XmppSettings

    if socket_in_use(cfg.control_socket):
        raise JoinError(
            f"control socket {cfg.control_socket} is in use: is another node running? set [node] control_socket"
        )
    trust, issuer = _trust(cfg, identity)
    bootstrap = XmppBootstrap(
        XmppSettings(
            jid=cfg.jid,
            password=cfg.password,
            room=cfg.room,
            nick=format_id(identity.node_id),
            host=cfg.host,
            port=cfg.port,
            ca_file=str(cfg.ca_file) if cfg.ca_file else None,
        ),
    )
    try:
        if not await _first_login(bootstrap, stop):
            return
        address = cfg.vnic_address
        if trust is None:
            log.warning("[group] open = true: any node that reaches this one may join the overlay (no certificates)")
        else:
            if issuer is not None:
                bootstrap.set_issuer(True)
            wanted = ipaddress.IPv4Interface(address).ip if address else None
            try:
                cert = await obtain_certificate(
                    bootstrap, identity, trust, cfg.room, cfg.jid, wanted, issuer, stop, cfg.key.with_suffix(".cert")
                )
            except EnrollError as e:
                raise JoinError(str(e)) from None
            if cert is None:
                return
            address = str(cert.address)
        assert address is not None
        await _run_member(cfg, identity, bootstrap, address, trust, issuer, stop)
    finally:
        with contextlib.suppress(Exception):
            await bootstrap.stop()


def _trust(cfg: NodeConfig, identity: Identity) -> tuple[GroupTrust | None, Issuer | None]:
    """The pinned group key and, on an issuer, the group's signing key and state (KeyFileError if unusable)."""
    if cfg.group_key is None:
        return None, None
    trust = GroupTrust(cfg.group_key, identity.public_key, time.time)
    if cfg.issuer is None:
        return trust, None
    key = GroupKey.load(cfg.issuer.group_key)
    if key.public_key != cfg.group_key:
        raise JoinError(f"[issuer] group_key {cfg.issuer.group_key} is not the key of [group] public_key")
    issuer = Issuer(key, cfg.room, cfg.issuer.subnet, float(cfg.issuer.lifetime), cfg.issuer.state_file)
    try:
        issuer.load(time.time())
    except IssuerError as e:
        raise JoinError(str(e)) from None
    return trust, issuer


async def _run_member(
    cfg: NodeConfig,
    identity: Identity,
    bootstrap: Any,
    address: str,
    trust: GroupTrust | None,
    issuer: Issuer | None,
    stop: asyncio.Event,
) -> None:
    from overlay.tap.device import LinuxTap, TapError

    ice = None
    if cfg.ice:
        ice = IceSettings(
            stun=cfg.stun,
            turn=cfg.turn,
            exclude_interfaces=frozenset({cfg.vnic_name}),
            exclude_networks=(ipaddress.IPv4Interface(address).network,),
        )
    settings = NodeSettings(
        room=cfg.room,
        address=address,
        ring=cfg.ring,
        lookahead=cfg.lookahead,
        promise=cfg.routing == "promise",
        ice=ice,
        anchors=cfg.anchors,
        on_demand_rate=cfg.on_demand_rate,
        on_demand_idle=cfg.on_demand_idle,
    )
    try:
        underlay = UdpUnderlay(cfg.listen)
    except UnderlayError as e:
        raise JoinError(str(e)) from None
    node = Node(identity, settings, underlay, bootstrap=bootstrap, rng=random.Random(), trust=trust, issuer=issuer)
    tap = None
    control = ControlServer(cfg.control_socket, {"status": node.status})
    try:
        try:
            tap = await LinuxTap.create(cfg.vnic_name, address, cfg.vnic_mtu, offload=cfg.vnic_offload)
        except TapError as e:
            raise JoinError(str(e)) from None
        node.attach_tap(tap)
        try:
            await control.start()
        except ControlError as e:
            raise JoinError(str(e)) from None
        await node.start()  # the login above is reused: one XMPP session per node
        # Everything loaded so far (slixmpp, cryptography, our modules: most of the heap) lives as long as
        # the node: keep it out of the collector's full passes, which otherwise scan it again and again.
        gc.freeze()
        log.info("in room %s as %s (%s); joining the overlay", cfg.room, format_id(node.id), address)
        await stop.wait()
        log.info("leaving %s", cfg.room)
    finally:
        await node.stop()
        underlay.close()
        await control.stop()
        if tap is not None:
            tap.close()


async def _first_login(bootstrap: Any, stop: asyncio.Event) -> bool:
    """Log in and enter the room before anything is set up, so a wrong password, a missing room or a
    non-member ends `join` with one line and leaves nothing behind. A slow server is waited for (backing off,
    said once); False if we were asked to stop meanwhile."""
    from xmpp_bootstrap import BootstrapError

    delay, said = BACKOFF_FIRST, ""
    while True:
        try:
            await bootstrap.start()
            return True
        except BootstrapError as e:
            if not e.transient:
                raise JoinError(str(e)) from None
            if str(e) != said:
                log.warning("%s; retrying (backing off up to %.0f s)", e, BACKOFF_MAX)
                said = str(e)
        try:
            await asyncio.wait_for(stop.wait(), delay * random.uniform(0.75, 1.25))
            return False
        except TimeoutError:
            delay = min(BACKOFF_MAX, delay * 2)


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


def cmd_sim(argv: list[str]) -> int:
    from sims.cli import main as sim_main

    return sim_main(argv)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ipop-overlay", description="GroupVPN over a structured overlay.")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True)
    k = sub.add_parser("keygen", help="write a new node key (mode 0600) and print the node ID")
    k.add_argument("path")
    j = sub.add_parser("join", help="run a node in the foreground until SIGINT/SIGTERM")
    j.add_argument("--config", required=True, help="the node's TOML file")
    s = sub.add_parser("status", help="show a running node's links and DHT")
    s.add_argument("--json", action="store_true", help="one JSON object")
    s.add_argument("--control", help=f"control socket path (default {DEFAULT_CONTROL})")
    s.add_argument("--config", help="read the control socket path from this config file")
    groupcmd.add_parser(sub)
    sub.add_parser("sim", help="topology simulator (ipop-overlay sim --help)", add_help=False)
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
