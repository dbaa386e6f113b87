"""The issuer's decisions: who gets a certificate, which address, what a removal revokes, what survives a restart;
and the request and answer codecs, which read peer bytes."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.identity import Identity
from overlay.trust import enroll
from overlay.trust.certs import CertError, Certificate, check_certificate
from overlay.trust.groupkey import GroupKey
from overlay.trust.issuer import Issuer, decode_answer, decode_request, encode_answer, make_request
from overlay.trust.members import GroupTrust

ROOM = "g@conference.example.test"
NOW = 1_800_000_000.0
KEY = GroupKey.from_seed(bytes([5]) * 32)
ALICE, BOB, CAROL = (Identity.from_seed(bytes([i]) * 32) for i in (1, 2, 3))


def issuer(tmp_path: Path | None = None) -> Issuer:
    i = Issuer(KEY, ROOM, ipaddress.IPv4Network("10.254.0.0/24"), 3600.0, tmp_path / "state.json" if tmp_path else None)
    i.set_members({"alice@example.test": "owner", "bob@example.test": "member", "carol@example.test": "member"}, NOW)
    return i


def ask(
    i: Issuer, who: Identity, jid: str | None, wanted: str | None = None, current: bytes = b""
) -> Certificate | str:
    address = ipaddress.IPv4Address(wanted) if wanted else None
    return decode_answer(i.handle(make_request(who, ROOM, NOW, address, current).encode(), jid, NOW))


def test_a_member_gets_a_certificate_for_its_key_with_a_free_address_in_the_subnet() -> None:
    i = issuer()
    cert = ask(i, BOB, "bob@example.test")
    assert isinstance(cert, Certificate)
    assert cert.node_key == BOB.public_key and cert.jid == "bob@example.test"
    assert cert.address.ip in ipaddress.IPv4Network("10.254.0.0/24") and cert.address.network.prefixlen == 24
    assert check_certificate(cert, KEY.public_key, NOW) is None
    # Asking again at once (an answer that was slow to come) gives the same certificate; asking once a quarter of
    # its life has gone gives a new one for the same address; another node gets another address.
    assert ask(i, BOB, "bob@example.test") == cert
    later = NOW + 0.25 * 3600
    again = decode_answer(i.handle(make_request(BOB, ROOM, later).encode(), "bob@example.test", later))
    assert isinstance(again, Certificate) and again.address == cert.address and again.serial != cert.serial
    other = ask(i, CAROL, "carol@example.test")
    assert isinstance(other, Certificate) and other.address != cert.address


def test_refusals_name_the_reason() -> None:
    i = issuer()
    assert ask(i, BOB, "mallory@example.test") == "mallory@example.test is not a member of " + ROOM
    assert ask(i, BOB, None) == "no JID: a first certificate is asked for through the XMPP room"
    assert "not a host address" in str(ask(i, BOB, "bob@example.test", "10.9.0.1"))
    assert isinstance(ask(i, BOB, "bob@example.test", "10.254.0.7"), Certificate)
    assert ask(i, CAROL, "carol@example.test", "10.254.0.7") == "address 10.254.0.7 belongs to another member"
    # A request signed by another key than the one it names.
    req = make_request(BOB, ROOM, NOW)
    forged = dataclasses.replace(req, node_key=CAROL.public_key)
    assert "not signed" in str(decode_answer(i.handle(forged.encode(), "carol@example.test", NOW)))
    # A request for another room, or an old one (replayed), is refused.
    assert "not signed" in str(
        decode_answer(i.handle(make_request(BOB, "x@y.z", NOW).encode(), "bob@example.test", NOW))
    )
    old = make_request(BOB, ROOM, NOW - 3600).encode()
    assert "too old" in str(decode_answer(i.handle(old, "bob@example.test", NOW)))


def test_renewal_through_the_overlay_needs_the_current_certificate_and_membership() -> None:
    i = issuer()
    cert = ask(i, BOB, "bob@example.test")
    assert isinstance(cert, Certificate)
    renewed = ask(i, BOB, None, str(cert.address.ip), cert.encode())
    assert isinstance(renewed, Certificate) and renewed.address == cert.address
    # Somebody else's certificate does not renew for another key.
    assert "of another node" in str(ask(i, CAROL, None, None, cert.encode()))
    # Removed from the room: the certificate is revoked, renewal refused.
    revs = i.set_members({"alice@example.test": "owner", "carol@example.test": "member"}, NOW + 1)
    assert [r.jid for r in revs] == ["bob@example.test"]
    assert "revoked" in str(
        decode_answer(i.handle(make_request(BOB, ROOM, NOW + 2, None, cert.encode()).encode(), None, NOW + 2))
    )
    assert i.revocations.covers(cert) and i.revocations.covers(renewed)
    # Added back later: a new certificate, issued after the revocation, is not covered.
    i.set_members({"alice@example.test": "owner", "bob@example.test": "member"}, NOW + 10)
    fresh = decode_answer(i.handle(make_request(BOB, ROOM, NOW + 11).encode(), "bob@example.test", NOW + 11))
    assert isinstance(fresh, Certificate) and not i.revocations.covers(fresh)


def test_asking_again_is_answered_without_signing_or_writing_the_state_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    i = issuer(tmp_path)
    saves: list[int] = []
    monkeypatch.setattr(i, "save", lambda: saves.append(1))
    cert = ask(i, BOB, "bob@example.test")
    assert isinstance(cert, Certificate) and len(saves) == 1  # the new allocation is on disk before the answer
    for _ in range(3):
        assert ask(i, BOB, "bob@example.test") == cert
    assert len(saves) == 1
    # What a new certificate would say differently gets one: another address asked for.
    moved = ask(i, BOB, "bob@example.test", "10.254.0.9")
    assert isinstance(moved, Certificate) and moved != cert and str(moved.address.ip) == "10.254.0.9"
    assert len(saves) == 2
    # Removed and added back: the remembered certificate is revoked, so never sent again.
    i.set_members({"alice@example.test": "owner", "carol@example.test": "member"}, NOW + 1)
    i.set_members({"alice@example.test": "owner", "bob@example.test": "member"}, NOW + 2)
    back = decode_answer(i.handle(make_request(BOB, ROOM, NOW + 3).encode(), "bob@example.test", NOW + 3))
    assert isinstance(back, Certificate) and back != moved and not i.revocations.covers(back)


def test_allocations_members_and_revocations_survive_a_restart(tmp_path: Path) -> None:
    i = issuer(tmp_path)
    cert = ask(i, BOB, "bob@example.test")
    assert isinstance(cert, Certificate)
    i.set_members({"alice@example.test": "owner", "carol@example.test": "member"}, NOW + 1)
    assert (tmp_path / "state.json").stat().st_mode & 0o077 == 0
    again = Issuer(KEY, ROOM, ipaddress.IPv4Network("10.254.0.0/24"), 3600.0, tmp_path / "state.json")
    again.load(NOW + 2)
    assert again.revocations.covers(cert)
    assert "bob@example.test" not in again.members
    # Removed while the issuer was down: noticed against the saved member list on the first poll.
    revs = again.set_members({"alice@example.test": "owner"}, NOW + 3)
    assert [r.jid for r in revs] == ["carol@example.test"]
    (tmp_path / "state.json").write_text("{not json")
    broken = Issuer(KEY, ROOM, ipaddress.IPv4Network("10.254.0.0/24"), 3600.0, tmp_path / "state.json")
    with pytest.raises(Exception, match="damaged"):
        broken.load(NOW)


def test_a_full_subnet_is_refused_clearly() -> None:
    i = Issuer(KEY, ROOM, ipaddress.IPv4Network("10.254.0.0/30"), 3600.0)
    i.set_members({f"u{k}@example.test": "member" for k in range(4)}, NOW)
    ids = [Identity.from_seed(bytes([40 + k]) * 32) for k in range(3)]
    assert isinstance(ask(i, ids[0], "u0@example.test"), Certificate)
    assert isinstance(ask(i, ids[1], "u1@example.test"), Certificate)
    assert "no free address" in str(ask(i, ids[2], "u2@example.test"))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_request_and_answer_decoders_raise_only_cert_errors(data: bytes) -> None:
    for decode in (decode_request, decode_answer):
        for prefix in (b"", b"ipopcsr1", b"ipopcrt1", b"ipopcrt1\x00", b"ipopcrt1\x01"):
            try:
                decode(prefix + data)
            except CertError:
                pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_the_issuer_answers_any_bytes_with_a_refusal_never_an_exception(data: bytes) -> None:
    i = issuer()
    result = decode_answer(i.handle(b"ipopcsr1" + data, "bob@example.test", NOW))
    assert isinstance(result, str)
    assert decode_answer(encode_answer(None, "x")) == "x"


def test_two_issuers_with_the_same_key_agree_on_a_members_address_and_each_renews_the_others_certificate() -> None:
    """No single point of failure: issuers that share only the group key (not their state) start a node's
    address at the same place, and a renewal presents a certificate any of them accepts."""
    one, two = issuer(), issuer()
    first = ask(one, BOB, "bob@example.test")
    again = ask(two, BOB, "bob@example.test")
    assert isinstance(first, Certificate) and isinstance(again, Certificate)
    assert first.address == again.address
    renewed = ask(two, BOB, None, str(first.address.ip), first.encode())
    assert isinstance(renewed, Certificate) and renewed.address == first.address


def test_a_long_revocation_list_travels_in_messages_that_fit_one_unfragmented_datagram() -> None:
    from overlay.trust.revocations import RevocationSet
    from overlay.trust.service import _revoke_messages

    i = issuer()
    jids = {f"member{k:03d}-with-a-rather-long-name@example.test": "member" for k in range(10)}
    i.set_members(jids, NOW)
    revs = i.set_members({}, NOW + 1)
    msgs = _revoke_messages(revs)
    assert len(msgs) == 3 and all(len(m) < 1400 for m in msgs)
    back = [r for m in msgs for r in RevocationSet.decode_list(m[1:])]
    assert back == revs


class SlowRoom:
    """A room whose one issuer answers the `answer_on`-th ask (counting from 1) with `answer`, and no other."""

    def __init__(self, answer: bytes = b"", answer_on: int = 0) -> None:
        self.issuers = ["00000000000000aa"]
        self.in_room = True
        self.answer, self.answer_on = answer, answer_on
        self.waits: list[float] = []

    async def exchange(self, hellos: dict[str, bytes], timeout: float) -> dict[str, bytes]:
        self.waits.append(timeout)
        await asyncio.sleep(0)
        (nick,) = hellos
        return {nick: self.answer} if len(self.waits) == self.answer_on else {}


def test_a_joiner_waits_longer_each_time_its_request_goes_unanswered_and_takes_a_late_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A slow issuer (overlay/trust/enroll.py ANSWER_MAX): the answer to the first ask arrives while the joiner
    waits on its third, and is the certificate it keeps."""
    monkeypatch.setattr(enroll, "RETRY", 0.0)
    first = issuer().handle(make_request(BOB, ROOM, NOW).encode(), "bob@example.test", NOW)
    room = SlowRoom(first, answer_on=3)
    trust = GroupTrust(KEY.public_key, BOB.public_key, lambda: NOW)
    got = asyncio.run(
        enroll.obtain_certificate(room, BOB, trust, ROOM, "bob@example.test", None, None, asyncio.Event())
    )
    assert got == decode_answer(first) and trust.certificate == got
    assert room.waits == [enroll.ANSWER_TIMEOUT, 2 * enroll.ANSWER_TIMEOUT, 4 * enroll.ANSWER_TIMEOUT]

    # An issuer that never answers: the wait stops growing at ANSWER_MAX, and the joiner stops when told to.
    silent = SlowRoom()
    stop = asyncio.Event()

    async def run() -> None:
        task = asyncio.ensure_future(
            enroll.obtain_certificate(silent, BOB, trust, ROOM, "bob@example.test", None, None, stop)
        )
        while len(silent.waits) < 8:
            await asyncio.sleep(0)
        stop.set()
        assert await task is None

    asyncio.run(run())
    assert silent.waits[:5] == [5.0, 10.0, 20.0, 40.0, 40.0] and max(silent.waits) == enroll.ANSWER_MAX


def test_a_joiner_whose_session_drops_while_it_waits_for_an_issuer_logs_in_again_and_gets_its_certificate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The XMPP server restarts while a joiner waits for the issuer: the joiner logs in again on its own (no
    other part of the node does before it has a certificate) and is answered once the issuer is in the room."""
    from xmpp_bootstrap.memory import MemoryBootstrap, MemoryRoom

    monkeypatch.setattr(enroll, "RETRY", 0.01)
    room = MemoryRoom(ROOM, ["bob@example.test"], owners=["alice@example.test"])
    i = issuer()
    trust = GroupTrust(KEY.public_key, BOB.public_key, time.time)

    async def run() -> Certificate | None:
        bob = MemoryBootstrap(room, "bob@example.test/n", "00000000000000b0")
        await bob.start()
        task = asyncio.ensure_future(
            enroll.obtain_certificate(bob, BOB, trust, ROOM, "bob@example.test", None, None, asyncio.Event())
        )
        await asyncio.sleep(0.05)
        room.server_up = False  # the server goes down: bob's session with it
        await bob.stop()
        await asyncio.sleep(0.1)
        assert not task.done() and not bob.in_room
        room.server_up = True
        alice = MemoryBootstrap(room, "alice@example.test/n", "00000000000000a0")
        alice.on_hello = lambda payload, nick: i.handle(payload, "bob@example.test", time.time())
        alice.set_issuer(True)
        await alice.start()
        return await asyncio.wait_for(task, 5.0)

    got = asyncio.run(run())
    assert isinstance(got, Certificate) and got.jid == "bob@example.test" and trust.certificate == got
