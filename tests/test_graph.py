"""`ipop-overlay graph` without namespaces: the wire format (and its decoders under fuzzing), the crawl's bounds
(questions outstanding, rate, retries, giving up), the members' answer rate limit, a whole memory group
collected by one member and compared with every member's own links, and the files (GraphML, DOT, PNG) read back
by networkx and by the simulator."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import networkx as nx  # type: ignore[import-untyped]
import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay.graph import (
    ANSWER_BURST,
    RATE,
    RETRY_AFTER,
    TRIES,
    WINDOW,
    Crawl,
    LinkView,
    NodeView,
    decode_answer,
    decode_get,
    encode_answer,
    encode_get,
)
from overlay.graphfile import to_dot, write
from overlay.routing.ring import RingParams
from overlay.wire import DecodeError, Kind, Routed
from sims.export import read_graphml
from sims.run import SimConfig, simulate
from tests.support.memgroup import MemoryGroup


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


views = st.builds(
    NodeView,
    st.integers(0, 2**32 - 1).map(lambda a: ".".join(str(a >> s & 255) for s in (24, 16, 8, 0))),
    st.lists(
        st.builds(
            LinkView,
            st.integers(0, 2**64 - 1),
            st.sampled_from(["host", "srflx", "prflx", "relay", "tunnel"]),
            st.frozensets(st.sampled_from(["ring", "long_out", "long_in", "on_demand"])),
        ),
        max_size=40,
    ).map(tuple),
)


@given(st.integers(0, 2**32 - 1), views)
def test_an_answer_round_trips(token: int, view: NodeView) -> None:
    assert decode_answer(encode_answer(token, view)) == (token, view)
    assert decode_get(encode_get(token)) == token


@given(st.binary(max_size=200))
def test_the_decoders_refuse_garbage_with_decode_error(data: bytes) -> None:
    for decode in (decode_get, decode_answer):
        try:
            decode(data)  # type: ignore[operator]
        except DecodeError:
            pass


def test_the_crawl_keeps_its_window_and_rate_asks_again_and_gives_up() -> None:
    crawl = Crawl(token=7)
    crawl.learn(1, NodeView("10.0.0.1", tuple(LinkView(p, "host", frozenset()) for p in range(2, 1002))))
    assert crawl.progress() == (1, 1001)
    first: list[int] = []
    for step in range(100):  # a second: the window fills at RATE a second, then nothing more while unanswered
        first += crawl.due(step * 0.01)
    assert len(first) == WINDOW == len(set(first))
    assert crawl.due(RETRY_AFTER * 0.9) == []
    # Nobody answered: at the retry time the same members are asked again, before any new one.
    again = crawl.due(RETRY_AFTER + 1.0)
    assert set(again) == set(first)
    # Answers free the window, and the rate holds: over 5 s of instant answers at most RATE * 5 (+ a burst).
    for node in again:
        crawl.learn(node, NodeView("10.0.0.2", ()))
    sent, t = 0, RETRY_AFTER + 1.0
    while t < RETRY_AFTER + 6.0:
        for node in crawl.due(t):
            sent += 1
            crawl.learn(node, NodeView("10.0.0.2", ()))
        t += 0.01
    assert RATE * 4.5 <= sent <= RATE * 6
    # Whoever never answers is asked TRIES times, then given up on and listed.
    silent = Crawl(token=8)
    silent.learn(1, NodeView("10.0.0.1", (LinkView(99, "host", frozenset()),)))
    asks, t = 0, 0.0
    while not silent.finished:
        asks += silent.due(t).count(99)
        t += 0.5
    assert asks == TRIES
    assert silent.result()["unanswered"] == [f"{99:016x}"] and not silent.result()["complete"]


def test_a_member_answers_at_most_its_burst_and_counts_the_rest() -> None:
    async def scenario() -> None:
        g = MemoryGroup(seed=5)
        try:
            for _ in range(2):
                await g.add_node()
            node = g.nodes[1]
            sent: list[Any] = []
            node.send_routed = lambda *a, **k: sent.append(a)  # type: ignore[method-assign]
            question = Routed(64, 0, g.nodes[0].id, node.id, 0, Kind.GRAPH_GET, encode_get(1))
            for _ in range(200):
                node.graph.on_get(question)
            assert len(sent) <= ANSWER_BURST + 1
            assert node.counters["drop: graph questions over the rate"] >= 200 - ANSWER_BURST - 1
        finally:
            await g.stop()

    run(scenario())


def test_an_answer_from_a_member_not_asked_is_not_taken_whatever_its_token() -> None:
    async def scenario() -> None:
        g = MemoryGroup(seed=6)
        try:
            await g.add_node()
            node = g.nodes[0]
            crawl = node.graph.start(1234)
            forged = encode_answer(1234, NodeView("10.9.9.9", (LinkView(42, "host", frozenset()),)))
            node.graph.on_answer(Routed(64, 0, 777, node.id, 0, Kind.GRAPH, forged))
            assert 777 not in crawl.nodes and crawl.progress() == (1, 1)
            assert node.counters["drop: graph answer not awaited"] == 1
        finally:
            await g.stop()

    run(scenario())


async def collect(g: MemoryGroup, i: int, timeout: float) -> dict[str, Any]:
    result: dict[str, Any] = {}
    async for part in g.nodes[i].graph.collect(timeout):
        result = part.get("result", result)
    return result


def links_of(g: MemoryGroup) -> set[frozenset[str]]:
    return {frozenset((f"{n.id:016x}", f"{p:016x}")) for n in g.nodes for p in n.links.links}


def test_one_member_collects_every_members_links_and_the_files_say_the_same(tmp_path: Path) -> None:
    async def scenario() -> tuple[dict[str, Any], set[frozenset[str]]]:
        g = MemoryGroup(seed=9)
        try:
            assert await g.form_ring(12, 30.0)
            for _ in range(3):  # links may still move as long links settle: agree on one snapshot
                before = links_of(g)
                result = await collect(g, 5, 20.0)
                if links_of(g) == before:
                    return result, before
            raise AssertionError("the links kept changing")
        finally:
            await g.stop()

    result, truth = run(scenario())
    assert result["complete"] and result["unanswered"] == []
    assert len(result["nodes"]) == 12
    reported = {frozenset((n, peer)) for n, v in result["nodes"].items() for peer, _, _ in v["links"]}
    assert reported == truth
    for suffix in (".graphml", ".dot", ".png"):
        path = tmp_path / f"overlay{suffix}"
        g = write(result, path)
        assert path.stat().st_size > 0
        assert {frozenset(e) for e in g.edges()} == truth
    back = nx.read_graphml(tmp_path / "overlay.graphml")
    assert {frozenset(e) for e in back.edges()} == truth and back.graph["complete"] is True
    assert all(d["answered"] and d["address"].startswith("10.254.") for _, d in back.nodes(data=True))
    # The simulator routes over the same picture.
    overlay = read_graphml(str(tmp_path / "overlay.graphml"), RingParams())
    assert overlay.n == 12 and int(overlay.degree().sum()) == 2 * len(truth)
    report, _ = simulate(SimConfig(load=str(tmp_path / "overlay.graphml"), pairs=200, bfs_sources=4))
    assert report["nodes"] == 12 and report["success"] == 1.0


def test_a_partial_result_is_marked_in_every_file(tmp_path: Path) -> None:
    rng = random.Random(1)
    ids = sorted(rng.getrandbits(64) for _ in range(4))
    result = {
        "complete": False,
        "nodes": {f"{ids[0]:016x}": {"address": "10.1.0.1", "links": [[f"{ids[1]:016x}", "host", ["ring"]]]}},
        "unanswered": [f"{ids[1]:016x}"],
    }
    g = write(result, tmp_path / "p.graphml")
    assert g.graph["complete"] is False and g.nodes[f"{ids[1]:016x}"]["answered"] is False
    assert 'complete="false"' in to_dot(g) and "style=dashed" in to_dot(g)
    with pytest.raises(ValueError, match="graphml"):
        write(result, tmp_path / "p.svg")
    with pytest.raises(ValueError, match="GraphML"):
        read_graphml(str(tmp_path / "nothing.graphml"), RingParams())


def test_the_control_socket_streams_a_collection_and_names_a_bad_timeout(tmp_path: Path) -> None:
    from overlay.control import ControlError, ControlServer, stream

    async def scenario() -> None:
        g = MemoryGroup(seed=8)
        try:
            assert await g.form_ring(3, 20.0)
            server = ControlServer(
                tmp_path / "node.sock", {"status": g.nodes[0].status}, {"graph": g.nodes[0].graph.request}
            )
            await server.start()
            parts = await asyncio.to_thread(
                lambda: list(stream(tmp_path / "node.sock", {"cmd": "graph", "timeout": 5}))
            )
            assert "progress" in parts[0] and parts[-1]["result"]["complete"] and len(parts[-1]["result"]["nodes"]) == 3
            with pytest.raises(ControlError, match="1 to 600 seconds"):
                await asyncio.to_thread(lambda: list(stream(tmp_path / "node.sock", {"cmd": "graph", "timeout": 0})))
            with pytest.raises(ControlError, match="unknown request; known: graph, status"):
                await asyncio.to_thread(lambda: list(stream(tmp_path / "node.sock", {"cmd": "nothing"})))
            await server.stop()
        finally:
            await g.stop()

    run(scenario())
