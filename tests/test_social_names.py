"""The DNS responder for friends' names: the answer for each kind of question, safe handling of compression
pointers, EDNS, and hostile bytes that only ever produce a reply object."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.social.names import (
    ANSWER,
    BADVERS,
    EDNS_UDP_PAYLOAD,
    FORMERR,
    NAME_TTL,
    NO_DATA,
    NOT_QUERY,
    NOTIMP,
    NXDOMAIN,
    REFUSED,
    SHORT,
    NameReply,
    answer_query,
)


def ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


DOMAIN = "social.example"
NAMES = {
    "alice.social.example": ip("172.31.0.9"),
    "laptop.alice.social.example": ip("172.31.20.5"),
}
A, AAAA, TXT, OPT, ANY = 1, 28, 16, 41, 255
IN, CH = 1, 3
RD = 0x0100


# -- Query builders and a response parser, written independently of the code under test -------------------


def wire_name(name: str) -> bytes:
    return b"".join(bytes([len(label)]) + label.encode() for label in name.split(".") if label) + b"\x00"


def opt_record(version: int = 0, do: bool = False, payload: int = 4096, name: bytes = b"\x00") -> bytes:
    return name + struct.pack("!HHIH", OPT, payload, (version << 16) | (0x8000 if do else 0), 0)


def query(
    name: str = "laptop.alice.social.example",
    qtype: int = A,
    *,
    qclass: int = IN,
    ident: int = 0xBEEF,
    flags: int = RD,
    qname: bytes | None = None,
    counts: tuple[int, int, int, int] | None = None,
    records: bytes = b"",
) -> bytes:
    qdcount, ancount, nscount, arcount = counts or (1, 0, 0, 1 if records else 0)
    header = struct.pack("!HHHHHH", ident, flags, qdcount, ancount, nscount, arcount)
    return header + (wire_name(name) if qname is None else qname) + struct.pack("!HH", qtype, qclass) + records


@dataclass
class Response:
    ident: int
    flags: int
    questions: list[tuple[bytes, int, int]]
    answers: list[tuple[bytes, int, int, int, bytes]]
    additional: list[tuple[bytes, int, int, int, bytes]]

    @property
    def rcode(self) -> int:
        return self.flags & 0x0F

    @property
    def authoritative(self) -> bool:
        return bool(self.flags & 0x0400)


def read_name(data: bytes, offset: int) -> tuple[bytes, int]:
    """The dotted name at `offset` (raw label bytes, case kept) and the offset after it; follows at most 20
    pointers."""
    labels: list[bytes] = []
    end = None
    for _ in range(20):
        length = data[offset]
        if length >= 0xC0:
            end = offset + 2 if end is None else end
            offset = ((length & 0x3F) << 8) | data[offset + 1]
            continue
        if length == 0:
            return b".".join(labels), offset + 1 if end is None else end
        labels.append(data[offset + 1 : offset + 1 + length])
        offset += 1 + length
    raise AssertionError("pointer chain in a response")


def parse(data: bytes) -> Response:
    ident, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", data)
    offset, questions = 12, []
    for _ in range(qd):
        name, offset = read_name(data, offset)
        questions.append((name, *struct.unpack_from("!HH", data, offset)))
        offset += 4
    sections: list[list[tuple[bytes, int, int, int, bytes]]] = []
    for count in (an, ns, ar):
        records = []
        for _ in range(count):
            name, offset = read_name(data, offset)
            rtype, rclass, ttl, length = struct.unpack_from("!HHIH", data, offset)
            offset += 10
            records.append((name, rtype, rclass, ttl, data[offset : offset + length]))
            offset += length
        sections.append(records)
    assert offset == len(data), "trailing bytes in a response"
    assert ns == 0
    return Response(ident, flags, questions, sections[0], sections[2])


def ask(data: bytes) -> tuple[Response, str]:
    reply = answer_query(data, DOMAIN, NAMES.get)
    assert reply.response is not None
    response = parse(reply.response)
    assert response.flags & 0x8000, "QR must be set"
    assert response.ident == struct.unpack_from("!H", data)[0]
    return response, reply.outcome


# -- Answers -----------------------------------------------------------------------------------------------


def test_a_known_name_gets_its_address_authoritatively_with_a_short_ttl() -> None:
    response, outcome = ask(query("laptop.alice.social.example"))
    assert outcome == ANSWER
    assert response.rcode == 0 and response.authoritative
    assert response.flags & RD  # copied from the query (RFC 1035 §4.1.1)
    assert response.questions == [(b"laptop.alice.social.example", A, IN)]
    assert response.answers == [(b"laptop.alice.social.example", A, IN, NAME_TTL, bytes([172, 31, 20, 5]))]
    assert NAME_TTL <= 60


def test_a_user_name_resolves_like_a_resource_name() -> None:
    response, _ = ask(query("alice.social.example"))
    assert response.answers[0][4] == bytes([172, 31, 0, 9])


def test_names_match_in_any_case_and_the_question_keeps_the_askers_case() -> None:
    response, outcome = ask(query("LapTop.ALICE.Social.EXAMPLE"))
    assert outcome == ANSWER
    assert response.questions[0][0] == b"LapTop.ALICE.Social.EXAMPLE"
    assert response.answers[0][4] == bytes([172, 31, 20, 5])


def test_lookup_is_asked_for_the_lowercase_full_name_without_the_final_dot() -> None:
    asked: list[str] = []

    def lookup(name: str) -> int | None:
        asked.append(name)
        return None

    answer_query(query("Phone.Bob.SOCIAL.example"), "Social.Example.", lookup)
    assert asked == ["phone.bob.social.example"]


def test_an_unknown_name_under_the_domain_is_nxdomain() -> None:
    response, outcome = ask(query("tv.bob.social.example"))
    assert (outcome, response.rcode, response.authoritative, response.answers) == (NXDOMAIN, 3, True, [])
    assert response.questions == [(b"tv.bob.social.example", A, IN)]


@pytest.mark.parametrize("name", ["example.com", "alice.example", "alicesocial.example", "social.example.net", "."])
def test_a_name_outside_the_domain_is_refused_without_authority(name: str) -> None:
    response, outcome = ask(query(name))
    assert (outcome, response.rcode, response.authoritative, response.answers) == (REFUSED, 5, False, [])


@pytest.mark.parametrize("qtype", [AAAA, TXT, 15])
def test_another_type_for_a_known_name_is_noerror_with_no_answer(qtype: int) -> None:
    response, outcome = ask(query("laptop.alice.social.example", qtype))
    assert (outcome, response.rcode, response.authoritative, response.answers) == (NO_DATA, 0, True, [])


def test_any_for_a_known_name_gets_the_a_record() -> None:
    response, outcome = ask(query("alice.social.example", ANY))
    assert outcome == ANSWER
    assert [record[1] for record in response.answers] == [A]


def test_the_domain_itself_exists_with_no_records() -> None:
    # NXDOMAIN would tell an RFC 8020 resolver that no name below the domain exists either.
    response, outcome = ask(query("social.example"))
    assert (outcome, response.rcode, response.answers) == (NO_DATA, 0, [])


@pytest.mark.parametrize("qclass", [CH, 255])
def test_a_class_other_than_in_is_refused(qclass: int) -> None:
    response, outcome = ask(query("alice.social.example", qclass=qclass))
    assert (outcome, response.rcode) == (REFUSED, 5)


def test_a_label_holding_a_dot_is_no_name_anybody_has() -> None:
    asked: list[str] = []
    qname = b"\x0claptop.alice" + wire_name("social.example")  # one label "laptop.alice", not two

    def lookup(name: str) -> int | None:
        asked.append(name)
        return 1

    reply = answer_query(query(qname=qname), DOMAIN, lookup)
    assert reply.outcome == NXDOMAIN and asked == []


# -- Errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opcode", [1, 2, 4, 5, 6, 15])
def test_other_opcodes_get_notimp_with_the_opcode_echoed(opcode: int) -> None:
    response, outcome = ask(query(flags=opcode << 11))
    assert (outcome, response.rcode, (response.flags >> 11) & 0xF, response.questions) == (NOTIMP, 4, opcode, [])


@pytest.mark.parametrize("qdcount", [0, 2])
def test_a_query_without_exactly_one_question_is_formerr(qdcount: int) -> None:
    response, outcome = ask(query(counts=(qdcount, 0, 0, 0)))
    assert (outcome, response.rcode, response.questions) == (FORMERR, 1, [])


@pytest.mark.parametrize("cut", [13, 20, len(query()) - 4, len(query()) - 1])
def test_a_question_cut_short_is_formerr(cut: int) -> None:
    assert ask(query()[:cut])[1] == FORMERR


@pytest.mark.parametrize(
    "qname",
    [
        b"\xc0\x0c",  # points at itself
        b"\xc0\x00",  # into the header
        b"\x05alice\xc0\x0c",  # back to its own start: a loop
        b"\xc0\xff",  # past the end
        b"\x05alice\xc0",  # pointer cut off
        b"\x45" + b"a" * 5 + b"\x00",  # reserved label type 0x40
        b"\x85" + b"a" * 5 + b"\x00",  # reserved label type 0x80
        b"\x3fxxx",  # label runs past the end
        b"".join(b"\x3f" + b"a" * 63 for _ in range(4)) + b"\x00",  # 257 bytes: over RFC 1035's 255
    ],
)
def test_a_bad_question_name_is_formerr(qname: bytes) -> None:
    assert ask(query(qname=qname))[1] == FORMERR


def test_pointers_that_chase_each_other_in_a_record_are_formerr() -> None:
    question_end = 12 + len(wire_name("alice.social.example")) + 4
    # Record names at question_end and question_end + 2, each a pointer to the other.
    records = struct.pack("!HH", 0xC000 | (question_end + 2), 0xC000 | question_end)
    assert ask(query("alice.social.example", records=records, counts=(1, 0, 0, 1)))[1] == FORMERR


def test_a_record_name_pointing_back_at_the_question_is_followed() -> None:
    records = b"\xc0\x0c" + struct.pack("!HHIH", TXT, IN, 0, 2) + b"\x01x"
    response, outcome = ask(query("alice.social.example", records=records))
    assert outcome == ANSWER and response.answers[0][4] == bytes([172, 31, 0, 9])


def test_a_name_of_exactly_255_bytes_is_accepted() -> None:
    labels = ["a" * 63, "b" * 63, "c" * 63, "d" * 46, "social", "example"]
    name = ".".join(labels)
    assert len(wire_name(name)) == 255
    assert ask(query(name))[1] == NXDOMAIN
    reply = answer_query(query(name, ANY), DOMAIN, {name: 1}.get)
    assert reply.outcome == ANSWER
    assert len(reply.response or b"") <= 512  # RFC 1035 §4.2.1: fits UDP without EDNS or truncation


def test_a_datagram_shorter_than_a_header_gets_no_reply() -> None:
    assert answer_query(b"\x00" * 11, DOMAIN, NAMES.get) == NameReply(None, SHORT)


def test_a_response_gets_no_reply() -> None:
    assert answer_query(query(flags=0x8000), DOMAIN, NAMES.get) == NameReply(None, NOT_QUERY)


def test_misuse_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="domain"):
        answer_query(query(), "bad..domain", NAMES.get)
    with pytest.raises(ValueError, match="TTL"):
        answer_query(query(), DOMAIN, NAMES.get, ttl=-1)


# -- EDNS --------------------------------------------------------------------------------------------------


def test_an_edns_query_gets_an_opt_record_with_our_size_and_do_copied() -> None:
    response, outcome = ask(query(records=opt_record(do=True)))
    assert outcome == ANSWER
    assert response.additional == [(b"", OPT, EDNS_UDP_PAYLOAD, 0x8000, b"")]


def test_an_edns_nxdomain_carries_the_opt_record_too() -> None:
    response, outcome = ask(query("nobody.social.example", records=opt_record()))
    assert (outcome, response.rcode) == (NXDOMAIN, 3)
    assert response.additional == [(b"", OPT, EDNS_UDP_PAYLOAD, 0, b"")]


def test_an_edns_version_above_zero_gets_badvers() -> None:
    response, outcome = ask(query(records=opt_record(version=1)))
    # RFC 6891 §6.1.3: BADVERS is 16: 0 in the header, 1 in the OPT record's extended RCODE; version 0 is ours.
    assert (outcome, response.rcode, response.answers) == (BADVERS, 0, [])
    assert response.additional[0][3] == 1 << 24


@pytest.mark.parametrize(
    ("records", "counts"),
    [
        (opt_record() + opt_record(), (1, 0, 0, 2)),  # twice
        (opt_record(), (1, 1, 0, 0)),  # in the answer section
        (opt_record(name=b"\x01x\x00"), (1, 0, 0, 1)),  # not owned by the root
        (opt_record()[:-1], (1, 0, 0, 1)),  # cut off
        (opt_record()[:-2] + b"\x00\x09", (1, 0, 0, 1)),  # RDLENGTH past the end
    ],
)
def test_a_misplaced_repeated_or_cut_opt_record_is_formerr(records: bytes, counts: tuple[int, int, int, int]) -> None:
    assert ask(query(records=records, counts=counts))[1] == FORMERR


# -- Properties --------------------------------------------------------------------------------------------

labels = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-", min_size=1, max_size=12)


@given(
    st.lists(labels, min_size=0, max_size=3),
    st.sampled_from(["social.example", "SOCIAL.Example", "example.com", "other.social.example.net"]),
    st.sampled_from([A, AAAA, TXT, ANY]),
    st.booleans(),
)
def test_any_name_gets_the_answer_its_place_and_the_table_call_for(
    prefix: list[str], suffix: str, qtype: int, known: bool
) -> None:
    name = ".".join([*prefix, suffix])
    table = {name.lower(): ip("172.31.1.2")} if known else {}
    reply = answer_query(query(name, qtype), DOMAIN, table.get)
    assert reply.response is not None
    response = parse(reply.response)
    assert response.questions == [(name.encode(), qtype, IN)]
    in_zone = suffix.lower() == "social.example"
    if not in_zone:
        expected = (REFUSED, 5)
    elif not prefix:
        expected = (NO_DATA, 0)
    elif not known:
        expected = (NXDOMAIN, 3)
    else:
        expected = (ANSWER, 0) if qtype in (A, ANY) else (NO_DATA, 0)
    assert (reply.outcome, response.rcode) == expected
    assert len(response.answers) == (1 if reply.outcome == ANSWER else 0)


def check_reply(data: bytes, reply: NameReply) -> None:
    assert isinstance(reply, NameReply)
    if reply.response is not None:
        response = parse(reply.response)
        assert response.ident == struct.unpack_from("!H", data)[0]
        assert len(reply.response) <= 512


@settings(max_examples=400)
@given(st.binary(max_size=300))
def test_any_bytes_get_a_reply_object_never_an_exception(data: bytes) -> None:
    check_reply(data, answer_query(data, DOMAIN, NAMES.get))


@settings(max_examples=400)
@given(st.integers(min_value=0, max_value=0xFFFF), st.tuples(*[st.integers(0, 3)] * 4), st.binary(max_size=200))
def test_a_query_header_followed_by_any_bytes_never_raises(
    ident: int, counts: tuple[int, int, int, int], rest: bytes
) -> None:
    data = struct.pack("!HHHHHH", ident, RD, *counts) + rest
    check_reply(data, answer_query(data, DOMAIN, NAMES.get))


pointer_or_label = st.one_of(
    st.integers(min_value=0, max_value=0x3FFF).map(lambda target: struct.pack("!H", 0xC000 | target)),
    st.binary(min_size=0, max_size=10).map(lambda label: bytes([len(label)]) + label),
)


@settings(max_examples=400)
@given(st.lists(pointer_or_label, max_size=6), st.lists(pointer_or_label, max_size=6), st.booleans())
def test_random_compression_pointers_never_raise(question: list[bytes], record: list[bytes], terminate: bool) -> None:
    end = b"\x00" if terminate else b""
    records = b"".join(record) + end + struct.pack("!HHIH", TXT, IN, 0, 0)
    data = query(qname=b"".join(question) + end, records=records, counts=(1, 0, 0, 1))
    check_reply(data, answer_query(data, DOMAIN, NAMES.get))


@settings(max_examples=400)
@given(st.integers(min_value=0, max_value=10_000), st.integers(min_value=0, max_value=255), st.booleans())
def test_corrupting_any_byte_of_a_query_never_raises(where: int, value: int, edns: bool) -> None:
    data = bytearray(query(records=opt_record() if edns else b""))
    data[where % len(data)] = value
    check_reply(bytes(data), answer_query(bytes(data), DOMAIN, NAMES.get))
