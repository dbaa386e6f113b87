"""The address DHT's driver on a node: publishing our record, holding records for others, resolving addresses.

The pure parts (records, store, replica placement, cache) live beside this file; this class sends and receives
through the node: routed DHT_PUT / DHT_GET / DHT_VALUE messages and link-local REPLICATE copies.

- Publish: our record goes to the key's nearest node once our ring place is known (or after SETTLE_TIME), and
  again at half-life (REFRESH_AFTER). Every CHECK_INTERVAL the owner also looks its own address up; if the
  answer comes back empty (the record was placed while the ring was still forming, or every holder died at
  once) it publishes again at once, instead of leaving its address dark until the next refresh.
- Hold: a PUT delivered here is stored and copied to the other nodes of the replica set; a new ring neighbour
  gets copies of what it should hold; every EXPIRE_INTERVAL, expired records go and records whose key is not
  ours any more are routed on toward it (records placed while the ring was forming move home).
- Resolve: an address not in the cache is looked up (retried every LOOKUP_RETRY); packets for it wait in a
  bounded queue; after LOOKUP_TIMEOUT they are dropped, counted, and the sender's kernel gets an ICMP host
  unreachable.
"""

from __future__ import annotations

import ipaddress
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from overlay.dht.records import (
    REFRESH_AFTER,
    AddressRecord,
    check_record,
    decode_address,
    decode_dht_value,
    decode_record,
    encode_dht_value,
    make_record,
    record_key,
    value_kind,
)
from overlay.dht.store import REPLICAS, AddressCache, RecordStore, holds_replica, replica_set
from overlay.port import OverlayPort
from overlay.wire import FLAG_EXACT, FLAG_PASSED, FLAG_QUIET, Kind, LinkMsg, Routed

LOOKUP_RETRY = 1.0  # our choice: a lookup crosses ~log N hops of LAN/WAN RTT well inside a second
LOOKUP_TIMEOUT = 5.0
QUEUE_PER_ADDRESS = 32  # our choice: a TCP initial window (10 segments) plus retransmits, not a buffer bloat
EXPIRE_INTERVAL = 5.0  # our choice: records misplaced while the ring formed move home within seconds
SETTLE_TIME = 3.0
CHECK_INTERVAL = 10.0  # our choice: an address lost in a storm or a crash resolves again within ~15 s ...
# ... and, after the first checks, once the ring has settled, every 20 s: holders replace a dead holder themselves
# (on_neighbour_lost), so the check is for the loss of every holder at once (~7 % of 10 % kills of 100 nodes lose
# some record's 3 holders together; its owner then publishes again within 20 s).
SETTLED_CHECK_INTERVAL = 20.0
SETTLE_POLL = 1.0  # how often a node that has not published yet looks whether its ring has settled
# Our choice: the same while it knows of at most 2k peers, when a neighbour's list may close the ring at any moment
# (RingTable.ring_closes): at SETTLE_POLL the 3-member bench lab's members published ~1.0 s after their ring closed.
SMALL_RING_POLL = 0.1
MOVING_TIME = 30.0  # our choice: records move home every EXPIRE_INTERVAL for this long after the ring near us changed
LOST_CHECK_AFTER = 3.0  # our choice: after a ring neighbour dies, the ring repairs within a few seconds
NO_OWNER = "drop: no node owns the address"


@dataclass
class _Lookup:
    packets: deque[tuple[Kind, bytes]]  # DATA or DATA_GSO and its body
    started: float
    sent: float


class AddressService:
    def __init__(self, node: OverlayPort) -> None:
        self.node = node
        trust = node.trust
        self.vouch = (lambda r: trust.record_problem(r.address, r.public_key, r.credential)) if trust else None
        self.store = RecordStore(node.room, self.vouch)
        self.cache = AddressCache()
        self._lookups: dict[str, _Lookup] = {}
        self._published = -1e18
        self._checked = -1e18
        self._last_expire = -1e18
        self._moving_until = -1e18  # ring neighbours changed lately: records may have to move (_rehome)
        # Told every answered lookup (address as an int, the node it resolved to), and -1 for one that timed out.
        self.on_resolved: Callable[[int, int], None] | None = None

    # -- the clock -----------------------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        node = self.node
        for address, lookup in list(self._lookups.items()):
            if now - lookup.started >= LOOKUP_TIMEOUT:
                del self._lookups[address]
                if self.on_resolved is not None:
                    self.on_resolved(int(ipaddress.ip_address(address)), -1)
                node.count(NO_OWNER, len(lookup.packets))
                if lookup.packets:
                    kind, body = lookup.packets[0]
                    node.host_unreachable(body, kind, now)
            elif now - lookup.sent >= LOOKUP_RETRY:
                lookup.sent = now
                self._ask(address)
        if self._ring_settled(now):
            if now - self._published >= REFRESH_AFTER:
                self.publish(now)
            elif now - max(self._published, self._checked) >= self._check_interval(now):
                self._checked = now
                for address in self.own_addresses():
                    self._ask(address, FLAG_QUIET)
        if now - self._last_expire >= EXPIRE_INTERVAL:
            self._last_expire = now
            self.store.expire(now)
            self._rehome(now)

    def held(self) -> list[str]:
        """The addresses whose records this node holds (for `status`)."""
        return sorted(r.address for r in self.store.records())

    def pending(self) -> bool:
        """Whether lookups are under way (they retry every LOOKUP_RETRY)."""
        return bool(self._lookups)

    def next_deadline(self, now: float) -> float:
        """When `tick` next has work. An idle node sleeps until its next gossip round or this, so what must not
        wait for a round says so: the first publication once the ring settles, an owner's check after a
        holder died, records moving home while the ring near us changes."""
        if self._lookups:
            # The earliest retry, not LOOKUP_RETRY from now: a tick that came just before a retry was due put it
            # off by up to a whole interval (the 3-member bench lab retried an empty answer after 1.9 s).
            return min(lookup.sent for lookup in self._lookups.values()) + LOOKUP_RETRY
        if not self.node.links.links:
            return math.inf
        if self._published < 0:
            return now + (SMALL_RING_POLL if self.node.table.few_known() else SETTLE_POLL)
        due = min(self._published + REFRESH_AFTER, max(self._published, self._checked) + self._check_interval(now))
        if now < self._moving_until:
            due = min(due, self._last_expire + EXPIRE_INTERVAL)
        return due

    def _check_interval(self, now: float) -> float:
        return CHECK_INTERVAL if now - self.node.first_link_at < 4 * CHECK_INTERVAL else SETTLED_CHECK_INTERVAL

    # -- our own records -------------------------------------------------------------------------------------
    def own_addresses(self) -> list[str]:
        """Our virtual IPv4 address, and IPv6 address when we have one: each has its own record."""
        node = self.node
        return [node.address] if node.address6 is None else [node.address, node.address6]

    def publish(self, now: float) -> None:
        node = self.node
        self._published = now
        credential = node.trust.own() if node.trust is not None else b""
        for address in self.own_addresses():
            record = make_record(node.identity, node.room, address, now, credential=credential)
            node.send_routed(record_key(node.room, address), Kind.DHT_PUT, record.encode(), 0)

    def _ring_settled(self, now: float) -> bool:
        """Publish only once our ring place is known (or a few seconds have passed): a record routed from a
        node with just its bootstrap link would land next to the anchor, not next to its key. In a ring of at
        most 2k+1 members, knowing all of them is knowing our place (RingTable.ring_closes): a member with
        fewer than k links otherwise waited the whole SETTLE_TIME, and the first pings of the 3-member bench
        lab waited ~1.8 s for the addresses (median of the first 40: ~680 ms)."""
        node = self.node
        if not node.links.links:
            return False
        k = node.table.params.ring_size
        full = len(node.table.successors()) >= k and len(node.table.predecessors()) >= k
        return full or node.table.ring_closes() or now - node.first_link_at >= SETTLE_TIME

    # -- records we hold for others --------------------------------------------------------------------------
    def on_put(self, pkt: Routed) -> None:
        now = self.node.clock()
        record = decode_record(pkt.body)
        why = self.store.put(record, now)
        if why is not None:
            self.node.count(f"record refused: {why}")
            return
        key = record_key(self.node.room, record.address)
        msg = bytes([LinkMsg.REPLICATE]) + record.encode()
        for peer in replica_set(key, self.node.id, list(self.node.table.ring_peers())):
            link = self.node.links.links.get(peer)
            if peer != self.node.id and link is not None:
                link.send(msg)

    def on_replica(self, body: bytes, now: float) -> None:
        why = self.store.put(decode_record(body), now)
        if why is not None:
            self.node.count(f"replica refused: {why}")

    def on_get(self, pkt: Routed) -> None:
        now = self.node.clock()
        address = decode_address(pkt.body)
        record = self.store.get(address, now)
        if record is None and not pkt.flags & FLAG_PASSED and self._pass_on(pkt, address):
            return
        value = encode_dht_value(address, record)
        self.node.send_routed(pkt.src, value_kind(address), value, FLAG_EXACT | (pkt.flags & FLAG_QUIET))

    def _pass_on(self, pkt: Routed, address: str) -> bool:
        """A lookup reached us, the key's root, and we hold no record: we restarted (a restarted node holds
        nothing until its neighbours hand records over) or joined nearer the key than the node that holds it,
        which moves it here within EXPIRE_INTERVAL. The other replicas answer the asker instead of our "none",
        which would leave it retrying every LOOKUP_RETRY until that, or until LOOKUP_TIMEOUT said no node owns
        the address. Whether any of us were sent it: the asker's retry, as before."""
        table = self.node.table
        key = record_key(self.node.room, address)
        others = [
            p
            for p in replica_set(key, self.node.id, table.successors() + table.predecessors())
            if p != self.node.id and p in self.node.links.links
        ]
        for peer in others:
            self.node.pass_on(pkt, peer, FLAG_EXACT | FLAG_PASSED | (pkt.flags & FLAG_QUIET))
        if others:
            self.node.count("address lookups passed on to replicas")
        return bool(others)

    def hand_over(self, peer: int) -> None:
        """A new ring neighbour may now be one of the nodes nearest a key we hold: give it a copy."""
        table = self.node.table
        succ, pred = table.successors(), table.predecessors()
        if peer not in succ and peer not in pred:
            return
        self._moving_until = self.node.clock() + MOVING_TIME
        link = self.node.links.links[peer]
        for record in self.store.records():
            key = record_key(self.node.room, record.address)
            near = self.node.table.nearest_known(key, REPLICAS)
            if holds_replica(key, self.node.id, near) and peer in replica_set(key, self.node.id, succ + pred):
                link.send(bytes([LinkMsg.REPLICATE]) + record.encode())

    def on_neighbour_lost(self, peer: int, was_ring: bool, now: float) -> None:
        """A ring neighbour died: each record we still hold a replica of gets copied to the nodes now nearest its
        key (the dead node's place in the replica set is taken by a node that may have no copy yet), and our
        own record is checked within LOST_CHECK_AFTER: the nodes that held it may have died together."""
        if not was_ring:
            return
        self._moving_until = now + MOVING_TIME
        table = self.node.table
        peers = table.successors() + table.predecessors()
        for record in self.store.records():
            key = record_key(self.node.room, record.address)
            if not holds_replica(key, self.node.id, table.nearest_known(key, REPLICAS)):
                continue
            msg = bytes([LinkMsg.REPLICATE]) + record.encode()
            for holder in replica_set(key, self.node.id, peers):
                link = self.node.links.links.get(holder)
                if holder != self.node.id and link is not None:
                    link.send(msg)
        self._checked = min(self._checked, now - self._check_interval(now) + LOST_CHECK_AFTER)

    def _rehome(self, now: float) -> None:
        """Records we hold but are no longer among the nodes nearest their key (nodes joined nearer, or the
        record arrived while the ring was forming) are routed on toward their key and dropped here."""
        node = self.node
        for record in self.store.records():
            key = record_key(node.room, record.address)
            if not holds_replica(key, node.id, node.table.nearest_known(key, REPLICAS)):
                self.store.remove(record.address)
                node.send_routed(key, Kind.DHT_PUT, record.encode(), 0)

    # -- resolving addresses -----------------------------------------------------------------------------------
    def resolve_and_send(self, address: str, packet: bytes, kind: Kind = Kind.DATA) -> None:
        """Send a data body (an IPv4 packet, or for DATA_GSO a virtio_net_hdr and one) to the member that
        owns `address`, looking the address up in the DHT first when it is not cached."""
        node = self.node
        now = node.clock()
        if address in self.own_addresses():
            node.deliver_data(packet, kind)
            return
        entry = self.cache.get(address, now)
        if entry is not None:
            node.send_data(entry.node_id, kind, packet)
            return
        lookup = self._lookups.get(address)
        if lookup is not None:
            if len(lookup.packets) == QUEUE_PER_ADDRESS:
                node.count("drop: queue full while resolving")
            lookup.packets.append((kind, packet))
            return
        # Queue first: when we hold the record ourselves the answer arrives before send_routed returns.
        self._lookups[address] = _Lookup(deque([(kind, packet)], maxlen=QUEUE_PER_ADDRESS), now, now)
        self._ask(address)
        node.wake(LOOKUP_RETRY)  # retried on the tick: an idle node's next one may be a gossip round away

    def look_up(self, address: str) -> None:
        """Fetch `address`'s record (and its certificate) without sending anything: the data path checks a
        sender it has no certificate of (overlay/datapath.py). The answer goes to `on_resolved`."""
        if address in self._lookups:
            return
        now = self.node.clock()
        self._lookups[address] = _Lookup(deque(maxlen=QUEUE_PER_ADDRESS), now, now)
        self._ask(address)
        self.node.wake(LOOKUP_RETRY)

    def _ask(self, address: str, flags: int = 0) -> None:
        node = self.node
        node.count("address lookups sent")  # retries included: a route that needs several is visible
        node.send_routed(record_key(node.room, address), Kind.DHT_GET, ipaddress.ip_address(address).packed, flags)

    def on_value(self, pkt: Routed) -> None:
        now = self.node.clock()
        address, record = decode_dht_value(pkt.body, pkt.kind)
        if address in self.own_addresses():
            if record is None or record.public_key != self.node.identity.public_key:
                self.node.count("own record missing: published again")
                self.publish(now)
            return
        lookup = self._lookups.get(address)
        if record is None or lookup is None:
            return
        why = self._usable(record, address, now)
        if why is not None:
            self.node.count(f"drop: DHT value {why}")
            return
        entry = self.cache.put(record, now)
        del self._lookups[address]
        for kind, packet in lookup.packets:
            self.node.send_data(entry.node_id, kind, packet)
        if self.on_resolved is not None:
            self.on_resolved(int(ipaddress.ip_address(address)), entry.node_id)

    def _usable(self, record: AddressRecord, address: str, now: float) -> str | None:
        if record.address != address:
            return "for another address"
        return check_record(record, self.node.room, now) or (self.vouch(record) if self.vouch else None)
