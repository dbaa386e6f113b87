"""The systems bench/peers.py compares, each set up on the same three-host lab: ipop-overlay, five peer VPNs, veth.

One lab shape for all (tests/support/netlab.py): hosts a, b and c on one hub bridge, and every IPv4 packet between
a and c dropped on arrival at either end, so a->c can only cross b. b relays in its VPN daemon with IP forwarding
off; WireGuard has no relay of its own, so there b forwards in its kernel (and the veth reference row routes a->c
through b's kernel the same way). Overlay addresses are 10.252.0.1/2/3 (/24) for a/b/c; Yggdrasil routes its own
200::/7 addresses. Every daemon runs in its lab namespace, its TUN/TAP device made there; its config, keys and log
live in the work directory the caller gives (and removes). On exit the daemons are stopped by PID and the lab's
namespaces deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.group import TAP_NAME, Group, missing_prerequisites
from tests.support.netlab import HOST_IFNAME, Host, NetLab

# Our choice: labs named ipv<pid><letter>-*, apart from the test suites' (ipg, ilt, ipb, ...) on a shared machine.
LAB_PREFIX = "ipv"
NODES = ("a", "b", "c")
OVERLAY = {"a": "10.252.0.1", "b": "10.252.0.2", "c": "10.252.0.3"}
OVERLAY_NET = "10.252.0.0/24"
OVERLAY_PREFIX_LEN = 24
PATHS = ("direct", "relayed")  # a->b, and a->c across b
WG_SOCKET_DIR = Path("/var/run/wireguard")  # wireguard-go's UAPI sockets, one per interface, shared by all namespaces
# The daemons' default ports (each namespace has its own port space).
WG_PORT = 51820
NEBULA_PORT = 4242
YGGDRASIL_PORT = 12345
FASTD_PORT = 10000
TINC_PORT = 655
# Yggdrasil 0.4.7's IfMTU default (it caps it to what its packet format carries, ~53049): left as shipped.
YGGDRASIL_MTU = 65535
# fastd's manual ("MTU configuration"): 1500 on the underlay, less 28 (IPv4 + UDP), 24 (any crypto method) and 14
# (TAP mode): the largest MTU whose packets are never fragmented on this lab's hub.
FASTD_MTU = 1500 - 28 - 24 - 14
# Our choices: how long a daemon gets to open its socket, and a stopped one to exit before SIGKILL.
START_TIMEOUT_S = 10.0
TUNNEL_TIMEOUT_S = 30.0  # our choice: ~10x what the a-c tunnel takes in the lab
STOP_TIMEOUT_S = 5.0
TOOL_TIMEOUT_S = 30.0


@dataclass
class Deployment:
    """One system up on its lab: where traffic starts, where each path ends, which processes carry it."""

    system: str
    lab: NetLab
    source: Host  # a
    destinations: dict[str, tuple[Host, str]]  # path -> (host that runs the iperf3 server, address to reach)
    daemons: list[int]  # PIDs of the VPN processes on a, b and c (none for veth)
    device: str  # the interface on `source` that the measured traffic leaves by (its MTU goes in the table)
    notes: dict[str, list[str]] = field(default_factory=dict)  # path -> remarks for the table
    logs: list[Path] = field(default_factory=list)  # daemon logs, shown when a tunnel does not come up


@dataclass(frozen=True)
class System:
    name: str
    deploy: Callable[[Path], contextlib.AbstractContextManager[Deployment]]
    binaries: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()  # the Debian packages that bring `binaries`
    prerequisites: Callable[[], str | None] | None = None  # for what `binaries` cannot say

    def missing(self) -> str | None:
        """Why this system cannot run here, or None."""
        absent = [b for b in self.binaries if shutil.which(b) is None]
        if absent:
            return f"{', '.join(absent)} not installed"
        return None if self.prerequisites is None else self.prerequisites()


# -- the lab -------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def three_hosts(*, kernel_path_via_b: bool = False) -> Iterator[tuple[NetLab, dict[str, Host]]]:
    """A fresh lab: a, b, c on one hub, forwarding off everywhere, a<->c cut (see `cut`)."""
    with NetLab(LAB_PREFIX) as lab:
        lab.add_hub()
        hosts = {n: lab.add_host(n) for n in NODES}
        for host in hosts.values():
            forwarding(lab, host, on=False)
        cut(lab, hosts["a"], hosts["c"], except_via=hosts["b"] if kernel_path_via_b else None)
        yield lab, hosts


def cut(lab: NetLab, x: Host, y: Host, *, except_via: Host | None = None) -> None:
    """Drop every IPv4 packet between x and y, in INPUT on both sides, then check a ping no longer gets through.

    INPUT, not OUTPUT: a DROP in OUTPUT fails send() at once with EPERM, which a lossy path would not. With
    `except_via`, packets that arrive from that host's MAC still pass: the kernel-forwarded path of the veth row.
    """
    via = [] if except_via is None else ["-m", "mac", "!", "--mac-source", mac_address(lab, except_via)]
    for here, there in ((x, y), (y, x)):
        lab.run(here, "iptables", "-w", "-A", "INPUT", "-s", there.address, *via, "-j", "DROP")
    probe = lab.run(x, "ping", "-n", "-q", "-c", "1", "-W", "1", y.address, check=False, timeout=10)
    if probe.returncode == 0:
        raise RuntimeError(f"{x.name} still reaches {y.name} at {y.address} after the cut; no relayed path to measure")


def mac_address(lab: NetLab, host: Host) -> str:
    out = lab.run(host, "ip", "-j", "link", "show", "dev", host.ifname)
    return str(json.loads(out.stdout)[0]["address"])


def forwarding(lab: NetLab, host: Host, *, on: bool, devices: tuple[str, ...] = ()) -> None:
    """IPv4 forwarding in `host`'s namespace (the sysctl is per namespace). When on, no ICMP redirects from the
    forwarding host (on `devices`): a redirect would tell a to skip b and talk to c, which the cut drops."""
    lab.run(host, "sysctl", "-q", "-w", f"net.ipv4.ip_forward={int(on)}")
    if on:
        for device in ("all", *devices):
            lab.run(host, "sysctl", "-q", "-w", f"net.ipv4.conf.{device}.send_redirects=0")


def start(lab: NetLab, host: Host, log: Path, *argv: str, env: dict[str, str] | None = None) -> subprocess.Popen[Any]:
    """Start a daemon in `host`'s namespace, its output in `log`; the lab stops it by PID on exit."""
    with open(log, "ab") as out:
        return lab.popen(host, *argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)


def stop(processes: list[subprocess.Popen[Any]]) -> None:
    """SIGTERM each of our processes by PID, SIGKILL what is still there after STOP_TIMEOUT_S."""
    for p in processes:
        if p.poll() is None:
            p.terminate()
    for p in processes:
        try:
            p.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=STOP_TIMEOUT_S)


def start_hub_first(
    lab: NetLab,
    hosts: dict[str, Host],
    workdir: Path,
    argv: Callable[[str], Sequence[str]],
    protocol: str,
    port: int,
) -> dict[str, subprocess.Popen[Any]]:
    """Start each node's daemon, b (the hub) first and listening: a and c dial it at once, and some daemons
    dial again only after a long back-off."""
    daemons: dict[str, subprocess.Popen[Any]] = {}
    for n in ("b", "a", "c"):
        daemons[n] = start(lab, hosts[n], workdir / f"{n}.log", *argv(n))
        if n == "b":
            wait_listening(lab, hosts[n], protocol, port, daemons[n])
    return daemons


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not within {timeout:.0f} s")
        time.sleep(interval)


def wait_listening(lab: NetLab, host: Host, proto: str, port: int, daemon: subprocess.Popen[Any]) -> None:
    """Until something in `host` listens on `port` (a hub must listen before its spokes dial: Yggdrasil and tinc
    retry only after many seconds)."""

    def listening() -> bool:
        if daemon.poll() is not None:
            raise RuntimeError(f"PID {daemon.pid} in {host.name} exited {daemon.returncode} before listening")
        out = lab.run(host, "ss", f"-Hln{proto[0]}", f"sport = :{port}", check=False, timeout=10)
        return bool(out.stdout.strip())

    wait_until(listening, START_TIMEOUT_S, f"a {proto} listener on port {port} in {host.name}")


def address_up(lab: NetLab, host: Host, device: str, address: str) -> None:
    lab.run(host, "ip", "addr", "add", f"{address}/{OVERLAY_PREFIX_LEN}", "dev", device)
    lab.run(host, "ip", "link", "set", device, "up")


def tool(*argv: str, stdin: str | None = None) -> str:
    """A key or config tool run in the root namespace (file work only, no network); its stdout."""
    out = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {out.returncode}: {out.stderr.strip()[-300:]}")
    return out.stdout


def secret_file(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def deployment(
    system: str,
    lab: NetLab,
    hosts: dict[str, Host],
    daemons: dict[str, subprocess.Popen[Any]],
    device: str,
    workdir: Path,
    targets: dict[str, str] | None = None,
) -> Deployment:
    """The usual shape: measured from a, to b (direct) and c (relayed), at `targets` (default: the overlay
    addresses), carried by one daemon per host."""
    targets = targets or OVERLAY
    return Deployment(
        system,
        lab,
        hosts["a"],
        {"direct": (hosts["b"], targets["b"]), "relayed": (hosts["c"], targets["c"])},
        [p.pid for p in daemons.values()],
        device,
        logs=sorted(workdir.glob("*.log")),
    )


PYTHON_PATH = "ipop-python"  # ipop-overlay with its Python data path only: a baseline, not a peer
LANES_PATH = "ipop-1-lane"  # ipop-overlay with one Engine a node ([vnic] lanes = 1), whatever the CPUs

# -- the systems --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def ipop_overlay(workdir: Path, python_path: bool = False, lanes: int | None = None) -> Iterator[Deployment]:
    """Three `ipop-overlay join` processes with Prosody on a fourth host, as bench/iperf_tap.py runs them;
    `python_path`: with `[vnic] fast_path = false` (the data path before the compiled one, as a baseline);
    `lanes`: [vnic] lanes (None: the default, by the host's CPUs)."""
    python = range(3) if python_path else ()
    with Group(3, prefix=LAB_PREFIX, workdir=workdir, python_path=python, lanes=lanes) as g:
        a, b, c = g.members
        for m in g.members:
            forwarding(g.lab, m.host, on=False)
        g.block_udp(0, 2)
        cut(g.lab, a.host, c.host)
        g.join_all()
        # a and c cannot reach each other, so they link through b: a tunnel, which b's Engine relays whole. Until
        # it is up (~3.5 s after joining here) a's packets for c go the routed way, through b's Python path at
        # ~2 ms a ping (2026-12-06); every system is measured in its steady state, so ours is too.
        notes = {} if g.wait_until(lambda: tunnelled(g, 0, 2), TUNNEL_TIMEOUT_S) else {"relayed": ["routed, no tunnel"]}
        pids = [m.process.pid for m in g.members if m.process is not None]
        for pid in pids:
            # `ip netns exec` execs the console script, whose shebang runs Python: no wrapper between us and it.
            exe = Path(f"/proc/{pid}/exe").resolve().name
            if not exe.startswith("python"):
                raise RuntimeError(f"PID {pid} is {exe}, not the node's Python process: CPU and RSS would be wrong")
        yield Deployment(
            PYTHON_PATH if python_path else LANES_PATH if lanes == 1 else "ipop-overlay",
            g.lab,
            a.host,
            {"direct": (b.host, b.ip), "relayed": (c.host, c.ip)},
            pids,
            TAP_NAME,
            notes,
            logs=[m.log for m in g.members],
        )


def tunnelled(g: Group, i: int, j: int) -> bool:
    """Whether members i and j each show a link to the other through a neighbour."""
    rows = (g.link_row(g.status(i), j), g.link_row(g.status(j), i))
    return all(row is not None and row.get("relay") for row in rows)


@contextlib.contextmanager
def wireguard_go(workdir: Path) -> Iterator[Deployment]:
    """b is the hub with a peer each for a and c; a and c route the whole overlay to b, whose kernel forwards."""
    keys = {}
    for n in NODES:
        private = tool("wg", "genkey").strip()
        keys[n] = (secret_file(workdir / f"{n}.key", private + "\n"), tool("wg", "pubkey", stdin=private).strip())
    with three_hosts() as (lab, hosts):
        # Interface names carry the lab's tag: their UAPI sockets share one directory with every other run.
        names = {n: f"wg{lab.tag}{n}" for n in NODES}
        sockets = [WG_SOCKET_DIR / f"{names[n]}.sock" for n in NODES]
        env = {**os.environ, "WG_PROCESS_FOREGROUND": "1"}
        daemons: dict[str, subprocess.Popen[Any]] = {}
        try:
            for n, host in hosts.items():
                daemons[n] = start(lab, host, workdir / f"{n}.log", "wireguard-go", "-f", names[n], env=env)
            for s in sockets:
                wait_until(s.exists, START_TIMEOUT_S, f"wireguard-go's socket {s}")

            def peer(n: str, allowed: str) -> list[str]:
                endpoint = f"{hosts[n].address}:{WG_PORT}"
                return ["peer", keys[n][1], "endpoint", endpoint, "allowed-ips", allowed]

            spoke = peer("b", OVERLAY_NET)
            hub = [*peer("a", f"{OVERLAY['a']}/32"), *peer("c", f"{OVERLAY['c']}/32")]
            for n, peers in (("a", spoke), ("b", hub), ("c", spoke)):
                own = ["private-key", str(keys[n][0]), "listen-port", str(WG_PORT)]
                lab.run(hosts[n], "wg", "set", names[n], *own, *peers)
                address_up(lab, hosts[n], names[n], OVERLAY[n])
            forwarding(lab, hosts["b"], on=True, devices=(names["b"],))
            d = deployment("wireguard-go", lab, hosts, daemons, names["a"], workdir)
            d.notes["relayed"] = ["kernel forward"]
            yield d
        finally:
            stop(list(daemons.values()))
            for s in sockets:  # wireguard-go removes its socket on SIGTERM, not on SIGKILL
                s.unlink(missing_ok=True)


@contextlib.contextmanager
def nebula(workdir: Path) -> Iterator[Deployment]:
    """b is the lighthouse and the relay; a and c know b's underlay address and name b as their relay."""
    ca_crt, ca_key = workdir / "ca.crt", workdir / "ca.key"
    tool("nebula-cert", "ca", "-name", "ipop-peers-bench", "-duration", "24h", "-out-crt", str(ca_crt),
         "-out-key", str(ca_key))  # fmt: skip
    for n in NODES:
        tool("nebula-cert", "sign", "-ca-crt", str(ca_crt), "-ca-key", str(ca_key), "-name", n,
             "-ip", f"{OVERLAY[n]}/{OVERLAY_PREFIX_LEN}", "-out-crt", str(workdir / f"{n}.crt"),
             "-out-key", str(workdir / f"{n}.key"))  # fmt: skip
    with three_hosts() as (lab, hosts):
        lighthouse = OVERLAY["b"]
        for n in NODES:
            config: dict[str, Any] = {
                "pki": {"ca": str(ca_crt), "cert": str(workdir / f"{n}.crt"), "key": str(workdir / f"{n}.key")},
                "listen": {"host": "0.0.0.0", "port": NEBULA_PORT},
                "punchy": {"punch": False},
                "tun": {"dev": f"neb{n}"},  # MTU left at Nebula's default (1300)
                "logging": {"level": "info", "format": "text"},
                "firewall": {
                    "outbound": [{"port": "any", "proto": "any", "host": "any"}],
                    "inbound": [{"port": "any", "proto": "any", "host": "any"}],
                },
            }
            if n == "b":
                config["static_host_map"] = {}
                config["lighthouse"] = {"am_lighthouse": True, "hosts": []}
                config["relay"] = {"am_relay": True, "use_relays": True}
            else:
                config["static_host_map"] = {lighthouse: [f"{hosts['b'].address}:{NEBULA_PORT}"]}
                config["lighthouse"] = {"am_lighthouse": False, "hosts": [lighthouse]}
                config["relay"] = {"am_relay": False, "use_relays": True, "relays": [lighthouse]}
            # JSON is YAML: Nebula reads it as written.
            (workdir / f"{n}.yml").write_text(json.dumps(config, indent=1))
        daemons = start_hub_first(
            lab, hosts, workdir, lambda n: ("nebula", "-config", str(workdir / f"{n}.yml")), "udp", NEBULA_PORT
        )
        yield deployment("nebula", lab, hosts, daemons, "neba", workdir)


@contextlib.contextmanager
def yggdrasil(workdir: Path) -> Iterator[Deployment]:
    """a and c peer with b over TCP; no multicast discovery, no admin socket; IfMTU left at its default."""
    with three_hosts() as (lab, hosts):
        addresses = {}
        for n in NODES:
            config = json.loads(tool("yggdrasil", "-genconf", "-json"))
            config.update(
                Peers=[] if n == "b" else [f"tcp://{hosts['b'].address}:{YGGDRASIL_PORT}"],
                Listen=[f"tcp://0.0.0.0:{YGGDRASIL_PORT}"] if n == "b" else [],
                AdminListen="none",
                MulticastInterfaces=[],
                IfName=f"ygg{n}",
                IfMTU=YGGDRASIL_MTU,
                NodeInfoPrivacy=True,
            )
            path = secret_file(workdir / f"{n}.json", json.dumps(config, indent=1))
            addresses[n] = tool("yggdrasil", "-useconffile", str(path), "-address").strip()
        daemons = start_hub_first(
            lab,
            hosts,
            workdir,
            lambda n: ("yggdrasil", "-useconffile", str(workdir / f"{n}.json"), "-logto", "stdout"),
            "tcp",
            YGGDRASIL_PORT,
        )
        d = deployment("yggdrasil", lab, hosts, daemons, "ygga", workdir, addresses)
        d.notes = {path: ["IfMTU default"] for path in PATHS}
        yield d


@contextlib.contextmanager
def fastd(workdir: Path) -> Iterator[Deployment]:
    """TAP mode; b forwards frames between its peers (`forward yes`), a and c dial b."""
    secrets, publics = {}, {}
    for n in NODES:
        secrets[n] = tool("fastd", "--generate-key", "--machine-readable").strip()
        key_file = secret_file(workdir / f"{n}.key", f'secret "{secrets[n]}";\n')
        publics[n] = tool("fastd", "--show-key", "--machine-readable", "-c", str(key_file)).strip()
    with three_hosts() as (lab, hosts):
        for n in NODES:
            lines = [
                "log level warn;",
                f'interface "fd{n}";',
                "mode tap;",
                'method "salsa2012+umac";',
                f'secret "{secrets[n]}";',
                f"mtu {FASTD_MTU};",
                f"bind {'0.0.0.0' if n == 'b' else hosts[n].address}:{FASTD_PORT};",
                f'on up "ip addr add {OVERLAY[n]}/{OVERLAY_PREFIX_LEN} dev $INTERFACE; ip link set up dev $INTERFACE";',
            ]
            if n == "b":
                # No `remote` on the hub: when both ends dial, the crossed handshakes leave mismatched sessions
                # for ~20 s (measured with fastd 22).
                lines += ["forward yes;", *(f'peer "{p}" {{ key "{publics[p]}"; }}' for p in ("a", "c"))]
            else:
                hub = f"{hosts['b'].address}:{FASTD_PORT}"
                lines.append(f'peer "b" {{ key "{publics["b"]}"; remote {hub}; }}')
            secret_file(workdir / f"{n}.conf", "\n".join(lines) + "\n")
        daemons = start_hub_first(
            lab, hosts, workdir, lambda n: ("fastd", "-c", str(workdir / f"{n}.conf")), "udp", FASTD_PORT
        )
        yield deployment("fastd", lab, hosts, daemons, "fda", workdir)


@contextlib.contextmanager
def tinc(workdir: Path) -> Iterator[Deployment]:
    """Router mode (TUN); a and c connect to b, which routes between them by their Subnets."""
    with three_hosts() as (lab, hosts):
        for n in NODES:
            directory = workdir / n
            (directory / "hosts").mkdir(parents=True)
            conf = [
                f"Name = {n}",
                "Mode = router",
                f"Interface = tinc{n}",
                "AddressFamily = ipv4",
                f"Port = {TINC_PORT}",
            ]
            conf += [] if n == "b" else ["ConnectTo = b"]
            (directory / "tinc.conf").write_text("\n".join(conf) + "\n")
            up = directory / "tinc-up"
            up.write_text(f'#!/bin/sh\nip addr add {OVERLAY[n]}/{OVERLAY_PREFIX_LEN} dev "$INTERFACE"\n'
                          'ip link set "$INTERFACE" up\n')  # fmt: skip
            up.chmod(0o755)
            address = [f"Address = {hosts[n].address}"] if n == "b" else []
            host_file = [*address, f"Subnet = {OVERLAY[n]}/32", f"Port = {TINC_PORT}"]
            (directory / "hosts" / n).write_text("\n".join(host_file) + "\n")
            # -K appends the public key to hosts/<Name>; with no terminal it takes the default file names.
            tool("tincd", "-c", str(directory), "-K2048", stdin="")
        for n in NODES:
            for other in NODES:
                if other != n:
                    shutil.copy(workdir / other / "hosts" / other, workdir / n / "hosts" / other)
        daemons = start_hub_first(
            lab,
            hosts,
            workdir,
            lambda n: ("tincd", "-c", str(workdir / n), "-D", "-d1", f"--pidfile={workdir / n / 'tinc.pid'}"),
            "tcp",
            TINC_PORT,
        )
        yield deployment("tinc", lab, hosts, daemons, "tinca", workdir)


@contextlib.contextmanager
def veth(workdir: Path) -> Iterator[Deployment]:
    """No VPN: the underlay itself; the relayed path is a->c routed through b's kernel (the reference for relays)."""
    with three_hosts(kernel_path_via_b=True) as (lab, hosts):
        a, b, c = (hosts[n] for n in NODES)
        lab.run(a, "ip", "route", "add", f"{c.address}/32", "via", b.address)
        lab.run(c, "ip", "route", "add", f"{a.address}/32", "via", b.address)
        forwarding(lab, b, on=True, devices=(HOST_IFNAME,))
        d = deployment("veth", lab, hosts, {}, HOST_IFNAME, workdir, {n: h.address for n, h in hosts.items()})
        d.notes = {"direct": ["no VPN"], "relayed": ["no VPN", "kernel forward"]}
        yield d


SYSTEMS = {
    s.name: s
    for s in (
        System("ipop-overlay", ipop_overlay, prerequisites=missing_prerequisites),
        System(PYTHON_PATH, lambda workdir: ipop_overlay(workdir, True), prerequisites=missing_prerequisites),
        System(LANES_PATH, lambda workdir: ipop_overlay(workdir, lanes=1), prerequisites=missing_prerequisites),
        System("wireguard-go", wireguard_go, ("wireguard-go", "wg"), ("wireguard-go", "wireguard-tools")),
        System("nebula", nebula, ("nebula", "nebula-cert"), ("nebula",)),
        System("yggdrasil", yggdrasil, ("yggdrasil",), ("yggdrasil",)),
        System("fastd", fastd, ("fastd",), ("fastd",)),
        System("tinc", tinc, ("tincd",), ("tinc",)),
        System("veth", veth),
    )
}
