"""/metrics: a real HTTP client scrapes a node of a running memory group, the text parses as Prometheus' own
parser reads it, and the counters move when packets flow; anything but GET /metrics gets a clear HTTP error."""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from overlay.config import load_config
from overlay.metrics import Histogram, MetricsServer
from tests.support.memgroup import MemoryGroup


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def get(url: str, method: str = "GET") -> tuple[int, str, str]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status, answer.headers.get("Content-Type", ""), answer.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


def test_a_scrape_shows_links_data_and_xmpp_and_the_counters_move_when_packets_flow() -> None:
    async def scenario() -> None:
        g = MemoryGroup(seed=3)
        try:
            assert await g.form_ring(5, 30.0)
            server = MetricsServer(("127.0.0.1", 0), g.nodes[0])
            await server.start()
            url = f"http://{server.address}/metrics"
            status, content_type, text = await asyncio.to_thread(get, url)
            assert status == 200 and content_type.startswith("text/plain; version=")
            before = samples(text)
            links = sum(v for (name, _), v in before.items() if name == "ipop_links")
            assert links == len(g.nodes[0].links.links) > 0
            assert before[("ipop_xmpp_in_room", ())] in (0.0, 1.0)
            assert before[("ipop_lanes", ())] == 0.0  # a memory TAP: the Python data path
            assert (
                before[("ipop_membership_state", (("state", "member"),))]
                + before[("ipop_membership_state", (("state", "founder"),))]
                == 1.0
            )
            assert ("ipop_link_rtt_seconds_count", ()) in before
            info = next(k for k in before if k[0] == "ipop_info")
            assert ("node_id", f"{g.nodes[0].id:016x}") in info[1]

            # Node 0 sends to every other member and hears back from them.
            sent = [g.send(0, j, b"metrics %d" % j) for j in range(1, 5)]
            sent += [g.send(j, 0, b"back %d" % j) for j in range(1, 5)]
            assert await g.reach([(0, j) for j in range(1, 5)] + [(j, 0) for j in range(1, 5)], 15.0) == []
            _, _, text = await asyncio.to_thread(get, url)
            after = samples(text)
            for direction in ("in", "out"):
                key = ("ipop_link_bytes_total", (("direction", direction),))
                assert after[key] > before[key], direction
            delivered = ("ipop_data_packets_received_total", ())
            assert after[delivered] >= before[delivered] + 4
            await server.stop()
        finally:
            await g.stop()

    run(scenario())


def test_anything_but_get_metrics_is_an_http_error_and_a_broken_request_is_dropped() -> None:
    async def scenario() -> None:
        g = MemoryGroup(seed=4)
        try:
            await g.add_node()
            server = MetricsServer(("127.0.0.1", 0), g.nodes[0])
            await server.start()
            base = f"http://{server.address}"
            assert (await asyncio.to_thread(get, base + "/"))[0] == 404
            assert (await asyncio.to_thread(get, base + "/metrics", "POST"))[0] == 405
            status, _, body = await asyncio.to_thread(get, base + "/metrics", "HEAD")
            assert status == 200 and body == ""
            host, port = server.address.rsplit(":", 1)

            def raw(data: bytes) -> bytes:
                with socket.create_connection((host, int(port)), timeout=5) as s:
                    s.sendall(data)
                    s.shutdown(socket.SHUT_WR)
                    return s.recv(65536)

            assert (await asyncio.to_thread(raw, b"nonsense\r\n\r\n")).startswith(b"HTTP/1.1 400")
            # A head beyond 8 KB is dropped without an answer; the server goes on answering.
            assert await asyncio.to_thread(raw, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n") == b""
            assert (await asyncio.to_thread(get, base + "/metrics"))[0] == 200
            await server.stop()
        finally:
            await g.stop()

    run(scenario())


def test_histogram_buckets_are_cumulative_upper_bounds() -> None:
    h = Histogram((0.001, 0.01))
    for v in (0.0005, 0.001, 0.002, 5.0):
        h.observe(v)
    assert h.cumulative() == [("0.001", 2), ("0.01", 3), ("+Inf", 4)]
    assert abs(h.sum - 5.0035) < 1e-9


def test_metrics_are_off_by_default_and_on_loopback_when_the_section_is_there(tmp_path: Path) -> None:
    base = """[node]\nkey = "k"\n[xmpp]\njid = "a@example.test/n"\npassword = "p"\nroom = "g@conference.example.test"
[vnic]\naddress = "10.1.0.1/16"\n[group]\nopen = true\n"""
    path = tmp_path / "node.toml"
    path.write_text(base)
    assert load_config(path).metrics is None
    path.write_text(base + "[metrics]\n")
    assert load_config(path).metrics == ("127.0.0.1", 9469)
    path.write_text(base + '[metrics]\nlisten = "[::1]:9100"\n')
    assert load_config(path).metrics == ("::1", 9100)
