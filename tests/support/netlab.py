"""A network-namespace lab: hosts on one bridge, each in its own namespace, removed again on exit.

Used by the integration tests, the demo script and the benchmarks. Nothing is created in the root
namespace: the bridge lives in a hub namespace of its own, and each veth pair is created there with its
far end moved straight into the host's namespace. Addresses come from 198.18.0.0/15, the range RFC 2544
reserves for benchmarking, so lab traffic can never be mistaken for (or routed to) a real network.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

# RFC 2544 §C.2.2 (RFC 6890): 198.18.0.0/15 is for benchmarking, never routed on the Internet.
LAB_RANGE = ipaddress.IPv4Network("198.18.0.0/15")
HOST_IFNAME = "eth0"
BRIDGE = "br0"
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
    address: str  # e.g. "198.18.0.1"
    prefix_len: int
    ifname: str = HOST_IFNAME


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
        self._namespaces: list[str] = []
        self._processes: list[subprocess.Popen[Any]] = []
        self._addresses: Iterator[ipaddress.IPv4Address] = iter(())
        self._subnet: ipaddress.IPv4Network | None = None
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
        network = ipaddress.IPv4Network(subnet)
        if not network.subnet_of(LAB_RANGE):
            raise ValueError(f"lab subnet {subnet} is outside {LAB_RANGE}: use the benchmarking range")
        self.hub = self._add_namespace("hub")
        self._ip("-n", self.hub, "link", "add", BRIDGE, "type", "bridge")
        self._ip("-n", self.hub, "link", "set", BRIDGE, "mtu", str(mtu), "up")
        self._subnet = network
        self._addresses = iter(network.hosts())
        self._mtu = mtu

    def add_host(self, name: str) -> Host:
        """A namespace with lo up and `eth0` on the hub bridge, addressed with the next subnet address."""
        if self.hub is None or self._subnet is None:
            raise ValueError("add_hub() before add_host()")
        if not _NAME.fullmatch(name) or name == "hub":
            raise ValueError(f"host name {name!r} must be 1-8 lowercase letters/digits, letter first")
        address = next(self._addresses, None)
        if address is None:
            raise ValueError(f"subnet {self._subnet} has no addresses left")
        netns = self._add_namespace(name)
        port = f"p{len(self.hosts)}"
        mtu = str(self._mtu)
        self._ip("-n", self.hub, "link", "add", port, "mtu", mtu, "type", "veth", "peer", "name", HOST_IFNAME,
                 "mtu", mtu, "netns", netns)  # fmt: skip
        self._ip("-n", self.hub, "link", "set", port, "master", BRIDGE, "up")
        prefix_len = self._subnet.prefixlen
        self._ip("-n", netns, "addr", "add", f"{address}/{prefix_len}", "dev", HOST_IFNAME)
        self._ip("-n", netns, "link", "set", HOST_IFNAME, "up")
        host = Host(name, netns, str(address), prefix_len)
        self.hosts.append(host)
        return host

    def block_udp(self, a: Host, b: Host) -> None:
        """Silently drop UDP between `a` and `b`, in both directions; ICMP and TCP still pass.

        The rule sits in INPUT on each side: a DROP in OUTPUT makes send() fail at once with EPERM, which
        tells the sender something a lossy path would not.
        """
        for here, there in ((a, b), (b, a)):
            self.run(here, "iptables", "-w", "-A", "INPUT", "-p", "udp", "-s", there.address, "-j", "DROP")

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
        self.hub = None


def _run(argv: list[str], *, check: bool, timeout: float, **kw: Any) -> subprocess.CompletedProcess[str]:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    result = subprocess.run(argv, timeout=timeout, check=False, **kw)
    if check and result.returncode != 0:
        raise NetLabError(result.returncode, argv, result.stdout, result.stderr)
    return result


def _namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]
