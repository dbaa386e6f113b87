"""A network-namespace lab: hosts on one bridge, each in its own namespace, removed again on exit.

Used by the integration tests, the demo script and the benchmarks. Nothing is created in the root
namespace: the bridge lives in a hub namespace of its own, and each veth pair is created there with its
far end moved straight into the host's namespace. Addresses come from 198.18.0.0/15, the range RFC 2544
reserves for benchmarking, so lab traffic can never be mistaken for (or routed to) a real network.

NAT clusters: a router namespace with `eth0` on the hub (a public lab address) and a LAN bridge of its own;
hosts added to the cluster sit on that LAN with private addresses and a default route via the router, which
masquerades them behind its public address. The two kinds are named after the behaviour RFC 4787 defines
and tests/test_natlab.py measures: "cone" is plain MASQUERADE (endpoint-independent mapping while the port
is free, address-and-port-dependent filtering: a port-restricted cone in RFC 3489 terms), "symmetric" is
MASQUERADE --random-fully (address-and-port-dependent mapping: a new port for every destination).
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import re
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

# RFC 2544 §C.2.2 (RFC 6890): 198.18.0.0/15 is for benchmarking, never routed on the Internet.
LAB_RANGE = ipaddress.IPv4Network("198.18.0.0/15")
HOST_IFNAME = "eth0"
BRIDGE = "br0"
# Our choice: cluster k's LAN is 198.18.(10+k).0/24, inside LAB_RANGE and apart from the hub's 198.18.0.0/24.
CLUSTER_SUBNET_BASE = ipaddress.IPv4Network("198.18.10.0/24")
LAN_BRIDGE = "lan0"
NAT_KINDS = ("cone", "symmetric")
# Our choice: how long a started process gets between SIGTERM and SIGKILL on exit.
TERMINATE_GRACE_S = 3.0
_NAME = re.compile(r"[a-z][a-z0-9]{0,7}")


class NetLabError(subprocess.CalledProcessError):
    """A lab command failed; unlike CalledProcessError, its message includes the command's stderr."""

    def __str__(self) -> str:
        err = (self.stderr or "").strip().replace("\n", " | ")
        return f"{' '.join(map(str, self.cmd))} exited {self.returncode}: {err or 'no stderr'}"


@dataclass(frozen=True, slots=True)
class Host:
    name: str
    netns: str
    address: str  # e.g. "198.18.0.1"; a private cluster address for a host behind a NAT
    prefix_len: int
    ifname: str = HOST_IFNAME
    cluster: str | None = None  # the NAT cluster whose LAN the host sits on; None: the public hub


@dataclass(frozen=True, slots=True)
class Cluster:
    """A NAT router and the LAN behind it."""

    name: str
    kind: str  # one of NAT_KINDS
    router: Host  # the router's namespace; `router.address` is its public address on the hub
    subnet: ipaddress.IPv4Network  # the LAN, e.g. 198.18.10.0/24
    gateway: str  # the router's LAN address, the default route of every host in the cluster

    @property
    def public_address(self) -> str:
        """The address every host of the cluster is seen at from outside it."""
        return self.router.address


@dataclass
class _Segment:
    """One bridge and the addresses still free on it."""

    netns: str  # the namespace holding the bridge
    bridge: str
    subnet: ipaddress.IPv4Network
    addresses: Iterator[ipaddress.IPv4Address]
    port_prefix: str  # bridge port names: f"{port_prefix}{n}"
    gateway: str | None = None
    ports: Iterator[int] = field(default_factory=itertools.count)


class NetLab:
    """Context manager: every namespace it made and every process it started is gone after exit.

    Names are `f"{prefix}{pid % 10000}{letter}-{host}"`; the letter skips tags still present (a lab of a
    process that died without cleaning up, or a second lab in this process), so a lab never adopts, or
    removes, anything it did not make.
    """

    _sequence = itertools.count()

    def __init__(self, prefix: str = "ipo") -> None:
        if not re.fullmatch(r"[a-z]{1,4}", prefix):
            raise ValueError(f"lab prefix {prefix!r} must be 1-4 lowercase letters")
        existing = _namespaces()
        for n in self._sequence:
            tag = f"{prefix}{os.getpid() % 10000}{chr(ord('a') + n % 26)}"
            if not any(ns.startswith(tag + "-") for ns in existing):
                break
        self.tag = tag
        self.prefix = tag + "-"
        self.hub: str | None = None
        self.hosts: list[Host] = []
        self.clusters: dict[str, Cluster] = {}
        self._namespaces: list[str] = []
        self._processes: list[subprocess.Popen[Any]] = []
        self._segments: dict[str | None, _Segment] = {}  # None: the hub
        self._extra_addresses: dict[str, list[str]] = {}  # netns -> addresses added by add_address()
        self._mtu = 1500

    def __enter__(self) -> NetLab:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- building ----------------------------------------------------------------------------------------

    def _ip(self, *argv: str) -> None:
        _run(["ip", *argv], check=True, timeout=30)

    def _add_namespace(self, suffix: str) -> str:
        name = self.prefix + suffix
        self._ip("netns", "add", name)
        self._namespaces.append(name)
        self._ip("-n", name, "link", "set", "lo", "up")
        return name

    def add_hub(self, subnet: str = "198.18.0.0/24", mtu: int = 1500) -> None:
        """A bridge in its own namespace; hosts added later get the next addresses of `subnet`."""
        if self.hub is not None:
            raise ValueError(f"lab {self.tag} already has a hub")
        network = _lab_subnet(subnet)
        self.hub = self._add_namespace("hub")
        self._ip("-n", self.hub, "link", "add", BRIDGE, "type", "bridge")
        self._ip("-n", self.hub, "link", "set", BRIDGE, "mtu", str(mtu), "up")
        self._segments[None] = _Segment(self.hub, BRIDGE, network, iter(network.hosts()), "p")
        self._mtu = mtu

    def remap_nat(self, name: str, ports: tuple[int, int]) -> None:
        """The cluster's router maps every flow anew from `ports` (as a NAT that rebooted, or a member whose
        network changed under it): its rule changes and its connection tracking is flushed, so existing
        mappings are gone and the next datagram out gets a new public port."""
        cluster = self.clusters[name]
        masquerade = ["-t", "nat", "-I", "POSTROUTING", "1", "-o", HOST_IFNAME, "-p", "udp", "-j", "MASQUERADE",
                      "--to-ports", f"{ports[0]}-{ports[1]}"]  # fmt: skip
        if cluster.kind == "symmetric":
            masquerade.append("--random-fully")
        self.run(cluster.router, "iptables", "-w", *masquerade)
        self.run(cluster.router, "conntrack", "-F", check=False)

    def add_cluster(self, name: str, kind: str = "cone", subnet: str | None = None) -> Cluster:
        """A NAT router on the hub with a LAN bridge behind it; `add_host(..., cluster=name)` puts hosts there.

        The router gets the next hub address and the LAN's first address; `subnet` defaults to
        198.18.(10+k).0/24 for the k-th cluster. Forwarding is switched on in the router's namespace only.
        """
        if kind not in NAT_KINDS:
            raise ValueError(f"NAT kind {kind!r} must be one of {', '.join(NAT_KINDS)}")
        self._check_name(name, "cluster")
        if name in self.clusters:
            raise ValueError(f"lab {self.tag} already has a cluster {name!r}")
        if subnet is None:
            base = CLUSTER_SUBNET_BASE.network_address + len(self.clusters) * CLUSTER_SUBNET_BASE.num_addresses
            subnet = f"{base}/{CLUSTER_SUBNET_BASE.prefixlen}"
        network = _lab_subnet(subnet)
        for segment in self._segments.values():
            if network.overlaps(segment.subnet):
                raise ValueError(f"cluster subnet {network} overlaps {segment.subnet}, already in lab {self.tag}")
        # Host names are letters and digits only, so "nat-" never names a host's namespace.
        router = self._attach(self._add_namespace(f"nat-{name}"), f"nat-{name}", None)
        addresses = iter(network.hosts())
        gateway = str(next(addresses))
        r = router.netns
        self._ip("-n", r, "link", "add", LAN_BRIDGE, "type", "bridge")
        self._ip("-n", r, "link", "set", LAN_BRIDGE, "mtu", str(self._mtu), "up")
        self._ip("-n", r, "addr", "add", f"{gateway}/{network.prefixlen}", "dev", LAN_BRIDGE)
        self._segments[name] = _Segment(r, LAN_BRIDGE, network, addresses, "q", gateway)
        # Plain MASQUERADE gives a new connection the public port its LAN address:port already has (the
        # kernel's by-source lookup), else the source port itself when free, else another: one LAN socket
        # keeps one public port for every destination (RFC 4787 §4.1 endpoint-independent mapping), also toward
        # a peer whose datagram reached that port first (see the INPUT rules below). --random-fully picks a
        # random port for every new connection (address-and-port-dependent mapping, "symmetric").
        masquerade = ["-t", "nat", "-A", "POSTROUTING", "-o", HOST_IFNAME, "-j", "MASQUERADE"]
        self.run(router, "iptables", "-w", *masquerade, *(["--random-fully"] if kind == "symmetric" else []))
        # Inbound, only what conntrack matches to a connection a LAN host opened (RFC 4787 §5: address and
        # port-dependent filtering); anything else addressed to the LAN is dropped, as on a home router, even
        # if another lab host had a route to it.
        inbound = ["-A", "FORWARD", "-i", HOST_IFNAME, "-o", LAN_BRIDGE]
        self.run(router, "iptables", "-w", *inbound, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED",
                 "-j", "ACCEPT")  # fmt: skip
        self.run(router, "iptables", "-w", *inbound, "-j", "DROP")
        # The router's own public address takes nothing unsolicited either, as on a home router. Dropped in
        # INPUT, a datagram to a mapped port never gets its conntrack entry confirmed; accepted (and answered
        # with ICMP port unreachable), it would leave an entry on that port, and the LAN host's own later flow
        # to that peer would get another public port (measured): hole punching would then depend on both
        # sides' first packets crossing in flight.
        local = ["-A", "INPUT", "-i", HOST_IFNAME]
        self.run(router, "iptables", "-w", *local, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED",
                 "-j", "ACCEPT")  # fmt: skip
        self.run(router, "iptables", "-w", *local, "-j", "DROP")
        # net.ipv4.ip_forward is per network namespace: this leaves the root namespace's setting alone.
        self.run(router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        cluster = Cluster(name, kind, router, network, gateway)
        self.clusters[name] = cluster
        return cluster

    def add_host(self, name: str, cluster: str | None = None) -> Host:
        """A namespace with lo up and `eth0` on the hub bridge, addressed with the next subnet address.

        With `cluster`, `eth0` is on that cluster's LAN instead, with a private address and a default route
        via the NAT router.
        """
        if self.hub is None:
            raise ValueError("add_hub() before add_host()")
        self._check_name(name, "host")
        if cluster is not None and cluster not in self.clusters:
            raise ValueError(f"no cluster {cluster!r} in lab {self.tag}: add_cluster() first")
        host = self._attach(self._add_namespace(name), name, cluster)
        self.hosts.append(host)
        return host

    def _check_name(self, name: str, what: str) -> None:
        if not _NAME.fullmatch(name) or name == "hub":
            raise ValueError(f"{what} name {name!r} must be 1-8 lowercase letters/digits, letter first")

    def _attach(self, netns: str, name: str, segment_name: str | None) -> Host:
        """Plug `netns` into a segment: a veth pair from the bridge, `eth0` addressed, a default route on a LAN."""
        segment = self._segments[segment_name]
        address = next(segment.addresses, None)
        if address is None:
            raise ValueError(f"subnet {segment.subnet} has no addresses left")
        port = f"{segment.port_prefix}{next(segment.ports)}"
        mtu = str(self._mtu)
        self._ip("-n", segment.netns, "link", "add", port, "mtu", mtu, "type", "veth", "peer", "name", HOST_IFNAME,
                 "mtu", mtu, "netns", netns)  # fmt: skip
        self._ip("-n", segment.netns, "link", "set", port, "master", segment.bridge, "up")
        prefix_len = segment.subnet.prefixlen
        self._ip("-n", netns, "addr", "add", f"{address}/{prefix_len}", "dev", HOST_IFNAME)
        self._ip("-n", netns, "link", "set", HOST_IFNAME, "up")
        if segment.gateway is not None:
            self._ip("-n", netns, "route", "add", "default", "via", segment.gateway, "dev", HOST_IFNAME)
        return Host(name, netns, str(address), prefix_len, cluster=segment_name)

    def add_address(self, host: Host) -> str:
        """Give `host` the next free address of its segment as a second (third, ...) address on `eth0`."""
        segment = self._segments[host.cluster]
        address = next(segment.addresses, None)
        if address is None:
            raise ValueError(f"subnet {segment.subnet} has no addresses left")
        self._ip("-n", host.netns, "addr", "add", f"{address}/{segment.subnet.prefixlen}", "dev", host.ifname)
        self._extra_addresses.setdefault(host.netns, []).append(str(address))
        return str(address)

    def addresses(self, host: Host) -> list[str]:
        """Every address `host` has in the lab: its own first, then those add_address() gave it."""
        return [host.address, *self._extra_addresses.get(host.netns, [])]

    @property
    def public_subnet(self) -> ipaddress.IPv4Network:
        """The hub's subnet: every address a host outside a NAT, or a NAT router, is seen at."""
        if None not in self._segments:
            raise ValueError("add_hub() first")
        return self._segments[None].subnet

    def cluster_of(self, host: Host) -> Cluster | None:
        return None if host.cluster is None else self.clusters[host.cluster]

    def seen_address(self, host: Host, by: Host) -> str:
        """The source address `by` sees on packets from `host`: the router's for a host behind another NAT."""
        if host.cluster is None or host.cluster == by.cluster:
            return host.address
        return self.clusters[host.cluster].public_address

    def block_udp(self, a: Host, b: Host) -> None:
        """Silently drop UDP between `a` and `b`, in both directions; ICMP and TCP still pass.

        Between hosts that see each other's own address (both public, or on one LAN) the rules sit in INPUT on
        each side: a DROP in OUTPUT makes send() fail at once with EPERM, which tells the sender something a
        lossy path would not. For a host behind a NAT talking across it, its router drops the pair in FORWARD,
        where both the host's private address and the other side's public one are visible. Two hosts behind
        two different NATs have no such place (each router sees the other host only as the other router), so
        that pair is refused rather than blocked for its whole cluster.
        """
        if a.cluster == b.cluster:  # both public, or both on one LAN: each sees the other's own address
            for here, there in ((a, b), (b, a)):
                self.run(here, "iptables", "-w", "-A", "INPUT", "-p", "udp", "-s", there.address, "-j", "DROP")
            return
        if a.cluster is not None and b.cluster is not None:
            raise ValueError(
                f"cannot block UDP between {a.name} (cluster {a.cluster}) and {b.name} (cluster {b.cluster}) "
                "precisely: behind two NATs each sees the other only as its router's address"
            )
        inside, outside = (a, b) if a.cluster is not None else (b, a)
        router = self.clusters[str(inside.cluster)].router
        for src, dst in ((inside.address, outside.address), (outside.address, inside.address)):
            # Inserted first: ahead of the router's rule that accepts established inbound traffic.
            self.run(router, "iptables", "-w", "-I", "FORWARD", "1", "-p", "udp", "-s", src, "-d", dst, "-j", "DROP")

    def lose_to(self, host: Host, addresses: Sequence[str]) -> Callable[[], None]:
        """Lose everything `host` (behind a NAT) sends to `addresses`, as an unreachable server does, until the
        function returned is called. The rules sit in its router's FORWARD, where a drop is silent (in the
        host's own OUTPUT, send() would fail at once with EPERM)."""
        if host.cluster is None:
            raise ValueError(f"{host.name} is not behind a NAT")
        router = self.clusters[host.cluster].router
        rules = [["FORWARD", "-s", host.address, "-d", address, "-j", "DROP"] for address in addresses]
        for rule in rules:
            # Inserted first: ahead of the router's rule that accepts established traffic.
            self.run(router, "iptables", "-w", "-I", rule[0], "1", *rule[1:])

        def restore() -> None:
            for rule in rules:
                self.run(router, "iptables", "-w", "-D", *rule)

        return restore

    # -- running -----------------------------------------------------------------------------------------

    def run(
        self, host: Host, *argv: str, check: bool = True, timeout: float = 30, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside `host`'s namespace and wait for it (text output captured)."""
        return _run(["ip", "netns", "exec", host.netns, *argv], check=check, timeout=timeout, **kw)

    def popen(self, host: Host, *argv: str, **kw: Any) -> subprocess.Popen[Any]:
        """Start a command inside `host`'s namespace; it is terminated (then killed) on exit.

        `ip netns exec` execs the command in place, so the PID tracked is the command's own.
        """
        process = subprocess.Popen(["ip", "netns", "exec", host.netns, *argv], **kw)
        self._processes.append(process)
        return process

    # -- teardown ----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop our processes (by PID), then delete our namespaces; safe to call twice."""
        processes, self._processes = self._processes, []
        for p in processes:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.terminate()
        for p in processes:
            try:
                p.wait(timeout=TERMINATE_GRACE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait(timeout=TERMINATE_GRACE_S)
        namespaces, self._namespaces = self._namespaces, []
        # Hosts first: deleting a host namespace destroys its veth end, and with it the hub's port.
        for name in reversed(namespaces):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30, check=False)
        self.hosts = []
        self.clusters = {}
        self._segments = {}
        self._extra_addresses = {}
        self.hub = None


def _run(argv: list[str], *, check: bool, timeout: float, **kw: Any) -> subprocess.CompletedProcess[str]:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    result = subprocess.run(argv, timeout=timeout, check=False, **kw)
    if check and result.returncode != 0:
        raise NetLabError(result.returncode, argv, result.stdout, result.stderr)
    return result


def _lab_subnet(subnet: str) -> ipaddress.IPv4Network:
    network = ipaddress.IPv4Network(subnet)
    if not network.subnet_of(LAB_RANGE):
        raise ValueError(f"lab subnet {subnet} is outside {LAB_RANGE}: use the benchmarking range")
    return network


def _namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]
