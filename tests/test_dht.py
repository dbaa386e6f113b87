"""Address records and the record store: signatures, expiry, conflicts, replica placement, cache."""

from __future__ import annotations

from overlay.dht.records import RECORD_TTL, AddressRecord, check_record, make_record, record_owner
from overlay.dht.store import REPLICAS, AddressCache, RecordStore, replica_set
from overlay.identity import Identity
from overlay.ids import ring_distance

ROOM = "g@conference.example.test"
A = Identity.from_seed(bytes([1]) * 32)
B = Identity.from_seed(bytes([2]) * 32)


def test_a_signed_record_checks_out_and_names_its_owner() -> None:
    r = make_record(A, ROOM, "10.254.0.1", now=1000.0)
    assert check_record(r, ROOM, 1000.0) is None
    assert record_owner(r) == A.node_id


def test_a_record_signed_for_another_group_is_refused() -> None:
    r = make_record(A, "other@conference.example.test", "10.254.0.1", now=1000.0)
    assert check_record(r, ROOM, 1000.0) == "bad signature"


def test_a_record_whose_address_was_changed_is_refused() -> None:
    r = make_record(A, ROOM, "10.254.0.1", now=1000.0)
    forged = AddressRecord("10.254.0.2", r.public_key, r.issued_ms, r.expires_ms, r.signature)
    assert check_record(forged, ROOM, 1000.0) == "bad signature"


def test_expired_and_future_records_are_refused() -> None:
    r = make_record(A, ROOM, "10.254.0.1", now=1000.0)
    assert check_record(r, ROOM, 1000.0 + RECORD_TTL) == "expired"
    assert check_record(r, ROOM, 1000.0 - 3600) == "issued in the future"


def test_first_owner_keeps_an_address_until_its_record_expires() -> None:
    s = RecordStore(ROOM)
    assert s.put(make_record(A, ROOM, "10.254.0.1", 1000.0), 1000.0) is None
    assert s.put(make_record(B, ROOM, "10.254.0.1", 1001.0), 1001.0) == "address held by another node"
    assert record_owner(s.get("10.254.0.1", 1001.0)) == A.node_id  # type: ignore[arg-type]
    # After expiry the address is free again.
    later = 1000.0 + RECORD_TTL + 1
    assert s.put(make_record(B, ROOM, "10.254.0.1", later), later) is None
    assert record_owner(s.get("10.254.0.1", later)) == B.node_id  # type: ignore[arg-type]


def test_the_owner_refreshes_with_a_newer_record_but_not_an_older_one() -> None:
    s = RecordStore(ROOM)
    new = make_record(A, ROOM, "10.254.0.1", 1100.0)
    assert s.put(new, 1100.0) is None
    assert s.put(make_record(A, ROOM, "10.254.0.1", 1000.0), 1100.0) == "older than the record held"
    assert s.get("10.254.0.1", 1100.0) == new


def test_expire_removes_only_dead_records() -> None:
    s = RecordStore(ROOM)
    s.put(make_record(A, ROOM, "10.254.0.1", 1000.0), 1000.0)
    s.put(make_record(B, ROOM, "10.254.0.2", 1300.0), 1300.0)
    assert s.expire(1000.0 + RECORD_TTL) == 1
    assert len(s) == 1 and s.get("10.254.0.2", 1000.0 + RECORD_TTL)


def test_replica_set_is_the_nodes_nearest_the_key() -> None:
    key = 1000
    ids = [990, 1003, 1020, 5000, 2**63]
    got = replica_set(key, 1003, ids, count=3)
    assert got == sorted(set(ids) | {1003}, key=lambda n: (ring_distance(n, key), n))[:3]
    assert got == [1003, 990, 1020]
    assert replica_set(key, 1003, ids) == [1003, 990, 1020, 5000][:REPLICAS]  # REPLICAS is 3: the same


def test_cache_entries_expire_with_the_cache_ttl_or_the_record() -> None:
    c = AddressCache(ttl=60.0)
    r = make_record(A, ROOM, "10.254.0.1", 1000.0, ttl=30.0)
    c.put(r, 1000.0)
    assert c.get("10.254.0.1", 1029.0) is not None
    assert c.get("10.254.0.1", 1030.0) is None
    c.put(make_record(A, ROOM, "10.254.0.1", 1000.0), 1000.0)
    c.evict_node(A.node_id)
    assert c.get("10.254.0.1", 1001.0) is None
