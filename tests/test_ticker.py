"""overlay/ticker.py: when the node's tick runs, against a loop that records its timers (no time passes)."""

from __future__ import annotations

from typing import Any

from overlay.ticker import IDLE_TIMER_MAX, TIMER_SLACK, Ticker


class Handle:
    def __init__(self, delay: float, callback: Any) -> None:
        self.delay, self.callback, self.cancelled = delay, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    def __init__(self) -> None:
        self.timers: list[Handle] = []

    def call_later(self, delay: float, callback: Any) -> Handle:
        self.timers.append(Handle(delay, callback))
        return self.timers[-1]

    def pending(self) -> list[Handle]:
        return [h for h in self.timers if not h.cancelled]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(silence: float = 1e9) -> tuple[Ticker, Loop, Clock, list[float], list[float]]:
    clock, loop, ticks, deadline = Clock(), Loop(), [], [silence]
    ticker = Ticker(clock, lambda: ticks.append(clock.now), lambda: deadline[0])
    ticker.start(loop)  # type: ignore[arg-type]
    return ticker, loop, clock, ticks, deadline


def fire(loop: Loop) -> None:
    (timer,) = loop.pending()
    loop.timers.remove(timer)
    timer.callback()


def test_one_timer_at_a_time_and_the_first_tick_at_once() -> None:
    ticker, loop, clock, ticks, _ = make()
    assert [round(h.delay, 3) for h in loop.pending()] == [0.02]  # at once, but not in a busy loop
    ticker.wake(5.0)  # a later wish keeps the earlier timer
    assert len(loop.pending()) == 1
    fire(loop)
    assert ticks == [clock.now]
    assert loop.pending() == []  # the tick says when it next runs (rest), not the ticker


def test_rest_sleeps_until_the_bound_or_the_silence_deadline_whichever_is_first() -> None:
    ticker, loop, clock, _, deadline = make()
    fire(loop)
    ticker.rest(clock.now + 5.0)
    assert [round(h.delay, 3) for h in loop.pending()] == [round(5.0 + TIMER_SLACK, 3)]
    deadline[0] = clock.now + 2.0
    ticker.rest(clock.now + 5.0)
    assert [round(h.delay, 3) for h in loop.pending()] == [round(2.0 + TIMER_SLACK, 3)]
    ticker.rest(clock.now + 100.0)  # never longer than an idle node's longest sleep
    deadline[0] = 1e9
    ticker.rest(clock.now + 100.0)
    assert [h.delay for h in loop.pending()] == [IDLE_TIMER_MAX]


def test_hearing_from_the_watched_link_puts_the_timer_off_to_the_next_deadline() -> None:
    ticker, loop, clock, _, deadline = make()
    fire(loop)
    deadline[0] = clock.now + 2.0
    ticker.rest(clock.now + 10.0)  # the timer waits on the link's silence
    deadline[0] = clock.now + 6.0  # the link spoke: its silence deadline moved on
    ticker.heard_from_watched()
    assert [round(h.delay, 3) for h in loop.pending()] == [round(6.0 + TIMER_SLACK, 3)]
    deadline[0] = clock.now + 6.5  # within a second of the timer: not worth moving it again
    ticker.heard_from_watched()
    assert [round(h.delay, 3) for h in loop.pending()] == [round(6.0 + TIMER_SLACK, 3)]


def test_a_wake_ends_the_put_off_and_a_watch_brings_the_timer_forward() -> None:
    ticker, loop, clock, _, deadline = make()
    fire(loop)
    deadline[0] = clock.now + 2.0
    ticker.rest(clock.now + 10.0)
    ticker.wake(5.0)  # the earlier timer stays, and is no longer the silence's alone
    deadline[0] = clock.now + 8.0
    ticker.heard_from_watched()
    assert [round(h.delay, 3) for h in loop.pending()] == [round(2.0 + TIMER_SLACK, 3)]
    deadline[0] = clock.now + 0.5
    ticker.watch_silence()  # a link needs watching sooner
    assert [round(h.delay, 3) for h in loop.pending()] == [round(0.5 + TIMER_SLACK, 3)]
    deadline[0] = clock.now + 1.5
    ticker.watch_silence()  # later than the timer: nothing moves
    assert [round(h.delay, 3) for h in loop.pending()] == [round(0.5 + TIMER_SLACK, 3)]


def test_a_stopped_ticker_schedules_nothing() -> None:
    ticker, loop, clock, ticks, _ = make()
    ticker.stop()
    assert loop.pending() == []
    ticker.wake()
    ticker.rest(clock.now + 1.0)
    ticker.watch_silence()
    assert loop.pending() == [] and ticks == []
