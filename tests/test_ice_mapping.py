"""What the STUN servers' answers say of the NAT in front of a node (overlay/transport/ice.py mapping_behaviour):
RFC 4787's mapping behaviour, told from two server addresses. The lab's NATs: tests/test_nat.py."""

from __future__ import annotations

import pytest

from overlay.transport.ice import mapping_behaviour


@pytest.mark.parametrize(
    ("hosts", "answers", "says"),
    [
        (set(), [], "unknown"),
        ({"198.18.0.7"}, [("198.18.0.4", ("198.18.0.7", 5800)), ("198.18.0.5", ("198.18.0.7", 5800))], "none"),
        ({"10.0.0.2"}, [("198.18.0.4", ("198.18.0.2", 7000))], "a NAT; its mapping needs two"),
        ({"10.0.0.2"}, [("198.18.0.4", ("198.18.0.2", 7000)), ("198.18.0.4", ("198.18.0.2", 7000))], "a NAT;"),
        ({"10.0.0.2"}, [("198.18.0.4", ("198.18.0.2", 7000)), ("198.18.0.5", ("198.18.0.2", 7000))], "endpoint-"),
        ({"10.0.0.2"}, [("198.18.0.4", ("198.18.0.2", 7000)), ("198.18.0.5", ("198.18.0.2", 7001))], "address-"),
    ],
    ids=["no-answer", "public", "one-server", "one-address", "cone", "symmetric"],
)
def test_the_nats_mapping_is_told_from_two_stun_server_addresses(
    hosts: set[str], answers: list[tuple[str, tuple[str, int]]], says: str
) -> None:
    assert mapping_behaviour(hosts, answers).startswith(says)
