"""Prometheus metrics: `[metrics] listen = "127.0.0.1:9469"` serves the node's counters in the text format.

Off by default. The HTTP side runs on the node's event loop (a scrape reads the node's tables between two of
its callbacks, never while one changes them), answers GET /metrics only, and closes each connection after one
answer; a request head larger than 8 KB or slower than 5 s is dropped. `prometheus_client` is imported only
when a node serves metrics (it costs an idle node ~2 MB otherwise).

What is exported (docs/operations.md lists each with its labels):
- links by kind (host, srflx, prflx, relay, tunnel) and the bytes they carried, closed links included;
- the virtual NIC's packets and bytes in and out (the kernel's counters of the TAP device);
- every counter of `status`: drops by reason, refusals by reason, and the rest (handshakes, lookups, ICE) as
  events;
- DHT records stored (ours and those held for others) and cached; end-to-end sessions; link round-trip times;
- XMPP: in the room, anchor, the membership state, the bootstrap's stanza and login counters.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from overlay.wire import Endpoint

if TYPE_CHECKING:
    from overlay.node import Node

log = logging.getLogger(__name__)

# Link RTTs from 0.1 ms (namespaces on one host) to 2 s (TURN across continents, a loaded relay).
RTT_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
LINK_KINDS = ("host", "srflx", "prflx", "relay", "tunnel")
HEAD_LIMIT = 8192
HEAD_TIMEOUT = 5.0


class Histogram:
    """Observations counted into fixed buckets (upper bounds, seconds), with their sum: what a Prometheus
    histogram needs, kept by the node whether or not metrics are served (one bisect per RTT sample)."""

    def __init__(self, bounds: tuple[float, ...] = RTT_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, count in zip((*(repr(b) for b in self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            out.append((bound, total))
        return out


def _tap_counters(name: str | None) -> dict[str, int]:
    """The kernel's counters of our TAP device (in the node's own network namespace), {} without one."""
    if not name:
        return {}
    base = Path("/sys/class/net") / name / "statistics"
    out = {}
    for key in ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets"):
        try:
            out[key] = int((base / key).read_text())
        except (OSError, ValueError):
            return {}
    return out


class NodeCollector:
    """A prometheus_client collector reading the node at scrape time."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        node = self.node
        status = node.status()
        info = GaugeMetricFamily("ipop_info", "This node", labels=["node_id", "address", "overlay", "room"])
        info.add_metric([status["node_id"], status["address"], status["overlay"]["id"], status["room"]], 1)
        yield info
        lanes = GaugeMetricFamily("ipop_lanes", "Engines of the compiled data path ([vnic] lanes; 0: the Python path)")
        lanes.add_metric([], status["lanes"])
        yield lanes

        kinds = GaugeMetricFamily("ipop_links", "Links by kind", labels=["kind"])
        by_kind = dict.fromkeys(LINK_KINDS, 0)
        for link in node.links.links.values():
            by_kind[link.kind] = by_kind.get(link.kind, 0) + 1
        for kind, n in sorted(by_kind.items()):
            kinds.add_metric([kind], n)
        yield kinds
        tx, rx = node.links.closed_bytes
        for link in node.links.links.values():
            tx, rx = tx + link.tx_bytes, rx + link.rx_bytes
        carried = CounterMetricFamily("ipop_link_bytes", "Bytes sent and received on links", labels=["direction"])
        carried.add_metric(["out"], tx)
        carried.add_metric(["in"], rx)
        yield carried

        tap = _tap_counters(getattr(node.datapath.tap, "name", None))
        if tap:
            for what in ("bytes", "packets"):
                vnic = CounterMetricFamily(f"ipop_vnic_{what}", f"{what.capitalize()} through the virtual NIC",
                                           labels=["direction"])  # fmt: skip
                # The kernel's view of the device: it transmits on the TAP what the machine sends into the VPN
                # (the node reads it) and receives what the node writes, traffic that came from the overlay.
                vnic.add_metric(["in"], tap[f"rx_{what}"])
                vnic.add_metric(["out"], tap[f"tx_{what}"])
                yield vnic
        data = CounterMetricFamily("ipop_data_packets_received", "Data packets delivered to this node")
        data.add_metric([], status["data_in"]["packets"])
        yield data

        drops = CounterMetricFamily("ipop_drops", "Packets and messages dropped, by reason", labels=["reason"])
        refusals = CounterMetricFamily("ipop_refusals", "Peers and records refused, by reason", labels=["reason"])
        events = CounterMetricFamily("ipop_events", "Everything else the node counts", labels=["event"])
        counters = dict(status["counters"])
        if status["trust"] is not None:
            counters.update(status["trust"].get("counters", {}))
        for name, value in sorted(counters.items()):
            if name.startswith("drop: "):
                drops.add_metric([name[6:]], value)
            elif name.startswith("refused: "):
                refusals.add_metric([name[9:]], value)
            else:
                events.add_metric([name], value)
        yield from (drops, refusals, events)

        dht = GaugeMetricFamily("ipop_dht_records", "DHT records", labels=["kind"])
        for kind in ("stored", "cached"):
            dht.add_metric([kind], status["dht"][kind])
        yield dht
        e2e = GaugeMetricFamily("ipop_e2e_sessions", "End-to-end sessions with members we are not linked to")
        e2e.add_metric([], len(node.e2e.peers()))
        yield e2e

        rtt = HistogramMetricFamily("ipop_link_rtt_seconds", "Round-trip times measured on links")
        rtt.add_metric([], node.rtt_seconds.cumulative(), sum_value=node.rtt_seconds.sum)
        yield rtt

        yield from _xmpp(status["membership"], GaugeMetricFamily, CounterMetricFamily)


def _xmpp(membership: dict[str, Any] | None, gauge: Any, counter: Any) -> Iterator[Any]:
    if membership is None:
        return
    for name, value, what in (
        ("ipop_xmpp_in_room", membership["in_room"], "Whether the node is in the group's XMPP room now"),
        ("ipop_xmpp_anchor", membership["anchor"], "Whether the node is an anchor of the room"),
    ):
        g = gauge(name, what)
        g.add_metric([], int(bool(value)))
        yield g
    state = gauge("ipop_membership_state", "The node's membership state", labels=["state"])
    for name in ("starting", "joining", "rejoining", "member", "founder"):
        state.add_metric([name], int(membership["state"] == name))
    yield state
    stats = counter("ipop_xmpp", "XMPP stanzas, logins and errors", labels=["what"])
    for name, value in sorted(membership["xmpp"].items()):
        stats.add_metric([name], value)
    yield stats


class MetricsServer:
    """The /metrics endpoint on the node's event loop."""

    def __init__(self, listen: Endpoint, node: Node) -> None:
        self.listen = listen
        self.node = node
        self._server: asyncio.Server | None = None
        self._registry: Any = None

    async def start(self) -> None:
        """Bind and serve; OSError if the address cannot be bound (in use, not ours)."""
        from prometheus_client import CollectorRegistry

        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(NodeCollector(self.node))
        self._server = await asyncio.start_server(self._serve, self.listen[0], self.listen[1], limit=HEAD_LIMIT)
        log.info("metrics on http://%s/metrics", self.address)

    @property
    def address(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
            writer.write(self.answer(head))
            await asyncio.wait_for(writer.drain(), HEAD_TIMEOUT)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass  # a client that went away or sent more than a request head: nothing to answer
        finally:
            writer.close()

    def answer(self, head: bytes) -> bytes:
        """The whole HTTP/1.1 response to a request head."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return _response(400, "Bad Request", b"bad request\n")
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return _response(405, "Method Not Allowed", b"only GET\n", extra="Allow: GET, HEAD\r\n")
        if target != b"/metrics":
            return _response(404, "Not Found", b"try /metrics\n")
        try:
            body = generate_latest(self._registry)
        except Exception:  # a fault of ours while reading the node: say so, and keep serving
            log.exception("metrics: could not collect")
            return _response(500, "Internal Server Error", b"could not collect; see the node's log\n")
        response = _response(200, "OK", body, content_type=CONTENT_TYPE_LATEST)
        return response[: len(response) - len(body)] if method == b"HEAD" else response


def _response(code: int, reason: str, body: bytes, *, content_type: str = "text/plain", extra: str = "") -> bytes:
    head = (
        f"HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        f"{extra}Connection: close\r\n\r\n"
    )
    return head.encode() + body
