"""PNG pictures of simulator results (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from sims.routes import Route


def plot_hops(routes: list[Route], path: str, title: str = "") -> None:
    """Histogram of the hop counts of delivered routes."""
    hops = [r.hops for r in routes if r.delivered]
    fig, ax = plt.subplots(figsize=(6, 4))
    if hops:
        ax.hist(hops, bins=range(0, max(hops) + 2), align="left", rwidth=0.85)
    ax.set_xlabel("overlay hops")
    ax.set_ylabel("routed pairs")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(rows: Sequence[dict[str, Any]], path: str, series: Sequence[tuple[str, str]]) -> None:
    """Hops versus N: one line per (label, key) in `series`, plus the shortest path and the Moore bound.

    Each row is a `simulate` report tagged with a "label".
    """
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, key in series:
        pts = sorted((r["nodes"], r["hops"]["mean"]) for r in rows if r["label"] == key)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    ref = [r for r in rows if r["label"] == series[-1][1] and "shortest_path" in r]
    if ref:
        pts = sorted((r["nodes"], r["shortest_path"]["mean"]) for r in ref)
        ax.plot(*zip(*pts, strict=True), "k--", marker="s", label="shortest path (BFS)")
        pts = sorted((r["nodes"], r["moore_bound"]) for r in ref)
        ax.plot(*zip(*pts, strict=True), "k:", label="Moore bound")
    ax.set_xscale("log")
    ax.set_xlabel("nodes N")
    ax.set_ylabel("mean hops")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
