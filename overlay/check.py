"""`ipop-overlay check`: try what `join` needs from a config, without joining.

It reads the node key (and the group key on an issuer), opens a TCP connection to the XMPP server, asks every
STUN server one STUN Binding request, makes an allocation on every TURN server with its credentials and releases
it at once, and binds the UDP listen address. It creates no TAP device, does not log in and does not enter the
room, so it needs no root and changes nothing on the server. Each check
is a function returning a `Check` record; `run_checks` runs the network ones side by side (each bounded by the
timeout) and `report_lines` turns the records into what the command prints.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import ssl
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from overlay.config import NodeConfig
from overlay.configvalues import resolve_address6
from overlay.control import socket_in_use
from overlay.identity import Identity, KeyFileError
from overlay.ids import format_id
from overlay.transport.paths import TurnServer
from overlay.trust.groupkey import format_public_key
from overlay.trust.issuer import IssuerError, open_issuer
from overlay.wire import Endpoint

STUN_RTO = 0.5  # RFC 5389 section 7.2.1: first retransmission after 500 ms, doubling each time

# Our choice: long enough for a server across the world and a few lost datagrams, short enough to wait for.
DEFAULT_TIMEOUT = 5.0


@dataclass(frozen=True)
class Check:
    """One thing `join` needs and whether it is there: `what` names it, `detail` says how it went or why not."""

    ok: bool
    what: str
    detail: str

    def line(self) -> str:
        return f"{'ok' if self.ok else 'FAIL':4} {self.what} {self.detail}"


@dataclass(frozen=True)
class Report:
    checks: tuple[Check, ...]
    node_id: int | None  # None when the key file is unusable

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


# -- STUN Binding (RFC 5389), just enough to ask a server and read its answer --


@dataclass(frozen=True)
class BindingAnswer:
    success: bool
    mapped: Endpoint | None  # where the server saw our request come from
    error: str | None  # ERROR-CODE of an error response, "401 Unauthorized"


def binding_request(transaction_id: bytes) -> bytes:
    """A Binding request without attributes (RFC 5389 section 6), made by aioice's STUN codec as the node's
    ICE agent makes its own (overlay/transport/ice.py)."""
    from aioice import stun

    if len(transaction_id) != 12:
        raise ValueError(f"a STUN transaction ID is 12 bytes, got {len(transaction_id)}")
    return bytes(stun.Message(stun.Method.BINDING, stun.Class.REQUEST, transaction_id=transaction_id))


def parse_binding_answer(data: bytes, transaction_id: bytes) -> BindingAnswer | None:
    """The answer to our request in `data`, or None for anything else (another transaction, not STUN, a
    truncated or malformed message): the bytes come from the network, nothing raises."""
    from aioice import stun

    try:
        message = stun.parse_message(data)
    except Exception:  # aioice's parser raises several types on hostile bytes; all mean "not an answer"
        return None
    if (
        message.message_method != stun.Method.BINDING
        or message.message_class not in (stun.Class.RESPONSE, stun.Class.ERROR)
        or message.transaction_id != transaction_id
    ):
        return None
    # RFC 3489 servers send only MAPPED-ADDRESS.
    mapped = message.attributes.get("XOR-MAPPED-ADDRESS") or message.attributes.get("MAPPED-ADDRESS")
    code = message.attributes.get("ERROR-CODE")
    error = f"{code[0]} {code[1]}".strip() if code else None
    return BindingAnswer(
        message.message_class == stun.Class.RESPONSE, (str(mapped[0]), int(mapped[1])) if mapped else None, error
    )


# -- the checks --


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _ms(start: float) -> str:
    return f"{(time.monotonic() - start) * 1000:.0f} ms"


def check_node_key(path: Path) -> tuple[Check, int | None]:
    try:
        identity = Identity.load(path)
    except KeyFileError as e:
        return Check(False, "node key", str(e)), None
    return Check(True, "node key", f"{path} (node {format_id(identity.node_id)})"), identity.node_id


def check_issuer(cfg: NodeConfig) -> Check:
    """What `join` loads on an issuer: the group's private key, which must match the pinned public key, and the
    state file (allocations, members, revocations) when there is one."""
    assert cfg.issuer is not None
    c, what = cfg.issuer, f"issuer group key {cfg.issuer.group_key}"
    assert cfg.group_key is not None  # load_config refuses an [issuer] without it
    try:
        open_issuer(c.group_key, cfg.group_key, cfg.room, c.subnet, float(c.lifetime), c.state_file, time.time())
    except KeyFileError as e:
        return Check(False, "issuer group key", str(e))
    except IssuerError as e:
        return Check(False, what, str(e))
    state = f"state {cfg.issuer.state_file}" if cfg.issuer.state_file.exists() else "no state file yet"
    return Check(True, what, f"matches [group] public_key ({state})")


def check_control_socket(path: Path) -> Check:
    what = f"control socket {path}"
    if socket_in_use(path):
        return Check(False, what, "is in use: is another node running with this config? set [node] control_socket")
    return Check(True, what, "is free")


def check_listen(listen: Endpoint) -> Check:
    """Bind the underlay UDP address as `join` will (overlay/transport/underlay.py), then let it go."""
    host, port = listen
    what = f"udp listen address {_where(host, port)}"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.bind(listen)
    except OSError as e:
        hint = "is a node already running?" if e.errno == errno.EADDRINUSE else "check [node] listen"
        return Check(False, what, f"cannot be bound: {e.strerror}; {hint}")
    return Check(True, what, "can be bound")


def check_tcp(what: str, host: str, port: int, timeout: float) -> Check:
    """A TCP connection that opens within `timeout`: the server's address resolves, something listens."""
    what = f"{what} {_where(host, port)}"
    start = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        return Check(False, what, _tcp_failure(e, host, port, timeout))
    return Check(True, what, f"reachable ({_ms(start)})")


def _tcp_failure(e: OSError, host: str, port: int, timeout: float) -> str:
    if isinstance(e, socket.gaierror):
        return f"unreachable: cannot resolve {host} ({e.strerror})"
    if isinstance(e, TimeoutError):
        return f"unreachable: no answer within {timeout:g} s (down, or a firewall drops it)"
    if isinstance(e, ConnectionRefusedError):
        return f"unreachable: connection refused (nothing listens on tcp port {port})"
    return f"unreachable: {e.strerror or e}"


def check_tls(what: str, host: str, port: int, ca_file: str | None, timeout: float) -> Check:
    """A TLS connection whose handshake completes within `timeout` with a certificate that names `host`, trusted
    by the system or by `ca_file`: what a turns: allocation needs before its first request."""
    what = f"{what} {_where(host, port)}"
    start = time.monotonic()
    context = ssl.create_default_context(cafile=ca_file)
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=host):
                pass
    except ssl.SSLCertVerificationError as e:
        trust = (
            f"the certificates in {ca_file}" if ca_file else "the system's certificates (set ca_file for a private CA)"
        )
        return Check(False, what, f"TLS: certificate not accepted ({e.verify_message}; trusted: {trust})")
    except ssl.SSLError as e:
        return Check(False, what, f"TLS: handshake failed ({e.reason or e}): is it a TLS listener?")
    except OSError as e:
        return Check(False, what, _tcp_failure(e, host, port, timeout))
    return Check(True, what, f"TLS handshake done, certificate accepted ({_ms(start)})")


def check_stun(what: str, server: Endpoint, timeout: float) -> Check:
    """One Binding transaction over UDP, retransmitted on RFC 5389's schedule until `timeout`. TURN servers
    answer Binding requests too (RFC 5766 section 2: a TURN server is a STUN server), without credentials."""
    host, port = server
    what = f"{what} {_where(host, port)}"
    transaction_id = os.urandom(12)
    request = binding_request(transaction_id)
    start = time.monotonic()
    deadline, resend, rto = start + timeout, start, STUN_RTO
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    except socket.gaierror as e:
        return Check(False, what, f"unreachable: cannot resolve {host} ({e.strerror})")
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            # Connected, so an ICMP port unreachable comes back as ConnectionRefusedError.
            sock.connect(address)
            while (now := time.monotonic()) < deadline:
                if now >= resend:
                    sock.send(request)
                    resend, rto = now + rto, rto * 2
                # Never 0: a zero timeout makes the socket non-blocking and recv raise BlockingIOError.
                sock.settimeout(max(0.001, min(resend, deadline) - now))
                try:
                    data = sock.recv(2048)
                except TimeoutError:
                    continue
                answer = parse_binding_answer(data, transaction_id)
                if answer is None:
                    continue
                if not answer.success:
                    return Check(False, what, f"answered the STUN Binding request with error {answer.error or '?'}")
                seen = f", sees us as {_where(*answer.mapped)}" if answer.mapped else ""
                return Check(True, what, f"answered ({_ms(start)}){seen}")
    except ConnectionRefusedError:
        return Check(False, what, f"unreachable: port unreachable (nothing listens on udp port {port})")
    except OSError as e:
        return Check(False, what, f"unreachable: {e.strerror or e}")
    return Check(False, what, f"no STUN answer within {timeout:g} s (down, UDP blocked, or not a STUN server)")


# RFC 8656 section 19 and RFC 8489 section 14.8: the error codes an Allocate meets when the fault is ours to fix.
_CREDENTIALS_REFUSED = {401: "Unauthorized", 403: "Forbidden", 441: "Wrong Credentials"}
_NO_ROOM = {486: "Allocation Quota Reached", 508: "Insufficient Capacity"}


def check_turn(server: TurnServer, timeout: float) -> Check:
    """A TURN server reachable as its transport needs (check_tls, check_tcp, check_stun), then an allocation made
    with the configured credentials and released at once (RFC 8656 section 7): what a wrong username or password,
    or a server out of relay ports, fails and a reachability test alone does not."""
    what = f"turn server ({server.transport})"
    if server.transport == "tls":
        reached = check_tls(what, server.host, server.port, server.ca_file, timeout)
    elif server.transport == "tcp":
        reached = check_tcp(what, server.host, server.port, timeout)
    else:
        reached = check_stun(what, (server.host, server.port), timeout)
    if not reached.ok:
        return reached
    start = time.monotonic()
    try:
        relayed = asyncio.run(_allocate_once(server, timeout))
    except TimeoutError:
        return Check(False, reached.what, f"{reached.detail}; no allocation within {timeout:g} s")
    except Exception as e:  # aioice's TransactionFailed/TransactionTimeout, OSError, ConnectionError
        return Check(False, reached.what, f"{reached.detail}; {_allocation_failure(e, server)}")
    return Check(True, reached.what, f"{reached.detail}; allocated {relayed[0]}:{relayed[1]} as {server.username!r}, "
                                     f"released ({_ms(start)})")  # fmt: skip


async def _allocate_once(server: TurnServer, timeout: float) -> Endpoint:
    from overlay.transport.turn import TurnAllocation  # aioice loads only for a config with TURN servers

    allocation = TurnAllocation(server, lambda *_: None, lambda *_: None)
    try:
        return await asyncio.wait_for(allocation.allocate(), timeout)
    finally:
        await allocation.close()


def _allocation_failure(e: Exception, server: TurnServer) -> str:
    response = getattr(e, "response", None)
    code, reason = response.attributes.get("ERROR-CODE", (0, "")) if response is not None else (0, "")
    if code in _CREDENTIALS_REFUSED:
        return f"credentials refused ({code} {reason}): check the username {server.username!r} and its password"
    if code in _NO_ROOM:
        return f"no allocation for us ({code} {reason}): the server is at its quota or out of relay ports"
    if code:
        return f"allocation refused ({code} {reason})"
    return f"allocation failed: {e}"


def xmpp_host(cfg: NodeConfig) -> str:
    """Where `join` connects: [xmpp] host, or the JID's domain (xmpp_bootstrap/client.py)."""
    return cfg.host or cfg.jid.partition("@")[2].split("/")[0]


def run_checks(cfg: NodeConfig, timeout: float = DEFAULT_TIMEOUT) -> Report:
    key, node_id = check_node_key(cfg.key)
    local = [key]
    if cfg.issuer is not None:
        local.append(check_issuer(cfg))
    local += [check_control_socket(cfg.control_socket), check_listen(cfg.listen)]
    probes: list[Callable[[], Check]] = [partial(check_tcp, "xmpp server", xmpp_host(cfg), cfg.port, timeout)]
    probes += [partial(check_stun, "stun server", server, timeout) for server in cfg.stun]
    probes += [partial(check_turn, turn, timeout) for turn in cfg.turn]
    # Side by side, so a config with several unreachable servers takes one timeout, not one per server.
    with ThreadPoolExecutor(max_workers=len(probes)) as pool:
        remote = list(pool.map(lambda probe: probe(), probes))
    return Report(tuple(local + remote), node_id)


def report_lines(cfg: NodeConfig, report: Report) -> list[str]:
    """One line per check, then what `join` would do with this config."""
    lines = [c.line() for c in report.checks]
    node = format_id(report.node_id) if report.node_id is not None else "? (the key file is unusable)"
    if cfg.vnic_address:
        vnic = f"{cfg.vnic_name} with {cfg.vnic_address}"
    else:
        vnic = f"{cfg.vnic_name} with an address from the issuer"
    if cfg.vnic_address6 and report.node_id is not None:
        vnic += f" and {resolve_address6(cfg.vnic_address6, report.node_id)}"
    elif cfg.vnic_address6:
        vnic += f" and an address in {cfg.vnic_address6}"
    if cfg.social is not None:
        group = (
            "link only to its friends' devices, each key pinned on first use (social.state next to the key); "
            f"names under .{cfg.social.domain} answered at {cfg.social.dns}"
        )
    elif cfg.group_key is None:
        group = "admit anyone who reaches it ([group] open = true: no certificates)"
    else:
        role = " (this node is an issuer: it signs them)" if cfg.issuer else ""
        group = f"prove membership with a certificate from group key {format_public_key(cfg.group_key)}{role}"
    if cfg.ice:
        ice = f"on ({len(cfg.stun)} STUN, {len(cfg.turn)} TURN server(s))"
    else:
        ice = "off (direct links and tunnels only)" if cfg.social is None else "off (direct links only)"
    lines += [
        "",
        "join would:",
        f"  log in to {_where(xmpp_host(cfg), cfg.port)} as {cfg.jid} and "
        + (f"enter room {cfg.room}" if cfg.social is None else "watch its friends (the roster: mutual subscriptions)"),
        f"  run as node {node}",
        f"  {group}",
        f"  create TAP device {vnic} (mtu {cfg.vnic_mtu})",
        f"  listen for tunnels on udp {_where(*cfg.listen)}, ICE {ice}",
        f"  answer 'ipop-overlay status' on {cfg.control_socket}",
    ]
    return lines
