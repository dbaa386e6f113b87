"""STUN and TURN servers by name, and TURN over TLS (turns:), against a real coturn on loopback.

The ICE agent asks a STUN server by name from the node's own socket and allocates on coturn's TLS listener with
a private CA (`ca_file`); link packets cross between a TLS and a UDP allocation on channels; a certificate from
another CA is refused and the allocation fails as a down server's would; `ipop-overlay check` says which. No
namespaces: every packet stays on 127.0.0.1. The names are answered here (`getaddrinfo` replaced): NAME resolves
to 127.0.0.1 and any `.invalid` name fails, with no query to the machine's resolver and no dependence on its
/etc/hosts.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from overlay.check import check_stun, check_tls, check_turn
from overlay.cli import _status_table
from overlay.transport.ice import TURN_RETRY, IceAgent
from overlay.transport.paths import IceSettings, TurnServer
from overlay.transport.servers import Resolved, is_address, resolve
from overlay.transport.turn import TurnAllocation
from overlay.transport.underlay import UdpUnderlay
from tests.support.certs import make_server
from tests.support.coturn import MAX_RELAY_PORT, MIN_RELAY_PORT, PASSWORD, USERNAME, CoturnServer

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("turnserver") is None, reason="coturn (turnserver) is not installed"),
]


NAME = "turn.lab.test"
# What `ipop-overlay status` prints besides the TURN lines (overlay/cli.py _status_table).
STATUS = {"node_id": "0", "address": "10.254.0.1/16", "room": "r", "dht": {"stored": 0, "cached": 0}, "links": []}


@pytest.fixture(autouse=True)
def names(monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.getaddrinfo

    def getaddrinfo(host: object, port: object, *args: object, **kwargs: object) -> object:
        if host == NAME:
            return real("127.0.0.1", port, *args, **kwargs)  # type: ignore[arg-type]
        if isinstance(host, str) and host.endswith(".invalid"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if isinstance(host, str) and not is_address(host):
            raise AssertionError(f"the test asked the resolver for {host}")
        return real(host, port, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def coturn(tmp_path_factory: pytest.TempPathFactory) -> object:
    work = tmp_path_factory.mktemp("coturn-tls")
    files = make_server(work / "pki", [NAME, "127.0.0.1"])
    server = CoturnServer(
        work,
        ["127.0.0.1"],
        allowed_peers=["127.0.0.1/32"],
        port=free_port(socket.SOCK_DGRAM),
        tls=(files.cert, files.key),
        tls_port=free_port(socket.SOCK_STREAM),
        loopback_peers=True,
    )
    with server:
        yield server, files
    assert server.pid is None


def allocate(server: TurnServer) -> tuple[str, int]:
    async def run() -> tuple[str, int]:
        alloc = TurnAllocation(server, lambda *a: None, lambda *a: None)
        try:
            return await asyncio.wait_for(alloc.allocate(), 10.0)
        finally:
            await alloc.close()

    return asyncio.run(run())


def test_turn_over_tls_allocates_with_the_private_ca_by_name_and_by_address(coturn: tuple) -> None:
    server, files = coturn
    for host in (NAME, "127.0.0.1"):
        relayed = allocate(TurnServer(host, server.tls_port, "tls", USERNAME, PASSWORD, str(files.ca)))
        assert relayed[0] == "127.0.0.1" and MIN_RELAY_PORT <= relayed[1] <= MAX_RELAY_PORT, relayed


def test_link_packets_cross_between_a_tls_and_a_udp_allocation_on_channels(coturn: tuple) -> None:
    server, files = coturn

    async def run() -> tuple[list[bytes], list[bytes]]:
        got: dict[str, list[bytes]] = {"tls": [], "udp": []}
        ends = {
            kind: TurnAllocation(
                TurnServer(NAME, port, kind, USERNAME, PASSWORD, str(files.ca) if kind == "tls" else None),
                lambda *a: None,
                lambda data, path, kind=kind: got[kind].append(bytes(data)),
            )
            for kind, port in (("tls", server.tls_port), ("udp", server.port))
        }
        try:
            for end in ends.values():
                await asyncio.wait_for(end.allocate(), 10.0)
            tls, udp = ends["tls"], ends["udp"]
            assert tls.relayed is not None and udp.relayed is not None
            big = bytes([0x80]) + bytes(range(256)) * 4  # a link packet (first byte >= 0x80, overlay/wire.py)
            for _ in range(50):  # each side's first sends wait for its channel binding (the peer's permission)
                tls.send_to_peer(b"\x80from tls", udp.relayed)
                udp.send_to_peer(big, tls.relayed)
                await asyncio.sleep(0.1)
                if got["tls"] and got["udp"]:
                    break
            # A super-frame's size from the TLS allocation: chunks, each in a ChannelData padded on the stream,
            # relayed by coturn as datagrams of their own and joined at the UDP allocation. (The other way coturn
            # passes a train it read from UDP on to the TLS allocation's relayed address faster than it reads that
            # one, and on loopback that socket's 128 KB buffer never holds a whole train: docs/nat-traversal.md.
            # The UDP allocation's chunks and GSO send: tests/test_turn_channels.py, tests/test_nat.py.)
            tls.send_to_peer(PROBE_SIZED, udp.relayed)
            for _ in range(50):
                await asyncio.sleep(0.1)
                if PROBE_SIZED in got["udp"]:
                    break
            assert tls.counters.get("datagrams sent as chunks") == 1
            return got["tls"], got["udp"]
        finally:
            for end in ends.values():
                await end.close()

    at_tls, at_udp = asyncio.run(run())
    assert at_udp and set(at_udp) == {b"\x80from tls", PROBE_SIZED}
    assert at_tls and set(at_tls) == {bytes([0x80]) + bytes(range(256)) * 4}


PROBE_SIZED = bytes([0x81]) + bytes(i * 7 % 251 for i in range(60_256))  # a sealed PROBE's size (overlay/wire.py)


def test_a_certificate_from_another_ca_is_refused_and_check_says_so(coturn: tuple, tmp_path: Path) -> None:
    server, files = coturn
    other = make_server(tmp_path, [NAME], label="other")
    with pytest.raises(ssl.SSLCertVerificationError):
        allocate(TurnServer(NAME, server.tls_port, "tls", USERNAME, PASSWORD, str(other.ca)))
    bad = check_tls("turn server (tls)", NAME, server.tls_port, str(other.ca), 5.0)
    assert not bad.ok and "certificate not accepted" in bad.detail and str(other.ca) in bad.detail, bad
    good = check_tls("turn server (tls)", NAME, server.tls_port, str(files.ca), 5.0)
    assert good.ok, good
    # A listener that speaks something else (coturn's own ports take TLS too, once it has a certificate).
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def answer() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        thread = threading.Thread(target=answer)
        thread.start()
        plain = check_tls("turn server (tls)", "127.0.0.1", listener.getsockname()[1], str(files.ca), 5.0)
        thread.join(5.0)
    assert not plain.ok and "TLS: handshake failed" in plain.detail, plain


def test_a_udp_turn_server_and_a_stun_server_by_name(coturn: tuple) -> None:
    server, _ = coturn
    relayed = allocate(TurnServer(NAME, server.port, "udp", USERNAME, PASSWORD))
    assert relayed[0] == "127.0.0.1"
    answered = check_stun("stun server", (NAME, server.port), 5.0)
    assert answered.ok and "127.0.0.1" in answered.detail, answered
    unknown = check_stun("stun server", ("no-such-host.invalid", server.port), 5.0)
    assert not unknown.ok and "cannot resolve no-such-host.invalid" in unknown.detail, unknown


def test_the_ice_agent_asks_a_named_stun_server_and_allocates_over_tls(coturn: tuple) -> None:
    server, files = coturn

    async def run() -> None:
        underlay = UdpUnderlay(("127.0.0.1", 0))
        settings = IceSettings(
            stun=((NAME, server.port), ("no-such-host.invalid", server.port)),
            turn=(TurnServer(NAME, server.tls_port, "tls", USERNAME, PASSWORD, str(files.ca)),),
        )
        agent = IceAgent(settings, underlay, lambda data, path: None)
        underlay.on_stun = agent.on_stun
        underlay.start(lambda data, source: None)
        try:
            agent.start(time.monotonic())
            await agent.gathered()
            assert agent._srflx == {(NAME, server.port): underlay.local_endpoint}
            assert agent.counters.get("stun server names not resolved") == 1
            assert agent.has_relay and agent.allocations[0].relayed is not None
            assert agent.allocations[0].relayed[0] == "127.0.0.1"
        finally:
            await agent.close()
            underlay.close()

    asyncio.run(run())


def test_a_relay_round_offers_our_relay_only_where_a_peer_needs_it(coturn: tuple) -> None:
    """Behind an endpoint-independent mapping (or at a public address) the peer's relay reaches us at our
    server-reflexive address: the offer leaves our relay out, and an answer adds it only when the offer carried
    none. Behind a symmetric NAT, or with the mapping unknown, both carry it (overlay/transport/ice.py)."""
    server, _ = coturn

    async def run() -> None:
        underlay = UdpUnderlay(("127.0.0.1", 0))
        turn = TurnServer("127.0.0.1", server.port, "udp", USERNAME, PASSWORD)
        agent = IceAgent(IceSettings(turn=(turn,)), underlay, lambda data, path: None)
        underlay.on_stun = agent.on_stun
        underlay.start(lambda data, source: None)

        def relays(controlling: bool, peer_relays: bool | None, relay: bool = True) -> int:
            session = agent.session(controlling, relay=relay, peer_relays=peer_relays)
            try:
                assert session.params().candidates  # the host candidate at least
                return sum(c.type == "relay" for c in session.params().candidates)
            finally:
                agent.sessions.pop(session.ufrag, None)

        try:
            agent.start(time.monotonic())
            await agent.gathered()
            assert agent.has_relay
            stun_a, stun_b = ("198.18.0.4", 3478), ("198.18.0.5", 3478)
            for mapped_b, needs in ((("198.18.0.2", 7000), False), (("198.18.0.2", 7001), True)):
                agent._srflx = {stun_a: ("198.18.0.2", 7000), stun_b: mapped_b}  # what two STUN servers saw
                assert agent.needs_own_relay is needs, agent.mapping()
                assert relays(True, None) == (1 if needs else 0)  # our offer
                assert relays(False, True) == (1 if needs else 0)  # our answer to an offer with a relay
                assert relays(False, False) == 1  # our answer to one without
                assert relays(True, None, relay=False) == relays(False, False, relay=False) == 0  # no relay round
            agent._srflx = {stun_a: underlay.local_endpoint}  # seen at our own address: public
            assert not agent.needs_own_relay and relays(True, None) == 0 and relays(False, False) == 1
            agent._srflx = {}  # no STUN answer: unknown, so the relay goes along
            assert agent.needs_own_relay and relays(True, None) == 1
        finally:
            await agent.close()
            underlay.close()

    asyncio.run(run())


def test_names_resolve_once_per_interval_and_again_when_forgotten() -> None:
    async def run() -> None:
        names = Resolved(socket.AF_INET)
        assert await names.address((NAME, 3478), 0.0) == ("127.0.0.1", 3478)
        names._cache[(NAME, 3478)] = (("127.0.0.9", 3478), 0.0)  # as if the name had moved since
        assert await names.address((NAME, 3478), 10.0) == ("127.0.0.9", 3478)  # cached
        names.forget((NAME, 3478))
        assert await names.address((NAME, 3478), 20.0) == ("127.0.0.1", 3478)
        assert await names.address(("198.18.0.2", 3478), 0.0) == ("198.18.0.2", 3478)  # an address as it is
        with pytest.raises(OSError, match=r"cannot resolve no-such-host\.invalid"):
            await resolve(("no-such-host.invalid", 3478))

    asyncio.run(run())


def test_check_allocates_with_the_configured_credentials_and_says_why_it_cannot(coturn: tuple) -> None:
    """`ipop-overlay check` makes an allocation on each TURN server and releases it: a reachable server that
    refuses our username or password fails the check, naming the username, where a reachability test passed."""
    server, files = coturn
    for transport, port in (("udp", server.port), ("tcp", server.port), ("tls", server.tls_port)):
        ca = str(files.ca) if transport == "tls" else None
        good = check_turn(TurnServer(NAME, port, transport, USERNAME, PASSWORD, ca), 5.0)
        assert good.ok and "allocated 127.0.0.1:" in good.detail and "released" in good.detail, good
        bad = check_turn(TurnServer(NAME, port, transport, USERNAME, "not-the-password", ca), 5.0)
        assert (
            not bad.ok and f"credentials refused (401 Unauthorized): check the username {USERNAME!r}" in bad.detail
        ), bad
    silent = check_turn(TurnServer("127.0.0.1", free_port(socket.SOCK_DGRAM), "udp", USERNAME, PASSWORD), 0.6)
    assert not silent.ok and "unreachable" in silent.detail, silent


def test_a_failing_allocation_is_logged_once_and_status_shows_why(
    coturn: tuple, caplog: pytest.LogCaptureFixture
) -> None:
    """A node whose TURN server refuses its credentials tries again every TURN_RETRY: the log says so once (not at
    every try, for as long as the server refuses), and `status` shows the last error on the server's line."""
    server, _ = coturn
    wrong = TurnServer(NAME, server.port, "udp", USERNAME, "not-the-password")

    async def run() -> list[dict[str, object]]:
        underlay = UdpUnderlay(("127.0.0.1", 0))
        agent = IceAgent(IceSettings(turn=(wrong,)), underlay, lambda data, path: None)
        underlay.start(lambda data, source: None)
        try:
            for now in (0.0, TURN_RETRY):  # two tries, the second one retry later
                agent.tick(now)
                await asyncio.sleep(0)
                await asyncio.gather(*agent._tasks)
            return [{"relayed": a.relayed, "error": a.error} for a in agent.allocations]
        finally:
            await agent.close()
            underlay.close()

    with caplog.at_level(logging.DEBUG, logger="overlay.transport.ice"):
        allocations = asyncio.run(run())
    assert allocations[0]["relayed"] is None and "401" in str(allocations[0]["error"]), allocations
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "TURN allocation" in r.getMessage()]
    assert len(warned) == 1 and "401" in warned[0].getMessage(), [r.getMessage() for r in caplog.records]
    st = {"ice": {"turn": [{"server": wrong.describe(), "relayed": None, "error": allocations[0]["error"]}]}}
    line = [x for x in _status_table({**STATUS, **st}).splitlines() if x.startswith("turn ")]
    assert line == [f"turn     {wrong.describe()} no allocation: {allocations[0]['error']}"]
