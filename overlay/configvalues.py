"""The checks of single configuration values: each takes what TOML gave and returns it typed, or raises a
ValueError in words a person can act on; overlay/config.py adds the file and the key (one `ConfigError` line).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from typing import Any

from overlay.ids import derived_address6
from overlay.tap.vnic import check_address6
from overlay.transport.servers import parse_server
from overlay.wire import Endpoint


def string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string")
    return value


def int_range(lo: int, hi: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"expected a whole number from {lo} to {hi}")
        return value

    return check


def lanes(value: Any) -> int:
    if value == "auto":
        # Our choice: one Engine per two CPUs, leaving the other for the applications the traffic is for, at most
        # 4; but two wherever there are two CPUs: on a 2-core host two lanes carried 1.3-1.5x one lane's rate with
        # four streams, at the same one-stream rate and idle RTT (docs/datapath.md, Lanes).
        cpus = len(os.sched_getaffinity(0))
        return min(cpus, 2) if cpus < 4 else min(4, cpus // 2)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 8:
        raise ValueError('expected "auto" or a whole number from 1 to 8')
    return value


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def choice(*options: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in options:
            raise ValueError(f"expected one of {', '.join(repr(o) for o in options)}")
        return str(value)

    return check


def endpoint(value: Any) -> Endpoint:
    text = string(value)
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError('expected "address:port"')
    host = host.strip("[]")
    ipaddress.ip_address(host)
    p = int(port)
    if not 0 <= p <= 65535:
        raise ValueError("port out of range")
    return host, p


def server(value: Any) -> Endpoint:
    """A STUN server, "HOST:PORT": an IP address (IPv6 in brackets) or a DNS name (overlay/transport/servers.py)."""
    return parse_server(string(value))


def server_list(value: Any) -> tuple[Endpoint, ...]:
    if not isinstance(value, list):
        raise ValueError('expected a list like ["198.18.0.2:3478", "stun.example.org:3478"]')
    return tuple(server(v) for v in value)


def jid(value: Any) -> str:
    text = string(value)
    local, at, rest = text.partition("@")
    if not at or not local or not rest.split("/")[0]:
        raise ValueError('expected "user@domain" or "user@domain/resource"')
    return text


def interface(value: Any) -> str:
    iface = ipaddress.IPv4Interface(string(value))
    if iface.network.prefixlen > 30 or iface.ip in (
        iface.network.network_address,
        iface.network.broadcast_address,
    ):
        raise ValueError("expected a host address with a prefix of /30 or shorter, like 10.254.0.1/16")
    return str(iface)


def interface6(value: Any) -> str:
    iface = ipaddress.IPv6Interface(string(value))
    try:
        if is_prefix6(str(iface)):
            if iface.network.prefixlen > 64:
                raise ValueError("a prefix to derive the address from must be /64 or shorter")
            check_address6(derived_address6(int(iface.ip), 1), iface.network.prefixlen)
        else:
            check_address6(int(iface.ip), iface.network.prefixlen)
    except ValueError as e:
        raise ValueError(f'{e}; expected a prefix like "fd12:3456:789a:1::/64" or a host address in one') from None
    return str(iface)


def is_prefix6(text: str) -> bool:
    """Whether [vnic] address6 `text` is a prefix (host bits zero) rather than a host address."""
    iface = ipaddress.IPv6Interface(text)
    return int(iface.ip) & int(iface.network.hostmask) == 0


def resolve_address6(text: str, node_id: int) -> str:
    """The node's IPv6 interface ("addr/len") for [vnic] address6 `text`: a prefix gets the node ID as its
    interface ID (overlay/ids.py derived_address6); a host address stays as written."""
    iface = ipaddress.IPv6Interface(text)
    if not is_prefix6(text):
        return str(iface)
    return f"{ipaddress.IPv6Address(derived_address6(int(iface.ip), node_id))}/{iface.network.prefixlen}"


def subnet(value: Any) -> ipaddress.IPv4Network:
    net = ipaddress.IPv4Network(string(value), strict=True)
    if net.prefixlen > 30:
        raise ValueError("expected a network of /30 or larger, like 10.254.0.0/16")
    return net


def domain(value: Any) -> str:
    text = string(value).strip(".").lower()
    if not all(label.isascii() and label.replace("-", "").isalnum() for label in text.split(".")):
        raise ValueError('expected a DNS name of letters, digits and hyphens, like "ipop"')
    return text


def ifname(value: Any) -> str:
    text = string(value)
    if len(text) > 15 or "/" in text or " " in text:
        raise ValueError("expected an interface name of at most 15 characters")
    return text
