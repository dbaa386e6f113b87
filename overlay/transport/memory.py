"""The in-memory underlay: many endpoints in one process, for tests, the in-process groups and benchmarks.

Same contract as the UDP underlay (overlay/transport/underlay.py), with latency, loss, reordering (jitter),
partitions and oversize drops chosen by the caller, and never a socket.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from overlay.transport.underlay import DatagramHandler, ignore_endpoint
from overlay.wire import Endpoint


@dataclass
class MemoryNetwork:
    """Many underlay endpoints in one process, with latency, loss, reordering (jitter) and partitions."""

    latency: float = 0.0
    jitter: float = 0.0
    loss: float = 0.0
    seed: int = 0
    # Datagrams longer than this are dropped and counted in `oversize`: a path that drops IP fragments.
    max_datagram: int | None = None
    # True: a datagram to an endpoint nobody listens on is answered with an ICMP port unreachable (the sender's
    # `unreachable`, after `latency`), as the host of a crashed process does. False: silence, a vanished host.
    unreachable: bool = False
    _nodes: dict[Endpoint, MemoryUnderlay] = field(default_factory=dict)
    _blocked: set[frozenset[Endpoint]] = field(default_factory=set)
    _next: int = 1
    delivered: int = 0
    dropped: int = 0
    oversize: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def endpoint(self) -> Endpoint:
        """A fresh endpoint; in-process only, never a socket address."""
        n = self._next
        self._next += 1
        return (f"198.19.{n >> 8 & 255}.{n & 255}", 5800)

    def block(self, a: Endpoint, b: Endpoint) -> None:
        self._blocked.add(frozenset((a, b)))

    def unblock(self, a: Endpoint, b: Endpoint) -> None:
        self._blocked.discard(frozenset((a, b)))

    def _carry(self, data: bytes, src: Endpoint, dst: Endpoint) -> None:
        if self.max_datagram is not None and len(data) > self.max_datagram:
            self.oversize += 1
            self.dropped += 1
            return
        node = self._nodes.get(dst)
        if node is None or frozenset((src, dst)) in self._blocked or (self.loss and self._rng.random() < self.loss):
            self.dropped += 1
            sender = self._nodes.get(src)
            if node is None and self.unreachable and sender is not None:
                asyncio.get_running_loop().call_later(self.latency, sender.unreachable, dst)
            return
        self.delivered += 1
        delay = self.latency + (self._rng.random() * self.jitter if self.jitter else 0.0)
        loop = asyncio.get_running_loop()
        if delay > 0:
            loop.call_later(delay, node._arrive, data, src)
        else:
            loop.call_soon(node._arrive, data, src)


class MemoryUnderlay:
    def __init__(self, network: MemoryNetwork, endpoint: Endpoint | None = None) -> None:
        self.network = network
        self.local_endpoint: Endpoint = endpoint or network.endpoint()
        self.counters: dict[str, int] = {"send_failed": 0, "recv_errors": 0, "stun_dropped": 0}
        self._handler: DatagramHandler | None = None
        self.on_unreachable: Callable[[Endpoint], None] = ignore_endpoint
        self.on_stun: DatagramHandler = self._no_stun

    def _no_stun(self, data: bytes, endpoint: Endpoint) -> None:
        self.counters["stun_dropped"] += 1

    def start(self, on_datagram: DatagramHandler) -> None:
        self._handler = on_datagram
        self.network._nodes[self.local_endpoint] = self

    def unreachable(self, endpoint: Endpoint) -> None:
        if self._handler is not None:
            self.counters["ICMP: unreachable"] = self.counters.get("ICMP: unreachable", 0) + 1
            self.on_unreachable(endpoint)

    def _arrive(self, data: bytes, src: Endpoint) -> None:
        if self._handler is None:
            return
        if data and data[0] < 0x80:
            self.on_stun(data, src)
        else:
            self._handler(data, src)

    def hold(self) -> None:
        """Nothing to batch in memory: datagrams are delivered one by one, as sent."""

    def flush(self) -> None:
        pass

    def through_turn(self, endpoint: Endpoint) -> None:
        """Nothing is cut into chunks in memory."""

    def send(self, data: bytes, endpoint: Endpoint) -> None:
        if self._handler is None:
            self.counters["send_failed"] += 1
            return
        self.network._carry(data, self.local_endpoint, endpoint)

    def close(self) -> None:
        self._handler = None
        self.network._nodes.pop(self.local_endpoint, None)
