"""`ipop-overlay join`'s driver: log in, get a certificate, make the TAP, start the node, serve the control socket
and metrics, remember the members for a restart without XMPP; every failure before the node runs is a
JoinError (one line) that leaves no TAP, socket or room presence behind."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import random
import time
from pathlib import Path
from typing import Any

from overlay.config import NodeConfig, ice_settings
from overlay.configvalues import resolve_address6
from overlay.control import ControlError, ControlServer, socket_in_use
from overlay.identity import Identity
from overlay.ids import format_id
from overlay.membership import BACKOFF_FIRST, BACKOFF_MAX
from overlay.node import Node, NodeSettings
from overlay.remembered import SAVE_FIRST, SAVE_INTERVAL, Remembered, state_path
from overlay.remembered import load as load_remembered
from overlay.remembered import save as save_remembered
from overlay.transport.underlay import UdpUnderlay, UnderlayError
from overlay.trust.enroll import EnrollError, load_saved, obtain_certificate
from overlay.trust.issuer import Issuer, IssuerError, open_issuer
from overlay.trust.members import GroupTrust

log = logging.getLogger("ipop-overlay")


class JoinError(Exception):
    """A node that could not start: one line for the person who ran it."""


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
    remembered_at = state_path(cfg.key)
    remembered = load_remembered(remembered_at)
    try:
        login = await _first_login(bootstrap, stop, remembered=len(remembered))
        if login == "stopped":
            return
        address = cfg.vnic_address
        if trust is None:
            log.warning("[group] open = true: any node that reaches this one may join the overlay (no certificates)")
        else:
            if issuer is not None:
                bootstrap.set_issuer(True)
            wanted = ipaddress.IPv4Interface(address).ip if address else None
            saved = cfg.key.with_suffix(".cert")
            cert = None
            if login == "without":
                # Without XMPP only a saved certificate will do; an issuer needs the room's member list.
                cert = load_saved(saved, trust, wanted, cfg.jid) if issuer is None else None
                if cert is None:
                    log.warning("no valid saved certificate to rejoin with: waiting for the XMPP server")
                    if await _first_login(bootstrap, stop, remembered=0) == "stopped":
                        return
                    login = "in"
            if cert is None:
                try:
                    cert = await obtain_certificate(
                        bootstrap, identity, trust, cfg.room, cfg.jid, wanted, issuer, stop, saved
                    )
                except EnrollError as e:
                    raise JoinError(str(e)) from None
            if cert is None:
                return
            address = str(cert.address)
        assert address is not None
        await _run_member(
            cfg, identity, bootstrap, address, trust, issuer, stop, remembered if login == "without" else None
        )
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
    c = cfg.issuer
    try:
        issuer = open_issuer(
            c.group_key, cfg.group_key, cfg.room, c.subnet, float(c.lifetime), c.state_file, time.time()
        )
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
    remembered: list[Remembered] | None,
) -> None:
    """The node itself; `remembered`: the XMPP server was unreachable, so rejoin through these members."""
    from overlay.tap.device import LinuxTap, TapError

    ice = ice_settings(cfg, ipaddress.IPv4Interface(address).network)
    settings = NodeSettings(
        room=cfg.room,
        address=address,
        address6=resolve_address6(cfg.vnic_address6, identity.node_id) if cfg.vnic_address6 else None,
        ring=cfg.ring,
        lookahead=cfg.lookahead,
        promise=cfg.routing == "promise",
        ice=ice,
        anchors=cfg.anchors,
        on_demand_rate=cfg.on_demand_rate,
        on_demand_idle=cfg.on_demand_idle,
    )
    lanes = cfg.vnic_lanes if cfg.vnic_fast_path else 1  # an Engine per lane: only the compiled path has them
    try:
        underlay = UdpUnderlay(cfg.listen, lanes=lanes, express=cfg.vnic_fast_path)
    except UnderlayError as e:
        raise JoinError(str(e)) from None
    node = Node(
        identity,
        settings,
        underlay,
        bootstrap=bootstrap,
        rng=random.Random(),
        trust=trust,
        issuer=issuer,
        fast_path=cfg.vnic_fast_path,
    )
    tap = None
    metrics: Any = None
    keeper: asyncio.Future[None] | None = None
    control = ControlServer(cfg.control_socket, {"status": node.status}, {"graph": node.graph.request})
    try:
        try:
            tap = await LinuxTap.create(
                cfg.vnic_name,
                address,
                cfg.vnic_mtu,
                offload=cfg.vnic_offload,
                address6=settings.address6,
                queues=lanes,
            )
        except TapError as e:
            raise JoinError(str(e)) from None
        node.attach_tap(tap)
        try:
            await control.start()
        except ControlError as e:
            raise JoinError(str(e)) from None
        await node.start(remembered)  # the login above is reused: one XMPP session per node
        keeper = asyncio.ensure_future(_keep_remembered(node, state_path(cfg.key)))
        if cfg.metrics is not None:
            from overlay.metrics import MetricsServer

            metrics = MetricsServer(cfg.metrics, node)
            try:
                await metrics.start()
            except OSError as e:
                raise JoinError(f"[metrics] listen {cfg.metrics[0]}:{cfg.metrics[1]}: {e.strerror or e}") from None
        # Everything loaded so far (slixmpp, PyNaCl, our modules: most of the heap) lives as long as
        # the node: keep it out of the collector's full passes, which otherwise scan it again and again.
        gc.freeze()
        if remembered:
            log.info("XMPP unreachable: rejoining as %s (%s) through %d remembered members", format_id(node.id),
                     address, len(remembered))  # fmt: skip
        else:
            log.info("in room %s as %s (%s); joining the overlay", cfg.room, format_id(node.id), address)
        await stop.wait()
        _save_remembered(node, state_path(cfg.key), [])  # the links of now, before stopping closes them
        log.info("leaving %s", cfg.room)
    finally:
        if keeper is not None:
            keeper.cancel()
        if metrics is not None:
            await metrics.stop()
        await node.stop()
        underlay.close()
        await control.stop()
        if tap is not None:
            tap.close()


async def _keep_remembered(node: Node, path: Path) -> None:
    """Write the members to come back through (overlay/remembered.py) whenever they changed, checked after
    SAVE_FIRST, then at doubling intervals up to SAVE_INTERVAL."""
    last: list[Remembered] = []
    wait = SAVE_FIRST
    while True:
        await asyncio.sleep(wait)
        last = _save_remembered(node, path, last)
        wait = min(SAVE_INTERVAL, wait * 2)  # the ring forms in the first seconds: a crash then still finds some


def _save_remembered(node: Node, path: Path, last: list[Remembered]) -> list[Remembered]:
    now = node.remembered()
    if now and now != last:
        try:
            save_remembered(path, now)
        except OSError as e:
            log.warning("cannot write the state file %s: %s (a restart without XMPP will not find members)", path, e)
            return now
    return now


async def _first_login(bootstrap: Any, stop: asyncio.Event, *, remembered: int) -> str:
    """Log in and enter the room before anything is set up, so a wrong password, a missing room or a
    non-member ends `join` with one line and leaves nothing behind: "in". A slow server is waited for (backing
    off, said once), and one with nothing listening is such a failure too, unless the node remembers members
    from its last run: a server it cannot reach then gives "without" (it rejoins through them, and membership
    keeps trying XMPP). "stopped" if we were asked to stop."""
    from xmpp_bootstrap import BootstrapError

    delay, said = BACKOFF_FIRST, ""
    while True:
        try:
            await bootstrap.start()
            return "in"
        except BootstrapError as e:
            if remembered and e.unreachable:
                log.warning("%s; rejoining through %d members remembered from the last run", e, remembered)
                return "without"
            if not e.transient:
                raise JoinError(str(e)) from None
            if str(e) != said:
                log.warning("%s; retrying (backing off up to %.0f s)", e, BACKOFF_MAX)
                said = str(e)
        try:
            await asyncio.wait_for(stop.wait(), delay * random.uniform(0.75, 1.25))
            return "stopped"
        except TimeoutError:
            delay = min(BACKOFF_MAX, delay * 2)
