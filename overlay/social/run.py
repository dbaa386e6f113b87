"""`ipop-overlay join` for a [social] config: log in, make the TAP, run the SocialNode until stopped.

The XMPP session is the node's lifeline to its friends (their presences and the link signals): when it drops,
the node logs in again with backoff (RECONNECT_FIRST doubling to RECONNECT_MAX) and starts watching its friends
again; links to devices that stay online come back through the usual retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from typing import Any

from slixmpp import JID

from overlay.config import NodeConfig, ice_settings
from overlay.control import ControlError, ControlServer, socket_in_use
from overlay.identity import Identity
from overlay.ids import format_id
from overlay.social.node import SocialNode
from overlay.transport.underlay import UdpUnderlay, UnderlayError
from xmpp_bootstrap.session import BootstrapError, log_in, new_client

log = logging.getLogger(__name__)

LOGIN_TIMEOUT = 10.0
RECONNECT_FIRST = 1.0  # our choice, as membership's backoff: a restarting server is back within seconds ...
RECONNECT_MAX = 30.0  # ... and one that is down for long is asked twice a minute


class SocialJoinError(Exception):
    """One line for the person who ran `join`."""


async def run_social(cfg: NodeConfig, identity: Identity, stop: asyncio.Event) -> None:
    from overlay.tap.device import LinuxTap, TapError

    assert cfg.social is not None and cfg.vnic_address is not None
    if socket_in_use(cfg.control_socket):
        raise SocialJoinError(
            f"control socket {cfg.control_socket} is in use: is another node running? set [node] control_socket"
        )
    ca = str(cfg.ca_file) if cfg.ca_file else None
    host = cfg.host or str(JID(cfg.jid).domain)
    client = new_client(cfg.jid, cfg.password, ca)
    try:
        await log_in(client, host, cfg.port, ca, LOGIN_TIMEOUT)
    except BootstrapError as e:
        raise SocialJoinError(str(e)) from None
    tap: Any = None
    node: SocialNode | None = None
    control: ControlServer | None = None
    try:
        try:
            underlay = UdpUnderlay(cfg.listen)
        except UnderlayError as e:
            raise SocialJoinError(str(e)) from None
        ice = ice_settings(cfg, cfg.social.subnet)
        try:
            tap = await LinuxTap.create(cfg.vnic_name, cfg.vnic_address, cfg.vnic_mtu, offload=cfg.vnic_offload)
        except TapError as e:
            raise SocialJoinError(str(e)) from None
        node = SocialNode(
            identity, cfg.social, cfg.vnic_address, client, underlay, tap, cfg.key.parent / "social.state", ice=ice,
            fast_path=cfg.vnic_fast_path,
        )  # fmt: skip
        control = ControlServer(cfg.control_socket, {"status": node.status}, {"forget": node.forget_command})
        try:
            await control.start()
        except ControlError as e:
            raise SocialJoinError(str(e)) from None
        try:
            await node.start()
        except BootstrapError as e:
            raise SocialJoinError(str(e)) from None
        keeper = _Reconnect(node, host, cfg.port, ca)
        log.info(
            "social node %s as %s at %s; names under .%s answered at %s",
            format_id(node.id), node.full_jid, cfg.vnic_address, cfg.social.domain,
            ipaddress.IPv4Address(node.dns),
        )  # fmt: skip
        await stop.wait()
        keeper.cancel()
        log.info("leaving: %d friend device(s) told", len(node.links.links))
    finally:
        if node is not None:
            await node.stop()
        if control is not None:
            await control.stop()
        if tap is not None:
            tap.close()
        with contextlib.suppress(Exception):
            client.disconnect(wait=1.0)


class _Reconnect:
    """Logs the node's XMPP session in again after it drops, with backoff, and restarts the friend watch."""

    def __init__(self, node: SocialNode, host: str, port: int, ca: str | None) -> None:
        self.node, self.host, self.port, self.ca = node, host, port, ca
        self.delay = RECONNECT_FIRST
        self._task: asyncio.Task[None] | None = None
        self._cancelled = False
        node.client.add_event_handler("disconnected", self._on_disconnected)

    def _on_disconnected(self, _reason: object) -> None:
        if not self._cancelled and (self._task is None or self._task.done()):
            log.warning("XMPP session lost: logging in again; links to friends stay, new ones wait for the session")
            self._task = asyncio.ensure_future(self._again())

    async def _again(self) -> None:
        while not self._cancelled:
            await asyncio.sleep(self.delay)
            try:
                await log_in(self.node.client, self.host, self.port, self.ca, LOGIN_TIMEOUT)
                await self.node.watch.start()
            except BootstrapError as e:
                self.delay = min(RECONNECT_MAX, self.delay * 2)
                log.warning("XMPP login failed (%s): next try in %g s", e, self.delay)
                continue
            self.delay = RECONNECT_FIRST
            log.info("XMPP session back: watching friends again")
            return

    def cancel(self) -> None:
        self._cancelled = True
        self.node.client.del_event_handler("disconnected", self._on_disconnected)
        if self._task is not None:
            self._task.cancel()
