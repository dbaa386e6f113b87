"""What a group of running nodes looks like from their `status`: overlays, the ring, whether it is whole."""

from __future__ import annotations

from typing import Any

from overlay.ids import parse_id
from overlay.routing.ring import SortedRing
from tests.support.group import Group


def statuses(g: Group) -> dict[int, dict[str, Any]]:
    out = {}
    for m in g.members:
        if m.running:
            try:
                out[m.index] = g.status(m.index)
            except RuntimeError:
                pass
    return out


def ring_errors(g: Group, sts: dict[int, dict[str, Any]]) -> list[int]:
    """Running members whose first successor and predecessor are not the true ones among running members."""
    ids = {i: parse_id(st["node_id"]) for i, st in sts.items()}
    ring = SortedRing(ids.values())
    wrong = []
    for i, st in sts.items():
        succ, pred = ring.successors(ids[i], 1), ring.predecessors(ids[i], 1)
        have_s = [parse_id(x) for x in st["successors"][:1]]
        have_p = [parse_id(x) for x in st["predecessors"][:1]]
        if have_s != succ or have_p != pred:
            wrong.append(i)
    return wrong


def overlays(sts: dict[int, dict[str, Any]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, st in sts.items():
        out.setdefault(st["overlay"]["id"], []).append(i)
    return out


def one_ring(g: Group) -> bool:
    sts = statuses(g)
    return len(overlays(sts)) == 1 and not ring_errors(g, sts)
