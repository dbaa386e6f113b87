"""Group trust: certificates and revocations round-trip, only the group key's genuine and current ones are
believed, and decoders on peer bytes return a value or raise CertError, nothing else."""

from __future__ import annotations

import dataclasses
import os
import stat
from ipaddress import IPv4Interface
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.identity import Identity, KeyFileError
from overlay.trust.certs import (
    MAX_CLOCK_SKEW,
    CertError,
    Certificate,
    check_certificate,
    decode_certificate,
    forget_checked_signatures,
    issue_certificate,
)
from overlay.trust.groupkey import (
    GroupKey,
    format_public_key,
    load_public_key,
    parse_public_key,
    write_public,
)
from overlay.trust.revocations import (
    Revocation,
    RevocationSet,
    check_revocation,
    decode_revocation,
    make_revocation,
)

GROUP = GroupKey.from_seed(bytes(range(32)))
OTHER_GROUP = GroupKey.from_seed(bytes(range(1, 33)))
NODE = Identity.from_seed(b"\x07" * 32)
NODE2 = Identity.from_seed(b"\x08" * 32)
HOUR = 3600.0
T0 = 1_700_000_000.0


def cert_for(
    node: Identity = NODE, *, now: float = T0, lifetime: float = HOUR, key: GroupKey = GROUP, jid: str = "alice@x.org"
) -> Certificate:
    return issue_certificate(
        key, jid=jid, node_key=node.public_key, address=IPv4Interface("10.8.0.5/16"), now=now, lifetime=lifetime
    )


def revoke(node: Identity = NODE, *, now: float = T0 + 10, until: float = T0 + 2 * HOUR) -> Revocation:
    return make_revocation(GROUP, node_key=node.public_key, jid="alice@x.org", now=now, until=until)


# --- certificates -----------------------------------------------------------------------------------------


def test_certificate_round_trips_and_is_valid_for_its_group() -> None:
    cert = cert_for()
    again = decode_certificate(cert.encode())
    assert again == cert
    assert again.node_id == NODE.node_id
    assert again.address == IPv4Interface("10.8.0.5/16")
    assert check_certificate(again, GROUP.public_key, T0 + 1) is None


def test_certificate_with_unicode_jid_and_host_prefix_round_trips() -> None:
    cert = issue_certificate(
        GROUP, jid="zoë@例え.jp", node_key=NODE.public_key, address=IPv4Interface("10.0.0.0/32"), now=T0, lifetime=1
    )
    assert decode_certificate(cert.encode()) == cert


def test_issue_uses_the_given_serial_or_a_random_one() -> None:
    fixed = issue_certificate(
        GROUP, jid="a@b", node_key=NODE.public_key, address=IPv4Interface("10.0.0.1/24"), now=T0, lifetime=1, serial=7
    )
    assert fixed.serial == 7
    assert cert_for().serial != cert_for().serial


def test_certificate_signed_by_another_group_is_refused() -> None:
    cert = cert_for(key=OTHER_GROUP)
    assert check_certificate(cert, GROUP.public_key, T0) == "signed by another group"


def test_certificate_claiming_our_group_but_signed_by_another_key_is_refused() -> None:
    forged = dataclasses.replace(cert_for(key=OTHER_GROUP), group=GROUP.public_key)
    assert check_certificate(forged, GROUP.public_key, T0) == "bad signature"


def test_certificate_with_changed_address_fails_its_signature() -> None:
    moved = dataclasses.replace(cert_for(), address=IPv4Interface("10.8.0.6/16"))
    assert check_certificate(moved, GROUP.public_key, T0) == "bad signature"


def test_a_remembered_signature_check_skips_none_of_the_others() -> None:
    """Signature checks are remembered per exact bytes; time, group and revocation are judged every time."""
    forget_checked_signatures()
    cert = cert_for(now=T0, lifetime=HOUR)
    assert check_certificate(cert, GROUP.public_key, T0 + 1) is None
    assert check_certificate(cert, GROUP.public_key, T0 + HOUR) == "expired"
    assert check_certificate(cert, GROUP.public_key, T0 - MAX_CLOCK_SKEW - 1) == "not yet valid"
    assert check_certificate(cert, OTHER_GROUP.public_key, T0 + 1) == "signed by another group"
    revs = RevocationSet()
    assert revs.add(revoke(now=T0 + 10), GROUP.public_key, T0 + 10)
    assert check_certificate(cert, GROUP.public_key, T0 + 20, revs) == "revoked"
    # The same fields under another signature, and the same signature over other fields, are checked anew.
    other_sig = dataclasses.replace(cert, signature=cert_for(NODE2).signature)
    moved = dataclasses.replace(cert, address=IPv4Interface("10.8.0.6/16"))
    for _ in range(2):
        assert check_certificate(other_sig, GROUP.public_key, T0 + 1) == "bad signature"
        assert check_certificate(moved, GROUP.public_key, T0 + 1) == "bad signature"
    assert check_certificate(cert, GROUP.public_key, T0 + 1) is None


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_flipped_bit_is_refused(data: st.DataObject) -> None:
    encoded = bytearray(cert_for().encode())
    bit = data.draw(st.integers(0, len(encoded) * 8 - 1))
    encoded[bit // 8] ^= 1 << (bit % 8)
    try:
        cert = decode_certificate(bytes(encoded))
    except CertError:
        return
    assert check_certificate(cert, GROUP.public_key, T0 + 1) is not None


def test_not_yet_valid_boundary_allows_clock_skew() -> None:
    cert = cert_for(now=T0)
    assert check_certificate(cert, GROUP.public_key, T0 - MAX_CLOCK_SKEW) is None
    assert check_certificate(cert, GROUP.public_key, T0 - MAX_CLOCK_SKEW - 0.01) == "not yet valid"


def test_expired_from_not_after_on() -> None:
    cert = cert_for(now=T0, lifetime=HOUR)
    assert check_certificate(cert, GROUP.public_key, T0 + HOUR - 0.01) is None
    assert check_certificate(cert, GROUP.public_key, T0 + HOUR) == "expired"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"jid": "alice@x.org/laptop"}, "resource"),
        ({"jid": ""}, "JID of 0 bytes"),
        ({"jid": "a" * 256}, "JID of 256 bytes"),
        ({"address": IPv4Interface("10.8.0.0/16")}, "network or broadcast"),
        ({"address": IPv4Interface("10.8.255.255/16")}, "network or broadcast"),
        ({"not_after_ms": int(T0 * 1000)}, "not after"),
        ({"node_key": b"\x01" * 31}, "node key of 31 bytes"),
        ({"serial": 1 << 64}, "serial"),
    ],
)
def test_impossible_certificate_fields_are_refused_at_construction(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(cert_for(), **change)  # type: ignore[arg-type]


def test_point_to_point_prefixes_allow_every_address() -> None:
    for address in ("10.0.0.0/31", "10.0.0.1/31", "10.0.0.0/32"):
        assert dataclasses.replace(cert_for(), address=IPv4Interface(address)).address == IPv4Interface(address)


def test_decode_refuses_trailing_bytes_and_unknown_version() -> None:
    encoded = cert_for().encode()
    with pytest.raises(CertError, match="JID length"):
        decode_certificate(encoded + b"\x00")
    with pytest.raises(CertError, match="version 2"):
        decode_certificate(b"\x02" + encoded[1:])


# --- revocations ------------------------------------------------------------------------------------------


def test_revocation_round_trips_and_verifies() -> None:
    rev = revoke()
    again = decode_revocation(rev.encode())
    assert again == rev
    assert again.node_id == NODE.node_id
    assert check_revocation(again, GROUP.public_key) is None


def test_revocation_covers_certificates_issued_up_to_it_but_not_after() -> None:
    revs = RevocationSet()
    assert revs.add(revoke(now=T0 + 10), GROUP.public_key, T0 + 10)
    old = cert_for(now=T0)
    renewed_before = cert_for(now=T0 + 5)
    same_moment = cert_for(now=T0 + 10)
    readmitted = cert_for(now=T0 + 10.001)
    assert check_certificate(old, GROUP.public_key, T0 + 20, revs) == "revoked"
    assert check_certificate(renewed_before, GROUP.public_key, T0 + 20, revs) == "revoked"
    assert check_certificate(same_moment, GROUP.public_key, T0 + 20, revs) == "revoked"
    assert check_certificate(readmitted, GROUP.public_key, T0 + 20, revs) is None
    assert check_certificate(cert_for(NODE2), GROUP.public_key, T0 + 20, revs) is None
    assert revs.revoked_node_ids() == {NODE.node_id}


def test_revocation_from_another_group_is_refused() -> None:
    foreign = make_revocation(OTHER_GROUP, node_key=NODE.public_key, jid="alice@x.org", now=T0, until=T0 + HOUR)
    assert check_revocation(foreign, GROUP.public_key) == "signed by another group"
    forged = dataclasses.replace(foreign, group=GROUP.public_key)
    assert check_revocation(forged, GROUP.public_key) == "bad signature"
    revs = RevocationSet()
    assert not revs.add(foreign, GROUP.public_key, T0)
    assert not revs.add(forged, GROUP.public_key, T0)
    assert len(revs) == 0
    assert not revs.covers(cert_for(now=T0 - 10))


def test_set_add_reports_only_new_information() -> None:
    revs = RevocationSet()
    first = revoke(now=T0 + 10)
    later = revoke(now=T0 + 20)
    assert revs.add(first, GROUP.public_key, T0 + 30)
    assert not revs.add(first, GROUP.public_key, T0 + 30)
    assert revs.add(later, GROUP.public_key, T0 + 30)
    assert not revs.add(first, GROUP.public_key, T0 + 30)
    assert revs.items() == [later]
    assert revs.add(revoke(NODE2), GROUP.public_key, T0 + 30)
    assert len(revs) == 2


def test_set_ignores_revocations_past_their_until() -> None:
    revs = RevocationSet()
    assert not revs.add(revoke(until=T0 + HOUR), GROUP.public_key, T0 + HOUR)
    assert len(revs) == 0


def test_prune_forgets_exactly_the_revocations_past_until() -> None:
    revs = RevocationSet()
    revs.add(revoke(NODE, until=T0 + HOUR), GROUP.public_key, T0)
    revs.add(revoke(NODE2, until=T0 + 2 * HOUR), GROUP.public_key, T0)
    assert revs.prune(T0 + HOUR - 0.01) == 0
    assert revs.prune(T0 + HOUR) == 1
    assert revs.revoked_node_ids() == {NODE2.node_id}


def test_digest_depends_on_contents_not_insertion_order() -> None:
    a, b = RevocationSet(), RevocationSet()
    a.add(revoke(NODE), GROUP.public_key, T0)
    a.add(revoke(NODE2), GROUP.public_key, T0)
    b.add(revoke(NODE2), GROUP.public_key, T0)
    assert a.digest() != b.digest()
    b.add(revoke(NODE), GROUP.public_key, T0)
    assert a.digest() == b.digest()
    assert len(a.digest()) == 16


def test_list_round_trips_and_refuses_trailing_bytes() -> None:
    revs = [revoke(NODE), revoke(NODE2)]
    encoded = RevocationSet.encode_list(revs)
    assert RevocationSet.decode_list(encoded) == revs
    assert RevocationSet.decode_list(RevocationSet.encode_list([])) == []
    with pytest.raises(CertError, match="after its 2 entries"):
        RevocationSet.decode_list(encoded + b"\x00")


def test_set_save_load_round_trip_with_owner_only_file(tmp_path: Path) -> None:
    revs = RevocationSet()
    revs.add(revoke(NODE), GROUP.public_key, T0)
    revs.add(revoke(NODE2), GROUP.public_key, T0)
    path = tmp_path / "revocations"
    revs.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = RevocationSet.load(path, GROUP.public_key, T0)
    assert loaded.items() == revs.items()
    revs.prune(T0 + 3 * HOUR)
    revs.save(path)  # replaces the existing file
    assert len(RevocationSet.load(path, GROUP.public_key, T0)) == 0
    assert os.listdir(tmp_path) == ["revocations"]


def test_set_load_skips_foreign_and_expired_entries(tmp_path: Path) -> None:
    foreign = make_revocation(OTHER_GROUP, node_key=NODE2.public_key, jid="b@x.org", now=T0, until=T0 + HOUR)
    path = tmp_path / "revocations"
    path.write_bytes(RevocationSet.encode_list([revoke(NODE, until=T0 + HOUR), foreign]))
    assert RevocationSet.load(path, GROUP.public_key, T0).revoked_node_ids() == {NODE.node_id}
    assert len(RevocationSet.load(path, GROUP.public_key, T0 + HOUR)) == 0


def test_set_load_missing_is_empty_and_damaged_is_one_line_error(tmp_path: Path) -> None:
    assert len(RevocationSet.load(tmp_path / "none", GROUP.public_key, T0)) == 0
    path = tmp_path / "revocations"
    path.write_bytes(b"\x00\x05junk")
    with pytest.raises(KeyFileError, match="is damaged") as info:
        RevocationSet.load(path, GROUP.public_key, T0)
    assert "\n" not in str(info.value)


# --- group key files --------------------------------------------------------------------------------------


def test_group_key_save_load_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "group.key"
    GROUP.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = GroupKey.load(path)
    assert loaded.public_key == GROUP.public_key
    assert loaded.sign(b"x") == GROUP.sign(b"x")
    with pytest.raises(KeyFileError, match="already exists"):
        GroupKey.generate().save(path)


def test_group_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "group.key"
    GROUP.save(path)
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match=f"mode 644.*chmod 600 {path}"):
        GroupKey.load(path)


def test_group_key_load_errors_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="ipop-overlay group init --out DIR"):
        GroupKey.load(tmp_path / "missing.key")
    node_key = tmp_path / "node.key"
    NODE.save(node_key)
    with pytest.raises(KeyFileError, match="not an ipop-overlay group key"):
        GroupKey.load(node_key)
    damaged = tmp_path / "damaged.key"
    fd = os.open(damaged, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"ipop-overlay group ed25519 v1\nAAAA\n")
    os.close(fd)
    with pytest.raises(KeyFileError, match="damaged key"):
        GroupKey.load(damaged)


def test_public_key_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "group.pub"
    write_public(path, GROUP.public_key)
    assert stat.S_IMODE(path.stat().st_mode) & 0o600 == 0o600
    assert path.read_text().startswith("# ipop-overlay group public key\n")
    assert load_public_key(path) == GROUP.public_key
    with pytest.raises(KeyFileError, match="already exists"):
        write_public(path, OTHER_GROUP.public_key)


def test_public_key_parsing_tolerates_whitespace_and_missing_padding() -> None:
    text = format_public_key(GROUP.public_key)
    assert parse_public_key(f"  {text}\n") == GROUP.public_key
    assert parse_public_key(text.rstrip("=")) == GROUP.public_key
    with pytest.raises(ValueError, match="base64 of 32 bytes"):
        parse_public_key(format_public_key(GROUP.public_key)[:-8])
    with pytest.raises(ValueError, match="base64 of 32 bytes"):
        parse_public_key("not base64!")


def test_public_key_file_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        load_public_key(tmp_path / "missing.pub")
    path = tmp_path / "bad.pub"
    path.write_text("# comment\n\nAAAA\n")
    with pytest.raises(KeyFileError, match="does not hold a group public key"):
        load_public_key(path)


# --- fuzz: peer bytes parse or raise CertError ------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=500))
def test_decode_certificate_raises_only_cert_error(data: bytes) -> None:
    try:
        decode_certificate(data)
    except CertError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=93, max_size=200), st.integers(0, 255))
def test_decode_certificate_near_valid_layout_raises_only_cert_error(data: bytes, jid_len: int) -> None:
    # Arbitrary bytes rarely get past the version and length checks; these do, and reach the field checks:
    # version 1, 93 bytes of keys, address, prefix, times and serial, then a JID of the length it claims.
    body = b"\x01" + data[:93] + bytes([jid_len])
    body += data[93 : 93 + jid_len].ljust(jid_len, b"a") + bytes(64)
    try:
        decode_certificate(body)
    except CertError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=500))
def test_decode_revocation_raises_only_cert_error(data: bytes) -> None:
    try:
        decode_revocation(data)
    except CertError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_decode_list_raises_only_cert_error(data: bytes) -> None:
    try:
        RevocationSet.decode_list(data)
    except CertError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 1000), max_size=6), st.binary(max_size=40))
def test_decode_list_of_mangled_entries_raises_only_cert_error(cuts: list[int], junk: bytes) -> None:
    encoded = bytearray(RevocationSet.encode_list([revoke(NODE), revoke(NODE2)]))
    for cut in cuts:
        encoded[cut % len(encoded)] ^= 0xFF
    try:
        RevocationSet.decode_list(bytes(encoded) + junk)
    except CertError:
        pass


def test_list_longer_than_the_limit_is_refused_both_ways() -> None:
    with pytest.raises(ValueError, match="at most 4096"):
        RevocationSet.encode_list([revoke()] * 4097)
    with pytest.raises(CertError, match="4097 entries, at most 4096"):
        RevocationSet.decode_list(b"\x10\x01")
