"""An ICE agent for in-memory nodes whose checks never find a pair: what link set-up offers, and how often."""

from __future__ import annotations

import asyncio

from overlay.transport.signals import IceParams


class FakeSession:
    """An ICE session whose checks find no pair (the peers' NATs let nothing through)."""

    def __init__(self, relay: bool) -> None:
        self.relay = relay

    def params(self) -> IceParams:
        return IceParams("abcdefgh", "p" * 22, ())

    async def establish(self, remote: IceParams, timeout: float) -> None:
        await asyncio.sleep(0.05)
        return None

    async def close(self) -> None:
        pass


class FakeAgent:
    def __init__(self) -> None:
        self.sessions: list[FakeSession] = []

    def session(self, controlling: bool, *, relay: bool, peer_relays: bool | None = None) -> FakeSession:
        self.sessions.append(FakeSession(relay))
        return self.sessions[-1]

    def gathering(self, now: float) -> bool:
        return False
