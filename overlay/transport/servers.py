"""STUN and TURN servers named by address or by DNS name: as `[ice]` writes them, and resolved.

A name is resolved when it is used, not when the configuration is read: a node may start before its resolver
answers (a laptop joining a network), and a server may move to another address. STUN servers are asked every
SRFLX_REFRESH (overlay/transport/ice.py), so their names are resolved again at most every RESOLVE_EVERY; a TURN
server's name is resolved at each allocation (UDP) or connection (TCP, TLS). A name that does not resolve costs
that round, counted and logged, never the node.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket

from overlay.wire import Endpoint

RESOLVE_TIMEOUT = 10.0  # our choice: glibc's default for one name server (resolv.conf(5): 2 tries of 5 s)
RESOLVE_EVERY = 300.0  # our choice: a moved server is followed within minutes; ~1 lookup per server per node

# RFC 1123 section 2.1 host names: dot-separated labels of letters, digits and hyphens, 1-63 characters, no
# hyphen at either end, 253 characters at most (RFC 1035 section 2.3.4, without the root's trailing dot).
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?")


def is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def server_host(host: str) -> str:
    """`host` as a configured server: an IP address or a DNS name; ValueError otherwise."""
    if is_address(host) or _HOSTNAME.fullmatch(host):
        return host
    raise ValueError(f"{host!r} is neither an IP address nor a host name")


def parse_server(text: str, default_port: int | None = None) -> tuple[str, int]:
    """A server written HOST[:PORT] (the port required without `default_port`): HOST an IP address, IPv6 in
    brackets, or a DNS name; ValueError naming what is wrong."""
    if text.startswith("["):
        host, _, tail = text[1:].partition("]")
        ipaddress.IPv6Address(host)
        port = tail[1:] if tail.startswith(":") else ""
    elif text.count(":") == 1:
        host, port = text.split(":")
    elif ":" in text:
        raise ValueError(f"{text!r}: an IPv6 address goes in brackets, like [2001:db8::1]:3478")
    else:
        host, port = text, ""
    if not port:
        if default_port is None:
            raise ValueError(f'{text!r}: expected "host:port"')
        port = str(default_port)
    p = int(port)
    if not 0 < p <= 65535:
        raise ValueError(f"{text!r}: port out of range")
    return server_host(host), p


def parse_turn_url(text: str) -> tuple[str, int, str]:
    """turn:HOST[:PORT][?transport=udp|tcp] or turns:HOST[:PORT][?transport=tcp] (RFC 7065) as (host, port,
    transport "udp", "tcp" or "tls"): the port 3478 when not given, 5349 for turns (TLS over TCP; no DTLS)."""
    scheme, colon, rest = text.partition(":")
    if scheme not in ("turn", "turns") or not colon:
        raise ValueError(f"{text!r} is not a turn: or turns: URL like turn:198.18.0.2:3478?transport=udp")
    where, _, query = rest.partition("?")
    transport = "tls" if scheme == "turns" else "udp"
    if query:
        key, eq, val = query.partition("=")
        allowed = ("tcp",) if scheme == "turns" else ("udp", "tcp")
        if key != "transport" or not eq or val not in allowed:
            raise ValueError(f"{text!r}: the only query is " + " or ".join(f"transport={a}" for a in allowed))
        transport = "tls" if scheme == "turns" else val
    host, port = parse_server(where, 5349 if scheme == "turns" else 3478)  # RFC 7065 section 3
    return host, port, transport


async def resolve(server: Endpoint, family: int = socket.AF_UNSPEC) -> Endpoint:
    """The address and port of `server` (its own when it is an address); OSError when the name does not resolve
    to an address of `family` within RESOLVE_TIMEOUT."""
    host, port = server
    if is_address(host):
        return server
    loop = asyncio.get_running_loop()
    # An IPv6 socket (listening on "::") reaches an IPv4-only server at its IPv4-mapped address.
    flags = socket.AI_V4MAPPED if family == socket.AF_INET6 else 0
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM, flags=flags), RESOLVE_TIMEOUT
        )
    except TimeoutError:
        raise OSError(f"cannot resolve {host}: no answer within {RESOLVE_TIMEOUT:g} s") from None
    except socket.gaierror as e:
        raise OSError(f"cannot resolve {host}: {e.strerror}") from None
    if not infos:
        raise OSError(f"cannot resolve {host}: no address")
    address = infos[0][4]
    return str(address[0]), int(address[1])


class Resolved:
    """The addresses of a few named servers, each looked up again after RESOLVE_EVERY or when forgotten."""

    def __init__(self, family: int) -> None:
        self.family = family
        self._cache: dict[Endpoint, tuple[Endpoint, float]] = {}

    async def address(self, server: Endpoint, now: float) -> Endpoint:
        if is_address(server[0]):
            return server
        hit = self._cache.get(server)
        if hit is not None and now - hit[1] < RESOLVE_EVERY:
            return hit[0]
        address = await resolve(server, self.family)
        self._cache[server] = (address, now)
        return address

    def forget(self, server: Endpoint) -> None:
        """The server did not answer at the address we have: look its name up again next time."""
        self._cache.pop(server, None)
