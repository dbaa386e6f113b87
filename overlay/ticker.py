"""When the node next runs its tick: one asyncio timer, moved earlier by events and put off while a link we only
wait to hear from keeps talking.

The node's tick (Node.tick) does the work; this module only decides when. Two kinds of deadline meet here: what
the node's parts need (lookups retrying at 1 s, maintenance's next round, at most IDLE_TIMER_MAX on an idle node)
and the silence deadline of the link maintenance watches most closely (`next_silence`, a ping or suspect time),
which hearing from that link pushes back (bench/scale.py: routed lookups were most of an idle node's wake-ups).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

TIMER_MAX = 1.0  # the longest the node sleeps between ticks while something is under way (lookups retry at 1 s)
# ... and when nothing is: maintenance says when it next has work. The longest gossip round (7.5-12.5 s), so an
# idle node wakes for its rounds only (DHT checks, STUN refreshes and beacons ride on them).
IDLE_TIMER_MAX = 12.5
# asyncio runs a timer up to its clock resolution early (BaseEventLoop._clock_resolution): a tick woken exactly at
# a deadline could find it not yet passed and sleep again for 20 ms (a quarter of an idle node's ticks).
TIMER_SLACK = 0.002


class Ticker:
    def __init__(self, clock: Callable[[], float], tick: Callable[[], None], next_silence: Callable[[], float]):
        self.clock = clock
        self._tick = tick
        self._next_silence = next_silence
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._at = 0.0
        # Set when the timer waits only for a link's silence: hearing from that link moves the timer to the next
        # deadline, up to `_bound` (what the rest of the node needs).
        self._for_silence = False
        self._bound = 0.0
        self.stopped = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.schedule(self.clock())

    def stop(self) -> None:
        """No more ticks (the node stopped, or a test's crash: its links are left to time out at the peers)."""
        self.stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    @property
    def due(self) -> float:
        """When the next tick runs (the clock's time)."""
        return self._at

    def schedule(self, when: float, *, for_silence: bool = False) -> None:
        if self.stopped or self._loop is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._for_silence = for_silence
        now = self.clock()
        delay = min(IDLE_TIMER_MAX, max(0.02, when - now + TIMER_SLACK))
        self._timer = self._loop.call_later(delay, self._on_timer)
        self._at = now + delay

    def wake(self, within: float = 0.0) -> None:
        """Tick within `within` seconds; an earlier timer stays, and is no longer put off by gossip."""
        now = self.clock()
        if self._timer is None or self._at > now + within:
            self.schedule(now + within)
        else:
            self._for_silence = False

    def watch_silence(self) -> None:
        """A link now needs watching sooner than the timer would wake (its ping, its suspect time)."""
        when = self._next_silence()
        if self._timer is None or self._at > when:
            self.schedule(when, for_silence=True)

    def rest(self, bound: float) -> None:
        """After a tick: sleep until `bound` (what the node's parts need), or the silence deadline if sooner."""
        self._bound = bound
        self._schedule_rest()

    def heard_from_watched(self) -> None:
        """The link the timer waits on has been heard from: sleep until the next deadline instead."""
        if self._for_silence and self._next_silence() > self._at + 1.0:
            self._schedule_rest()

    def _schedule_rest(self) -> None:
        silence = self._next_silence()
        self.schedule(min(self._bound, silence), for_silence=silence < self._bound)

    def _on_timer(self) -> None:
        self._timer = None
        self._tick()
