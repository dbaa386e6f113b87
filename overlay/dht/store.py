"""RecordStore (what this node holds for others) and AddressCache (what this node resolved for itself).

Conflicts: until group certificates bind an address to a key, the first owner of an address keeps it while
its record lives; only the same key may replace it, with a newer record. A second key claiming a held address
is refused and counted, so a node that joins with a duplicate address cannot take traffic from the first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from overlay.dht.records import AddressRecord, check_record, record_owner
from overlay.ids import ring_distance

REPLICAS = 3  # from the issue: at least 3 copies, at the nodes nearest the key (the root and its ring neighbours)
CACHE_TTL = 60.0  # our choice: a moved address is found again within a minute even without a no-route report
MAX_RECORDS = 100_000  # our choice: bounds memory a hostile group member can make us spend (~15 MB)


def replica_set(key: int, self_id: int, ring_peers: list[int], count: int = REPLICAS) -> list[int]:
    """The `count` nodes nearest `key` among this node and its ring neighbours (the key's successors and
    predecessors: with bidirectional routing the nearest node is the root, and its neighbours take over when it
    fails, so they must already hold the record)."""
    cands = set(ring_peers) | {self_id}
    return sorted(cands, key=lambda n: (ring_distance(n, key), n))[:count]


def holds_replica(key: int, self_id: int, near_key: list[int]) -> bool:
    """Whether this node is one of the REPLICAS nodes nearest `key`, judged from the nodes it knows nearest the
    key (`near_key`: its ring neighbours and the neighbours they gossip, RingTable.nearest_known). The key's
    root judges its replica set from its own ring neighbours; once gossip has converged both views name the
    same nodes, so a replica the root chose keeps its copy instead of sending it back and forth.
    """
    return self_id in replica_set(key, self_id, near_key)


@dataclass
class RecordStore:
    room: str
    # The group's check (overlay/trust/members.py record_problem): the record's certificate must give its
    # signer the address. None in a group without certificates.
    vouch: Callable[[AddressRecord], str | None] | None = None
    _records: dict[str, AddressRecord] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)

    def _count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    def put(self, record: AddressRecord, now: float) -> str | None:
        """Store a record; None when stored (or already held), else why it was refused."""
        why = check_record(record, self.room, now)
        if why is None and self.vouch is not None:
            why = self.vouch(record)
        if why is None:
            held = self._records.get(record.address)
            if held is not None and self.vouch is not None and self.vouch(held) is not None:
                held = None  # its certificate expired or was revoked: the address is free for the new holder
            if held is not None and held.expires_ms / 1000 > now:
                if held.public_key != record.public_key:
                    why = "address held by another node"
                elif record.issued_ms < held.issued_ms:
                    why = "older than the record held"
            elif held is None and len(self._records) >= MAX_RECORDS:
                self.expire(now)
                if len(self._records) >= MAX_RECORDS:
                    why = "store full"
        if why is not None:
            self._count("refused: " + why)
            return why
        self._records[record.address] = record
        return None

    def get(self, address: str, now: float) -> AddressRecord | None:
        rec = self._records.get(address)
        if rec is not None and rec.expires_ms / 1000 <= now:
            del self._records[address]
            return None
        return rec

    def remove(self, address: str) -> None:
        self._records.pop(address, None)

    def expire(self, now: float) -> int:
        dead = [a for a, r in self._records.items() if r.expires_ms / 1000 <= now]
        for a in dead:
            del self._records[a]
        return len(dead)

    def purge(self) -> int:
        """Drop records the group no longer vouches for (a revocation arrived); how many went."""
        if self.vouch is None:
            return 0
        gone = [a for a, r in self._records.items() if self.vouch(r) is not None]
        for address in gone:
            del self._records[address]
        return len(gone)

    def records(self) -> list[AddressRecord]:
        return list(self._records.values())

    def __len__(self) -> int:
        return len(self._records)


@dataclass(frozen=True, slots=True)
class Resolved:
    node_id: int
    public_key: bytes
    expires: float


@dataclass
class AddressCache:
    ttl: float = CACHE_TTL
    _entries: dict[str, Resolved] = field(default_factory=dict)

    def put(self, record: AddressRecord, now: float) -> Resolved:
        entry = Resolved(record_owner(record), record.public_key, min(record.expires_ms / 1000, now + self.ttl))
        self._entries[record.address] = entry
        return entry

    def get(self, address: str, now: float) -> Resolved | None:
        e = self._entries.get(address)
        if e is not None and e.expires <= now:
            del self._entries[address]
            return None
        return e

    def evict(self, address: str) -> None:
        self._entries.pop(address, None)

    def key_of(self, node_id: int) -> bytes | None:
        """The node key of a member whose address we resolved (an end-to-end session needs it)."""
        for e in self._entries.values():
            if e.node_id == node_id:
                return e.public_key
        return None

    def evict_node(self, node_id: int) -> None:
        for a in [a for a, e in self._entries.items() if e.node_id == node_id]:
            del self._entries[a]

    def __len__(self) -> int:
        return len(self._entries)
