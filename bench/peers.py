#!/usr/bin/env python3
"""Benchmark: ipop-overlay side by side with peer VPNs (wireguard-go, Nebula, Yggdrasil, fastd, tinc), a plain veth
and, as a baseline, ipop-overlay on its Python data path only (ipop-python), on one lab shape, direct (a->b) and
relayed (a->c across b); one table, and our ratio to the best peer.

Run as root: `sudo .venv/bin/python bench/peers.py`. Missing peers are installed from Debian first, with service
starts refused while apt runs. Each system then gets a fresh lab (bench/peerlab.py, removed before the next) and is
measured from a: iperf3 TCP with 1 and 4 streams and both directions at once, 64-byte UDP packets per second
received, their loss and how many reached the server's socket at all, ping RTT (median) idle and under one TCP
stream, the three daemons' CPU seconds per GB carried (during the 1-stream run) and the largest daemon's resident
memory when idle. A benchmark, not a test: it exits 0 whatever the numbers (2 when it cannot run at all). Every
iperf3 and ping is bounded in time; a failed measurement prints why and shows as "-".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.peerlab import LANES_PATH, PATHS, PYTHON_PATH, SYSTEMS, Deployment, System, stop, wait_listening
from tests.support.hoststats import process_usage

Reading = Callable[[dict[str, Any]], float]  # one number from an iperf3 JSON report

OURS = "ipop-overlay"
REFERENCE = "veth"  # not a peer: the underlay without any VPN
NOT_PEERS = (OURS, REFERENCE, PYTHON_PATH, LANES_PATH)  # ours in other settings: baselines, not peers
PATH_LABELS = {"direct": "a->b", "relayed": "a->c via b"}
IPERF_PORT = 5201
# Our choices: iperf3 seconds beyond -t before a run counts as hung (connect, warm-up, report); the ping probe
# (40 at 50 ms: two seconds of samples); how long a TCP stream runs before the loaded pings start (a LAN-like path
# reaches its steady window well within it); how long a tunnel gets to answer its first ping.
RUN_SLACK_S = 15.0
PINGS = 40
PING_INTERVAL_S = 0.05
PING_WAIT_S = 2.0
LOAD_RAMP_S = 1.0
UP_TIMEOUT_S = {"direct": 30.0, "relayed": 60.0}
UDP_PAYLOAD = 64
# A path counts as having stopped answering when a ping went unanswered and the next did not answer at once
# either (wait_reachable's pings take up to 1 s each).
OUTAGE_S = 1.0
# What ipsec-mb's GCM runs on (its AVX-512 code needs VAES and VPCLMULQDQ, else AVX2; OpenSSL 3.0 uses AES-NI and
# PCLMULQDQ): printed beside the table, as our numbers move with them (docs/datapath.md, the link cipher).
CIPHER_FEATURES = ("aes", "pclmulqdq", "avx2", "avx512f", "vaes", "vpclmulqdq")
DROPS_POLL_S = 0.05  # how often the server's socket drops are read during a 64-byte run (the last 50 ms are missed)
# Debian packages every run needs (the peers' own are in bench/peerlab.py), and the policy-rc.d protocol that
# refuses service starts while they install (invoke-rc.d(8)).
TOOL_PACKAGES = ("iperf3", "iputils-ping")
POLICY = Path("/usr/sbin/policy-rc.d")
APT_TIMEOUT_S = 900.0
# For the start-up estimate, measured on the 2-core lab machine (a whole run with --seconds 3 took 4.3 min): set-up
# until the tunnels answer (ours starts Prosody and joins three nodes; Yggdrasil's relayed path answers late), the
# fixed part of one path (idle pings, server start), each iperf3's start and report beyond -t.
SETUP_S = {"ipop-overlay": 10.0, "yggdrasil": 8.0}
DEFAULT_SETUP_S = 2.0
PATH_FIXED_S = 1.5
IPERF_OVERHEAD_S = 0.2


@dataclass
class PathResult:
    """One row of the table: a system on one path (None: not measured or failed)."""

    tcp1: float | None = None  # Mbit/s received
    tcp4: float | None = None
    bidir: float | None = None  # both directions together
    kpps: float | None = None  # 64-byte UDP datagrams received per second, thousands
    loss: float | None = None  # % of those sent
    arrived: float | None = None  # thousands per second that reached the server's socket (received or dropped there)
    rtt_idle: float | None = None  # ms, median
    rtt_loaded: float | None = None
    cpu_s_per_gb: float | None = None  # daemon CPU seconds (all three) per GB received, 1-stream TCP
    rss_mb: float | None = None  # the largest daemon's VmRSS when idle, MiB
    notes: list[str] = field(default_factory=list)


@dataclass
class SystemResult:
    system: str
    paths: dict[str, PathResult] = field(default_factory=lambda: {p: PathResult() for p in PATHS})
    problem: str | None = None  # why it was skipped or broke off
    wall_s: float = 0.0  # set-up, measurements and removal of this system's lab


@dataclass(frozen=True)
class Column:
    key: str  # a PathResult field
    header: str
    unit: str
    higher_is_better: bool
    decimals: int


COLUMNS = (
    Column("tcp1", "TCP 1", "Mbit/s", True, 0),
    Column("tcp4", "TCP 4", "Mbit/s", True, 0),
    Column("bidir", "bidir", "Mbit/s", True, 0),
    Column("kpps", "64B kpps", "1000 datagrams/s", True, 1),
    Column("loss", "loss %", "%", False, 1),
    Column("arrived", "64B in", "1000 datagrams/s", True, 1),
    Column("rtt_idle", "RTT idle", "ms", False, 3),
    Column("rtt_loaded", "RTT load", "ms", False, 2),
    Column("cpu_s_per_gb", "CPU s/GB", "CPU s per GB", False, 1),
    Column("rss_mb", "RSS MiB", "MiB", False, 1),
)


def say(line: str) -> None:
    print(line, flush=True)


# -- installing the peers -------------------------------------------------------------------------------------


def missing_packages(systems: list[str]) -> list[str]:
    """The Debian packages the chosen systems (and the measurements) need that are not installed."""
    missing = []
    for package in dict.fromkeys([*TOOL_PACKAGES, *(p for s in systems for p in SYSTEMS[s].packages)]):
        out = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True,
                             timeout=30, check=False)  # fmt: skip
        if "install ok installed" not in out.stdout:
            missing.append(package)
    return missing


@contextlib.contextmanager
def service_starts_refused() -> Iterator[None]:
    """A policy-rc.d that exits 101 for the `with` block, whatever was there before, and the old one back after.

    Debian's tinc (and yggdrasil, were it enabled) would otherwise start a system-wide daemon in the root
    namespace. The old policy is kept as a hard link and ours renamed over it, so there is no moment without a
    policy, and a symlink or its mode comes back exactly as it was.
    """
    saved = POLICY.with_name(POLICY.name + ".ipop-peers-saved")
    if saved.exists() or saved.is_symlink():
        had_policy = True  # left by a run that died while installing: that is the original, the one in place ours
    else:
        had_policy = POLICY.exists() or POLICY.is_symlink()
        if had_policy:
            os.link(POLICY, saved, follow_symlinks=False)
    try:
        ours = POLICY.with_name(POLICY.name + ".ipop-peers-new")
        ours.write_text("#!/bin/sh\nexit 101\n")
        ours.chmod(0o755)
        os.replace(ours, POLICY)
        yield
    finally:
        if had_policy:
            os.replace(saved, POLICY)
        else:
            POLICY.unlink(missing_ok=True)


def install(packages: list[str]) -> None:
    """apt-get the packages (service starts refused), then make sure none of their system services runs."""
    say(f"installing from Debian: {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # No recommends: wireguard-tools would pull in a kernel image for its module. The lock timeout: another user's
    # apt on this machine is waited for, not failed on.
    lock = ["-o", "DPkg::Lock::Timeout=120"]
    steps = (["apt-get", *lock, "update", "-q"],
             ["apt-get", *lock, "install", "-y", "-q", "--no-install-recommends", *packages])  # fmt: skip
    with service_starts_refused():
        for argv in steps:
            what = f"apt-get {argv[3]}"
            try:
                out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=APT_TIMEOUT_S, check=False)
            except subprocess.TimeoutExpired:
                say(f"  {what} still running after {APT_TIMEOUT_S:.0f} s; systems not installed will be skipped")
                break
            if out.returncode != 0:
                tail = " | ".join(out.stderr.strip().splitlines()[-3:])
                say(f"  {what} exited {out.returncode}: {tail}; systems not installed will be skipped")
                break
    quiet_services(packages)  # also after a failed install: some packages may be in


def quiet_services(packages: list[str]) -> None:
    """Disable, and stop if running, every plain system service the just-installed packages ship (templates such
    as fastd@.service start nothing by themselves). Through systemctl only, never by process name; without
    systemd, nothing was started: the policy-rc.d refused it."""
    if shutil.which("systemctl") is None:
        return
    units = []
    for package in packages:
        out = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, timeout=30, check=False)
        units += [Path(p).name for p in out.stdout.split() if re.search(r"/systemd/system/[^/@]+\.service$", p)]
    systemd_running = Path("/run/systemd/system").is_dir()
    for unit in sorted(set(units)):
        if _systemctl("is-enabled", unit):
            say(f"  disabling the system service {unit}")
            _systemctl("disable", unit)
        if systemd_running and _systemctl("is-active", unit):
            say(f"  stopping the system service {unit}")
            _systemctl("stop", unit)


def _systemctl(*argv: str) -> bool:
    out = subprocess.run(["systemctl", *argv], capture_output=True, timeout=60, check=False)
    return out.returncode == 0


# -- measuring --------------------------------------------------------------------------------------------------


class Bench:
    """The measurements of one deployment, from its source host, with one iperf3 server per destination host."""

    def __init__(self, d: Deployment, workdir: Path, seconds: float, runs: int) -> None:
        self.d = d
        self.workdir = workdir
        self.seconds = seconds
        self.runs = runs
        self.servers: dict[str, subprocess.Popen[Any]] = {}
        self.outages: dict[str, list[float]] = {}  # path -> how long it did not answer before a measurement

    def reachable(self, path: str) -> None:
        """Wait until `path` answers a ping (at most UP_TIMEOUT_S) before measuring it: a tunnel that went away for
        a while (Nebula's relayed path did, for ~40 s, after it first answered) is measured once it is back rather
        than counted as failed, whichever system it is. How long it was away goes in the table's notes."""
        _, address = self.d.destinations[path]
        out = self.d.lab.run(self.d.source, "ping", "-n", "-q", "-c", "1", "-W", "1", address, check=False, timeout=10)
        if out.returncode == 0:
            return
        waited = wait_reachable(self.d, address, UP_TIMEOUT_S[path])
        if waited is not None and waited < OUTAGE_S:
            return  # one ping lost, the next answered at once: not an outage
        say(f"    {address} stopped answering; " + (f"back after {waited:.1f} s" if waited is not None else
                                                   f"not back within {UP_TIMEOUT_S[path]:.0f} s"))  # fmt: skip
        self.outages.setdefault(path, []).append(1.0 + (waited if waited is not None else UP_TIMEOUT_S[path]))

    def start_server(self, path: str) -> None:
        host, _ = self.d.destinations[path]
        with open(self.workdir / f"iperf3-{host.name}.log", "ab") as log:
            server = self.d.lab.popen(host, "iperf3", "-s", "-p", str(IPERF_PORT), stdin=subprocess.DEVNULL,
                                      stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        self.servers[path] = server
        wait_listening(self.d.lab, host, "tcp", IPERF_PORT, server)

    def restart_server(self, path: str) -> None:
        """A client that timed out can leave its server stuck in the test; the next run gets a fresh one."""
        stop([self.servers.pop(path)])
        self.start_server(path)

    def close(self) -> None:
        stop(list(self.servers.values()))
        self.servers = {}

    def iperf(self, path: str, *extra: str) -> dict[str, Any] | None:
        """One iperf3 client run on `path` (report as JSON), None when it failed (why is printed)."""
        _, address = self.d.destinations[path]
        argv = ["iperf3", "-c", address, "-p", str(IPERF_PORT), "-t", f"{self.seconds:g}", "-J",
                "--connect-timeout", "3000", *extra]  # fmt: skip
        what = f"iperf3 {' '.join(extra) or 'TCP'} to {address}"
        self.reachable(path)
        try:
            out = self.d.lab.run(self.d.source, *argv, check=False, timeout=self.seconds + RUN_SLACK_S)
        except subprocess.TimeoutExpired:
            say(f"    {what}: still running after {self.seconds + RUN_SLACK_S:.0f} s")
            self.restart_server(path)
            return None
        try:
            report = json.loads(out.stdout)
        except ValueError:
            report = {}
        if report.get("error") or "end" not in report:
            reason = report.get("error") or out.stderr.strip()[-200:] or out.stdout.strip()[-200:]
            say(f"    {what} failed (exit {out.returncode}): {reason or 'no output'}")
            self.restart_server(path)
            return None
        return dict(report)

    def mbps(
        self, label: str, path: str, *extra: str, value: Reading | None = None, cpu: list[float] | None = None
    ) -> float | None:
        """Median Mbit/s of `runs` iperf3 TCP runs (receiver side; `value` reduces a report to Mbit/s). With `cpu`,
        each good run adds its daemons' CPU seconds and its GB received to it (the pair summed over the runs)."""
        rates = []
        for n in range(self.runs):
            before = self.cpu_seconds()
            report = self.iperf(path, *extra)
            after = self.cpu_seconds()
            mbps = None if report is None else _number(value or received_mbps, report, label)
            if report is not None and mbps is not None:
                rates.append(mbps)
                if cpu is not None and before is not None and after is not None:
                    cpu[0] += after - before
                    cpu[1] += report["end"]["sum_received"]["bytes"] / 1e9
            count = f" run {n + 1}/{self.runs}" if self.runs > 1 else ""
            say(f"    {label}{count}: {_fmt(mbps, 0)} Mbit/s")
        return _median(rates)

    def cpu_seconds(self) -> float | None:
        """utime+stime of all the daemons (threads included); None when one is gone."""
        usages = [process_usage(pid) for pid in self.d.daemons]
        return None if any(u is None for u in usages) else sum(u.cpu_s for u in usages if u is not None)

    def ping_ms(self, path: str) -> float | None:
        """Median RTT of PINGS pings PING_INTERVAL_S apart (None when none came back). The median, not ping's
        average: on a shared virtual machine a few replies wait milliseconds for a CPU, whatever the system."""
        _, address = self.d.destinations[path]
        argv = ["ping", "-n", "-c", str(PINGS), "-i", f"{PING_INTERVAL_S:g}", "-W", f"{PING_WAIT_S:g}", address]
        bound = PINGS * PING_INTERVAL_S + PING_WAIT_S + 10
        try:
            out = self.d.lab.run(self.d.source, *argv, check=False, timeout=bound)
        except subprocess.TimeoutExpired:
            say(f"    ping {address}: still running after {bound:.0f} s")
            return None
        times = [float(t) for t in re.findall(r"time=([\d.]+) ms", out.stdout)]
        if not times:
            say(f"    ping {address}: no reply ({out.stdout.strip().splitlines()[-1:] or out.stderr.strip()})")
            return None
        return statistics.median(times)

    def loaded_ping_ms(self, path: str) -> float | None:
        """RTT while one TCP stream runs on the same pair (started LOAD_RAMP_S before the pings)."""
        _, address = self.d.destinations[path]
        load_s = load_seconds(self.seconds)
        argv = ["iperf3", "-c", address, "-p", str(IPERF_PORT), "-t", f"{load_s:g}", "--connect-timeout", "3000"]
        load = self.d.lab.popen(self.d.source, *argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            time.sleep(LOAD_RAMP_S)
            rtt = self.ping_ms(path)
            if load.poll() is not None:  # the stream ended, or never started, before the last ping: not loaded
                say(f"    the background iperf3 to {address} exited {load.returncode} before the pings ended")
                rtt = None
        finally:
            try:
                load.wait(timeout=load_s + RUN_SLACK_S)
            except subprocess.TimeoutExpired:
                stop([load])
                self.restart_server(path)
        return rtt

    def small_packets(self, path: str, row: PathResult) -> None:
        """64-byte UDP as fast as the sender can (-b 0): datagrams received per second, the share lost, and how
        many per second reached the iperf3 server's socket, kept or dropped there because the server did not read
        them in time (the rest were lost on the way). With several runs, all three come from the run with the
        median rate (the lower middle one of an even count): they belong together."""
        runs = []
        for n in range(self.runs):
            with socket_drops(self.servers[path].pid, IPERF_PORT) as drops:
                report = self.iperf(path, "-u", "-l", str(UDP_PAYLOAD), "-b", "0")
            kpps = None if report is None else _number(received_kpps, report, "64B kpps")
            loss = None if report is None else _number(lost_percent, report, "64B loss")
            seconds = None if report is None else _number(received_seconds, report, "64B seconds")
            arrived = None if kpps is None or drops[0] is None or not seconds else kpps + drops[0] / seconds / 1e3
            if kpps is not None and loss is not None:
                runs.append((kpps, loss, arrived))
            count = f" run {n + 1}/{self.runs}" if self.runs > 1 else ""
            say(f"    64-byte UDP{count}: {_fmt(kpps, 1)} kpps received, {_fmt(loss, 1)} % lost; "
                f"{_fmt(arrived, 1)} kpps reached the server's socket")  # fmt: skip
        if runs:
            row.kpps, row.loss, row.arrived = sorted(runs, key=lambda r: r[0])[(len(runs) - 1) // 2]

    def path(self, path: str, row: PathResult) -> None:
        say(f"  {path} {PATH_LABELS[path]} ({self.d.destinations[path][1]})")
        self.reachable(path)
        row.rtt_idle = self.ping_ms(path)
        say(f"    RTT idle: {_fmt(row.rtt_idle, 3)} ms")
        cpu = [0.0, 0.0]  # daemon CPU seconds, GB received
        row.tcp1 = self.mbps("TCP 1 stream", path, cpu=cpu)
        row.cpu_s_per_gb = cpu[0] / cpu[1] if self.d.daemons and cpu[1] > 0 else None
        row.tcp4 = self.mbps("TCP 4 streams", path, "-P", "4")
        row.bidir = self.mbps("TCP both directions", path, "--bidir", value=bidir_mbps)
        self.small_packets(path, row)
        row.rtt_loaded = self.loaded_ping_ms(path)
        say(f"    RTT under TCP load: {_fmt(row.rtt_loaded, 2)} ms")
        if path in self.outages:
            gone = self.outages[path]
            row.notes.append(f"no answer {len(gone)}x before a measurement ({sum(gone):.0f} s)")


def received_mbps(report: dict[str, Any]) -> float:
    return float(report["end"]["sum_received"]["bits_per_second"]) / 1e6


def bidir_mbps(report: dict[str, Any]) -> float:
    end = report["end"]
    return (
        float(end["sum_received"]["bits_per_second"]) + float(end["sum_received_bidir_reverse"]["bits_per_second"])
    ) / 1e6


def received_kpps(report: dict[str, Any]) -> float:
    """Datagrams that reached the server per second (iperf3 counts the lost ones by sequence gaps)."""
    s = report["end"]["sum_received"]
    return (int(s["packets"]) - int(s["lost_packets"])) / float(s["seconds"]) / 1e3


def received_seconds(report: dict[str, Any]) -> float:
    return float(report["end"]["sum_received"]["seconds"])


@contextlib.contextmanager
def socket_drops(pid: int, port: int) -> Iterator[list[int | None]]:
    """While the block runs, the datagrams dropped by the UDP sockets on `port` in `pid`'s network namespace
    (the last column of /proc/net/udp and udp6): the receiver's buffer overflowing. iperf3 closes the test's
    socket when the test ends, so it is read every DROPS_POLL_S until then; [None] if it was never seen."""
    found: list[int | None] = [None]
    done = threading.Event()
    # iperf3's server listens on IPv6 (v4-mapped for IPv4 clients): its sockets are in udp6.
    tables = [Path(f"/proc/{pid}/net/{name}") for name in ("udp", "udp6")]
    local = f":{port:04X}"

    def poll() -> None:
        while not done.wait(DROPS_POLL_S):
            try:
                rows = [line.split() for t in tables for line in t.read_text().splitlines()[1:]]
            except OSError:
                return
            counts = [int(r[-1]) for r in rows if len(r) > 2 and r[1].endswith(local)]
            if counts and sum(counts) >= (found[0] or 0):
                found[0] = sum(counts)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        yield found
    finally:
        done.set()
        watcher.join()


def lost_percent(report: dict[str, Any]) -> float:
    return float(report["end"]["sum_received"]["lost_percent"])


def _number(value: Reading, report: dict[str, Any], label: str) -> float | None:
    try:
        return float(value(report))
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        say(f"    {label}: the iperf3 report lacks {exc}")
        return None


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _fmt(value: float | None, decimals: int) -> str:
    return "-" if value is None else f"{value:.{decimals}f}"


# -- one system -------------------------------------------------------------------------------------------------


def run_system(system: System, workdir: Path, seconds: float, runs: int) -> SystemResult:
    """Deploy `system` on a fresh lab, measure both paths, remove the lab; never raises for a broken system."""
    result = SystemResult(system.name)
    started = time.monotonic()
    say(f"== {system.name}")
    result.problem = system.missing()
    if result.problem:
        say(f"  skipped: {result.problem}")
        return result
    workdir.mkdir()
    try:
        with system.deploy(workdir) as d:
            measure(d, workdir, seconds, runs, result)
    except Exception as exc:  # one system that cannot be set up must not cost the others their numbers
        result.problem = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        say(f"  {system.name} broke off: {result.problem}")
    result.wall_s = time.monotonic() - started
    say(f"  {system.name}: {result.wall_s:.0f} s")
    return result


def measure(d: Deployment, workdir: Path, seconds: float, runs: int, result: SystemResult) -> None:
    up = {}
    for path in PATHS:
        _, address = d.destinations[path]
        up[path] = wait_reachable(d, address, UP_TIMEOUT_S[path])
        say(f"  {path}: " + (f"{address} answers after {up[path]:.1f} s" if up[path] is not None else
                              f"no ping reply from {address} within {UP_TIMEOUT_S[path]:.0f} s"))  # fmt: skip
    mtu = device_mtu(d)
    # Idle: the tunnels are up (the pings above) and nothing has been measured yet.
    usages = [process_usage(pid) for pid in d.daemons]
    rss = max((u.rss_mb for u in usages if u is not None), default=None) if d.daemons else None
    for path in PATHS:
        row = result.paths[path]
        row.rss_mb = rss
        row.notes = [f"MTU {mtu}" if mtu else "MTU ?", *d.notes.get(path, [])]
    if not any(t is not None for t in up.values()):
        show_logs(d)
        result.problem = "no tunnel came up"
        return
    bench = Bench(d, workdir, seconds, runs)
    try:
        for path in PATHS:
            if up[path] is None:
                result.paths[path].notes.append("no tunnel")
                show_logs(d)
                continue
            bench.start_server(path)
            bench.path(path, result.paths[path])
    finally:
        bench.close()


def wait_reachable(d: Deployment, address: str, timeout: float) -> float | None:
    """Seconds until `address` first answered a ping from the source host, None if not within `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        out = d.lab.run(d.source, "ping", "-n", "-q", "-c", "1", "-W", "1", address, check=False, timeout=10)
        if out.returncode == 0:
            return time.monotonic() - started
        time.sleep(0.2)
    return None


def device_mtu(d: Deployment) -> int | None:
    out = d.lab.run(d.source, "ip", "-j", "link", "show", "dev", d.device, check=False, timeout=10)
    try:
        return int(json.loads(out.stdout)[0]["mtu"])
    except (ValueError, LookupError, TypeError):
        return None


def show_logs(d: Deployment, lines: int = 6) -> None:
    for log in d.logs:
        try:
            tail = log.read_text(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            continue
        say(f"  --- {log.name}: " + " | ".join(line.strip()[:160] for line in tail))


# -- the table --------------------------------------------------------------------------------------------------


def best_peers(results: list[SystemResult], path: str) -> dict[str, tuple[float, str]]:
    """Per column, the best peer value and who had it (veth and ours are not peers)."""
    best: dict[str, tuple[float, str]] = {}
    for column in COLUMNS:
        candidates = [
            (value, r.system)
            for r in results
            if r.system not in NOT_PEERS and (value := getattr(r.paths[path], column.key)) is not None
        ]
        if candidates:
            best[column.key] = (max if column.higher_is_better else min)(candidates)
    return best


def ratios(results: list[SystemResult], path: str) -> dict[str, tuple[float | None, str]]:
    """Per column: our value / the best peer's (None when either is missing or the best is 0), and that peer."""
    ours = next((r for r in results if r.system == OURS), None)
    out: dict[str, tuple[float | None, str]] = {}
    for key, (best, peer) in best_peers(results, path).items():
        mine = None if ours is None else getattr(ours.paths[path], key)
        if mine is None or (best == 0 and mine != 0):
            out[key] = (None, peer)
        else:
            out[key] = (1.0 if best == mine else mine / best, peer)
    return out


def table(results: list[SystemResult]) -> list[str]:
    width = 10
    head = f"{'system':<14}{'path':<11}" + "".join(f"{c.header:>{width}}" for c in COLUMNS) + "  notes"
    lines = [head, "-" * len(head)]
    for path in PATHS:
        for r in results:
            row = r.paths[path]
            cells = "".join(f"{_fmt(getattr(row, c.key), c.decimals):>{width}}" for c in COLUMNS)
            notes = ", ".join(row.notes + ([r.problem] if r.problem else []))
            lines.append(f"{r.system:<14}{PATH_LABELS[path]:<11}{cells}  {notes}")
        found = ratios(results, path)
        if found and any(r.system == OURS for r in results):
            cells = "".join(f"{_ratio(found.get(c.key)):>{width}}" for c in COLUMNS)
            lines.append(f"{OURS + ' / best peer':<25}{cells}")
            by_peer: dict[str, list[str]] = {}
            for c in COLUMNS:
                if c.key in found:
                    by_peer.setdefault(found[c.key][1], []).append(c.header)
            lines.append("  best peer: " + "; ".join(f"{p} ({', '.join(h)})" for p, h in by_peer.items()))
        lines.append("")
    return lines


def _ratio(entry: tuple[float | None, str] | None) -> str:
    return "-" if entry is None or entry[0] is None else f"{entry[0]:.2f}"


# -- the run --------------------------------------------------------------------------------------------------


def machine(cpuinfo: str) -> dict[str, Any]:
    """The CPU as /proc/cpuinfo names it, which of CIPHER_FEATURES it has, and the link cipher our nodes run: the
    table's numbers for ours depend on them (docs/datapath.md, the link cipher)."""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
    have = set(flags.group(1).split()) if flags else set()
    try:
        from overlay._fast import GCM  # the same environment (IPOP_OVERLAY_GCM) as the nodes the bench starts

        cipher = str(GCM)
    except ImportError:
        cipher = "OpenSSL (no compiled data path)"
    return {
        "cpu": model.group(1).strip() if model else platform.machine(),
        "cpu_features": [f for f in CIPHER_FEATURES if f in have],
        "cipher": cipher,
    }


def load_seconds(seconds: float) -> float:
    """The background stream of the loaded RTT: --seconds, but long enough for the ramp and every ping."""
    return max(seconds, LOAD_RAMP_S + PINGS * PING_INTERVAL_S + 1.0)


def estimate_s(systems: list[str], seconds: float, runs: int) -> float:
    """Seconds the run will take: per system its set-up, per path 4 x runs measured iperf3 runs and one loaded."""
    per_path = PATH_FIXED_S + 4 * runs * (seconds + IPERF_OVERHEAD_S) + load_seconds(seconds) + IPERF_OVERHEAD_S
    return sum(SETUP_S.get(s, DEFAULT_SETUP_S) + len(PATHS) * per_path for s in systems)


def _interrupted(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C: every lab and temp dir is removed on the way out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of: {', '.join(SYSTEMS)}")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each iperf3 run")
    parser.add_argument("--runs", type=int, default=1, help="throughput and pps runs per path (median reported)")
    parser.add_argument("--no-install", action="store_true", help="install nothing; skip systems not installed")
    parser.add_argument("--json", type=Path, help="also write every number to this file")
    args = parser.parse_args()
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems or args.seconds < 1 or args.runs < 1:
        what = f"unknown system(s) {', '.join(unknown)}" if unknown else "--seconds >= 1, --runs >= 1, a system"
        print(f"peers: cannot run: {what} (systems: {', '.join(SYSTEMS)})", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("peers: cannot run: needs root (namespaces, TUN/TAP devices, apt-get): sudo .venv/bin/python "
              "bench/peers.py", file=sys.stderr)  # fmt: skip
        return 2
    signal.signal(signal.SIGTERM, _interrupted)
    if not args.no_install and (missing := missing_packages(systems)):
        install(missing)
    absent = [t for t in ("iperf3", "ping", "ip", "iptables", "ss") if shutil.which(t) is None]
    if absent:
        print(f"peers: cannot run: {', '.join(absent)} not installed (drop --no-install, or apt-get install "
              "iperf3 iputils-ping iproute2 iptables)", file=sys.stderr)  # fmt: skip
        return 2
    estimate = estimate_s(systems, args.seconds, args.runs)
    say(f"peers: {', '.join(systems)}; {args.seconds:g} s per measurement, {args.runs} run(s); about "
        f"{estimate / 60:.0f} min")  # fmt: skip
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="ipop-peers-"))
    results = []
    try:
        for name in systems:
            results.append(run_system(SYSTEMS[name], workdir / name, args.seconds, args.runs))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    wall = time.monotonic() - started
    runs = "1 run" if args.runs == 1 else f"median of {args.runs} runs"
    host = machine(Path("/proc/cpuinfo").read_text(errors="replace"))
    say("")
    say(f"peers  {datetime.now():%Y-%m-%d %H:%M}  kernel {platform.release()}  nproc {len(os.sched_getaffinity(0))}  "
        f"{args.seconds:g} s per measurement ({runs})  total {wall / 60:.1f} min")  # fmt: skip
    say(f"cpu {host['cpu']} ({' '.join(host['cpu_features']) or 'none of ' + ' '.join(CIPHER_FEATURES)})  "
        f"our link cipher: AES-256-GCM, {host['cipher']}")  # fmt: skip
    say(
        "Mbit/s received (bidir: both directions added); 64-byte UDP sent as fast as iperf3 can: kpps received, "
        '% lost, and kpps that reached the server\'s socket ("64B in"; the difference was dropped there, the '
        "server not reading fast enough); RTT in ms (median of the replies), idle and under one TCP stream; CPU: "
        "the three daemons' seconds per GB received (1 stream); RSS: the largest daemon idle, MiB. Ratios: ours / "
        "the best peer's value (the best: the highest throughput and pps, the lowest loss, RTT, CPU and RSS)."
    )
    say("")
    for line in table(results):
        say(line)
    if args.json:
        args.json.write_text(json.dumps(report(results, args.seconds, args.runs, wall, host), indent=1) + "\n")
        say(f"numbers in {args.json}")
    return 0


def report(results: list[SystemResult], seconds: float, runs: int, wall: float, host: dict[str, Any]) -> dict[str, Any]:
    return {
        "date": datetime.now().isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "nproc": len(os.sched_getaffinity(0)),
        **host,
        "seconds": seconds,
        "runs": runs,
        "wall_s": round(wall, 1),
        "paths": PATH_LABELS,
        "units": {c.key: c.unit for c in COLUMNS},
        "systems": [asdict(r) for r in results],
        "ours_over_best_peer": {
            path: {key: {"ratio": ratio, "best_peer": peer} for key, (ratio, peer) in ratios(results, path).items()}
            for path in PATHS
        },
    }


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        # Every `with` on the way out has run: labs, daemons, servers, the temp dir and the policy-rc.d are back.
        print("peers: interrupted; everything it made is removed", file=sys.stderr)
        sys.exit(130)
