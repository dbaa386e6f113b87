"""Signals routed through the overlay (overlay/signalling.py): where each send of one signal goes."""

from __future__ import annotations

from overlay.signalling import Signalling
from overlay.transport.signals import Signal, SignalType, decode_routed_signal
from overlay.wire import Contact, Kind

PEER, A, B = 0x50, 0x0A, 0x0B


class Port:
    id = 0x01

    def __init__(self) -> None:
        self.sent: list[tuple[int, int]] = []  # (packet destination, the signal's final destination)

    def send_routed(self, dst: int, kind: Kind, body: bytes, flags: int = 0, via: int | None = None) -> None:
        assert kind == Kind.SIGNAL
        self.sent.append((dst, decode_routed_signal(body)[0]))


def offer() -> Signal:
    return Signal(SignalType.OFFER, 7, Contact(bytes(range(32)), "10.254.0.9", ("198.18.0.7", 5800), 1, bytes(64)))


def test_a_signal_sent_again_goes_through_each_way_in_turn_and_always_names_the_peer() -> None:
    port = Port()
    send = Signalling(port, lambda dst: None).route(PEER, A, then=[B, None])  # type: ignore[arg-type]
    for _ in range(4):
        send(offer())
    assert port.sent == [(A, PEER), (B, PEER), (PEER, PEER), (A, PEER)]


def test_without_other_ways_every_send_takes_the_one_given() -> None:
    port = Port()
    signalling = Signalling(port, lambda dst: None)  # type: ignore[arg-type]
    via, direct = signalling.route(PEER, A), signalling.route(PEER)
    for _ in range(2):
        via(offer())
        direct(offer())
    assert port.sent == [(A, PEER), (PEER, PEER), (A, PEER), (PEER, PEER)]
