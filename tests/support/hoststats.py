"""The host under a scale lab, as the kernel reports it: the neighbour table all namespaces share, CPU and memory.

The kernel's IPv4 neighbour (ARP) table is one table for all namespaces, capped host-wide by
net.ipv4.neigh.default.gc_thresh3 (1024 here): a 100-namespace lab with ~12 links per node passes it and sends
fail with EHOSTUNREACH (shared/ARCHITECTURE.md, "Measured facts"). `raised_neighbour_limits` raises the
thresholds for the run and puts the old values back afterwards; `neighbour_table` counts the entries.

Process and machine CPU and memory come from /proc: `process_usage` for one PID, `host_cpu_seconds` and
`busy_percent` for all cores.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

NEIGH_SYSCTL = Path("/proc/sys/net/ipv4/neigh/default")
ARP_STATS = Path("/proc/net/stat/arp_cache")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- the host's neighbour table ---------------------------------------------------------------------------


def neighbour_limits() -> tuple[int, int, int]:
    """net.ipv4.neigh.default.gc_thresh1/2/3, which apply to all namespaces together."""
    a, b, c = (int((NEIGH_SYSCTL / f"gc_thresh{k}").read_text()) for k in (1, 2, 3))
    return a, b, c


def _write_limits(values: tuple[int, int, int]) -> None:
    for k, value in enumerate(values, start=1):
        (NEIGH_SYSCTL / f"gc_thresh{k}").write_text(f"{value}\n")


def neighbour_table() -> tuple[int, int]:
    """(entries, table_fulls): the IPv4 neighbour table's entry count across all namespaces, and how often it
    was full (summed over CPUs) since boot. From /proc/net/stat/arp_cache (hex columns)."""
    lines = ARP_STATS.read_text().split("\n")
    names = lines[0].split()
    rows = [[int(v, 16) for v in line.split()] for line in lines[1:] if line.strip()]
    entries = rows[0][names.index("entries")]  # the table's count, repeated on every CPU's row
    fulls = sum(r[names.index("table_fulls")] for r in rows)
    return entries, fulls


def wanted_neighbour_limits(nodes: int) -> tuple[int, int, int]:
    """Thresholds for a lab of `nodes`: a full mesh needs nodes * (nodes - 1) entries (plus the server's),
    so gc never has to evict a live entry; never below the kernel defaults."""
    mesh = nodes * nodes + 64
    return max(128, mesh), max(512, 2 * mesh), max(1024, 4 * mesh)


@contextlib.contextmanager
def raised_neighbour_limits(wanted: tuple[int, int, int]) -> Iterator[tuple[int, int, int]]:
    """Raise gc_thresh1/2/3 to at least `wanted` for the `with` block; yield the previous values.

    On exit (also on failure) the previous values come back, unless something else changed them meanwhile
    (a concurrent lab that raised them too): then they are left as found.
    """
    before = neighbour_limits()
    raised = (max(before[0], wanted[0]), max(before[1], wanted[1]), max(before[2], wanted[2]))
    if raised != before:
        _write_limits(raised)
    try:
        yield before
    finally:
        if raised != before and neighbour_limits() == raised:
            _write_limits(before)


# -- CPU and memory ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    """One process's resident memory and CPU time, from /proc."""

    rss_mb: float
    cpu_s: float


def process_usage(pid: int) -> Usage | None:
    """VmRSS (/proc/PID/status) and utime+stime (/proc/PID/stat fields 14-15); None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": field 3 (state) is fields[0]
    cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    rss_kb = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return Usage(rss_kb / 1024, cpu)


def host_cpu_seconds() -> float:
    """CPU seconds all cores of this machine spent busy since boot (/proc/stat: all but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLOCK_TICKS


def busy_percent(cpu_before: float, since: float) -> float:
    """The machine's busy CPU since `since` (monotonic) as % of one core, from a host_cpu_seconds() reading."""
    return 100.0 * (host_cpu_seconds() - cpu_before) / max(1e-6, time.monotonic() - since)
