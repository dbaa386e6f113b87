"""Where a link's packets go (its path) and the resolved `[ice]` settings: what every node needs of ICE and TURN.

Kept apart from overlay/transport/ice.py and turn.py because those load aioice (with dnspython and ifaddr,
~4 MB of resident memory), which only a node with an `[ice]` section uses: a node without one never imports them.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from overlay.wire import Endpoint

if TYPE_CHECKING:
    from overlay.transport.turn import TurnAllocation


@dataclass(frozen=True, slots=True)
class TurnServer:
    host: str
    port: int
    transport: str  # "udp", "tcp" or "tls" (a turns: URL)
    username: str
    password: str
    ca_file: str | None = None  # TLS: the certificates to trust instead of the system's (a private CA)

    def describe(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.transport == "tls":
            return f"turns:{host}:{self.port}?transport=tcp"
        return f"turn:{host}:{self.port}?transport={self.transport}"


class TurnPath:
    """Where a link's packets go when our own relayed candidate was chosen: through `allocation` to `peer`."""

    __slots__ = ("allocation", "kind", "peer")

    def __init__(self, allocation: TurnAllocation, peer: Endpoint) -> None:
        self.allocation = allocation
        self.peer = peer
        self.kind = "relay"

    def send(self, packet: bytes) -> None:
        self.allocation.send_to_peer(packet, self.peer)

    def describe(self) -> str:
        return f"{self.peer[0]}:{self.peer[1]} via {self.allocation.server.describe()}"


@dataclass(frozen=True)
class IceSettings:
    """The `[ice]` section, resolved."""

    stun: tuple[Endpoint, ...] = ()
    turn: tuple[TurnServer, ...] = ()
    # Never offered as host candidates: our own TAP, and addresses inside the VPN's subnet.
    exclude_interfaces: frozenset[str] = frozenset()
    exclude_networks: tuple[ipaddress.IPv4Network, ...] = ()


class DatagramSender(Protocol):
    local_endpoint: Endpoint

    def send(self, data: bytes, endpoint: Endpoint) -> None: ...

    def through_turn(self, endpoint: Endpoint) -> None: ...


class UdpPath:
    """A link's packets go out of the node's underlay socket to `endpoint`; `kind` is the ICE candidate type
    of the remote end that was chosen (host, srflx, prflx, or relay for a peer's TURN address)."""

    __slots__ = ("endpoint", "kind", "underlay")

    def __init__(self, underlay: DatagramSender, endpoint: Endpoint, kind: str = "host") -> None:
        self.underlay = underlay
        self.endpoint = endpoint
        self.kind = kind

    def send(self, packet: bytes) -> None:
        self.underlay.send(packet, self.endpoint)

    def describe(self) -> str:
        host, port = self.endpoint
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


IcePath = UdpPath | TurnPath
