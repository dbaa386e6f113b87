"""Restarts without XMPP: the state file of remembered members (atomic, 0600, strict decoder) and whole nodes
that come back into the ring through the members they remember while the room cannot be reached."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay.remembered import MAX_REMEMBERED, Remembered, StateError, decode, encode, load, save, state_path
from tests.support.memgroup import MemoryGroup


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_the_state_file_sits_next_to_the_key_round_trips_and_is_private(tmp_path: Path) -> None:
    path = state_path(tmp_path / "node.key")
    assert path == tmp_path / "node.state"
    contacts = [Remembered(bytes([i]) * 32, (f"198.18.0.{i}", 5800 + i)) for i in range(1, 20)]
    os.umask(0o022)
    save(path, contacts)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load(path) == contacts[:MAX_REMEMBERED]
    save(path, contacts[:2])  # replaced whole, never appended to
    assert load(path) == contacts[:2]
    assert [p.name for p in tmp_path.iterdir()] == ["node.state"]  # no temporary file left behind


def test_a_missing_or_damaged_state_file_means_no_members_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "node.state"
    assert load(path) == []
    path.write_bytes(encode([Remembered(bytes(32), ("::1", 5800))])[:-5])
    assert load(path) == []
    assert "not used" in caplog.text


@given(st.binary(max_size=300))
def test_the_decoder_refuses_garbage_with_state_error(data: bytes) -> None:
    try:
        decode(data)
    except StateError:
        pass


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3),
                    max_leaves=12))  # fmt: skip
def test_the_decoder_refuses_any_json_that_is_not_a_state_with_state_error(doc: object) -> None:
    import json

    for wrapped in (doc, {"version": 1, "contacts": doc}, {"version": 1, "contacts": [doc]}):
        try:
            decode(json.dumps(wrapped).encode())
        except StateError:
            pass


@pytest.mark.parametrize("which", [3, 0], ids=["member", "founder"])
def test_a_node_restarted_while_xmpp_is_down_rejoins_the_ring_through_the_members_it_remembers(which: int) -> None:
    async def scenario() -> None:
        g = MemoryGroup(seed=21)
        try:
            assert await g.form_ring(8, 30.0)
            remembered = g.nodes[which].remembered()
            assert remembered and all(r.public_key != g.nodes[which].identity.public_key for r in remembered)
            g.room.server_up = False
            node = await g.restart_node(which, remembered)
            assert node.membership is not None and node.membership.state == "rejoining"
            assert not node.bootstrap.logged_in  # type: ignore[union-attr]
            assert await g.wait_for(lambda: not g.ring_correct(), 30.0), g.ring_correct()
            assert await g.wait_for(lambda: node.membership.state == "member", 5.0)  # type: ignore[union-attr]
            status = node.status()["membership"]
            assert status["started_without_xmpp"] and "XMPP" in status["last_error"]
            assert await g.reach([(which, (which + 4) % 8), ((which + 5) % 8, which)], 15.0) == []
            # The server comes back: nothing breaks, and the node needs no visit (it has its links).
            g.room.server_up = True
            await asyncio.sleep(1.0)
            assert not g.ring_correct()
        finally:
            await g.stop()

    run(scenario())
