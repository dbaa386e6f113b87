"""An XMPP session as every part of ours opens it (the group bootstrap, the admin commands, SocialVPN's roster):
a slixmpp client over STARTTLS with the server's certificate verified, a login that fails with one line a person
can act on (BootstrapError), and the names of the stanzas and errors the parts share (RFC 6120, XEP-0045)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slixmpp import JID, ClientXMPP

MUC_NS = "http://jabber.org/protocol/muc"
MUC_USER_NS = "http://jabber.org/protocol/muc#user"
DISCO_INFO_NS = "http://jabber.org/protocol/disco#info"
STANZA_ERROR_NS = "urn:ietf:params:xml:ns:xmpp-stanzas"
# XEP-0045 section 7.2.2: status 110 marks the presence that refers to the receiving occupant itself.
SELF_PRESENCE_STATUS = "110"


class BootstrapError(Exception):
    """One line a person can act on (what failed, the value, what to do).

    `transient`: the server was slow or the session dropped, so trying again later may succeed; otherwise the
    configuration or the credentials are wrong (a refused login, not a member, no such room, a certificate
    that does not verify, nothing listening at the address).

    `unreachable`: no session could be opened at all (nothing listening, no answer): the server, not our
    configuration, may be down, so a node that remembers members from its last run rejoins through them."""

    def __init__(self, message: str, *, transient: bool = False, unreachable: bool = False) -> None:
        super().__init__(message)
        self.transient = transient
        self.unreachable = unreachable


def stanza_error(stanza: Any) -> str:
    """The defined-condition name of a stanza error (RFC 6120 section 8.3.3), or '' if none."""
    error = stanza.xml.find("{jabber:client}error")
    if error is None:
        return ""
    for child in error:
        if child.tag.startswith(f"{{{STANZA_ERROR_NS}}}") and not child.tag.endswith("}text"):
            return str(child.tag.split("}", 1)[1])
    return ""


def stanza_error_text(stanza: Any) -> str:
    """The server's own words in a stanza error's <text/> (RFC 6120 section 8.3.2), on one line, or ''."""
    text = stanza.xml.find(f"{{jabber:client}}error/{{{STANZA_ERROR_NS}}}text")
    return " ".join((text.text or "").split()) if text is not None else ""


def new_client(jid: str, password: str, ca_file: str | None) -> ClientXMPP:
    """A slixmpp client as every session of ours makes it: STARTTLS on the client port, never plaintext, the
    server's certificate verified (against `ca_file` when given), whitespace keepalives."""
    client = ClientXMPP(jid, password)
    client.enable_direct_tls = False  # port 5222 speaks STARTTLS; direct TLS first would only cost a try
    client.enable_plaintext = False
    client.whitespace_keepalive = True
    if ca_file is not None:
        client.ca_certs = Path(ca_file)
    return client


async def log_in(client: ClientXMPP, host: str, port: int, ca_file: str | None, timeout: float) -> None:
    """Connect `client` to `host`:`port` and wait for its session; raise BootstrapError with one line a person
    can act on (wrong password, unreachable server, certificate that does not verify, timeout)."""
    jid = JID(client.requested_jid)
    outcome: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()

    def finish(result: str | None) -> None:
        if not outcome.done():
            outcome.set_result(result)

    where = f"{host}:{port}"

    def started(_e: object) -> None:
        finish(None)

    def auth_failed(_e: object) -> None:
        finish(f"login as {jid.bare} was refused: check the password (or the account name)")

    def stream_error(e: Any) -> None:
        finish(f"server {where} closed the stream: {e['condition']} ({e['text']})")

    client.add_event_handler("session_start", started)
    client.add_event_handler("failed_all_auth", auth_failed)
    refused: list[bool] = []

    def connection_failed(e: object) -> None:
        refused.append(True)
        finish(f"cannot reach the XMPP server at {where} ({e}): check host, port and that it runs")

    client.add_event_handler("connection_failed", connection_failed)

    def tls_failed(error: object) -> None:
        hint = f"is {ca_file} the server's CA?" if ca_file else "set ca_file for a self-signed server"
        finish(f"TLS certificate of {where} for {jid.domain} did not verify ({error}): {hint}")

    def disconnected(reason: object) -> None:
        if isinstance(reason, ssl.SSLError):
            tls_failed(reason)
            return
        # A failed TLS handshake closes the transport before slixmpp reports ssl_invalid_chain: give that
        # report a moment to arrive so the person is told about the certificate, not a closed connection.
        loop.call_later(0.2, finish, f"server {where} closed the connection during login ({reason})")

    loop = asyncio.get_running_loop()
    client.add_event_handler("ssl_invalid_chain", tls_failed)
    client.add_event_handler("stream_error", stream_error)
    client.add_event_handler("disconnected", disconnected)
    client.connect(host, port)
    transient = False
    try:
        error = await asyncio.wait_for(outcome, timeout)
    except TimeoutError:
        error = f"no XMPP session with {where} within {timeout:g} s: check host, port and firewall"
        transient = True
    finally:
        # Each login adds its own handlers: a session logged in again (overlay/social/run.py) must not pile them up.
        handlers: tuple[tuple[str, Callable[..., None]], ...] = (
            ("session_start", started),
            ("failed_all_auth", auth_failed),
            ("connection_failed", connection_failed),
            ("ssl_invalid_chain", tls_failed),
            ("stream_error", stream_error),
            ("disconnected", disconnected),
        )
        for event, handler in handlers:
            client.del_event_handler(event, handler)
    if error is not None:
        # slixmpp retries a failed connection by itself, with its own backoff: a session that connects later,
        # behind our back, would log in beside the next attempt and one would replace the other ("conflict").
        client.cancel_connection_attempt()
        raise BootstrapError(error, transient=transient, unreachable=transient or bool(refused))
