"""A member's first certificate: asked for in the XMPP room, from a node marked as the group's issuer.

The request goes as a private message to the issuer's occupant; the issuer reads our real JID from the room
(it owns the room, so the server shows it) and checks it against the member list. An issuer node issues its own
certificate directly. A joiner with no issuer in the room waits, saying so once; a refusal that waiting cannot
fix (an address that is another member's, an address outside the group's subnet) ends the join with the
issuer's reason.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import time
from typing import Any

from overlay.identity import Identity
from overlay.trust.certs import CertError, Certificate
from overlay.trust.issuer import Issuer, IssuerError, decode_answer, make_request
from overlay.trust.members import GroupTrust

log = logging.getLogger(__name__)

ANSWER_TIMEOUT = 5.0
# Our choice: the issuer reads the member list every 10 s (overlay/trust/service.py MEMBER_POLL) and at once on
# a request from a JID it does not know, so "not a member" is asked again for a while before it is believed.
NOT_MEMBER_TRIES = 6
RETRY = 3.0


class EnrollError(Exception):
    """The group will not give us a certificate: one line for the person who ran `join`."""


def _nick_id(nick: str) -> int | None:
    try:
        return int(nick, 16) if len(nick) == 16 else None
    except ValueError:
        return None


async def obtain_certificate(
    bootstrap: Any,
    identity: Identity,
    trust: GroupTrust,
    room: str,
    jid: str,
    wanted: ipaddress.IPv4Address | None,
    issuer: Issuer | None,
    stop: asyncio.Event,
) -> Certificate | None:
    """Our certificate, set on `trust`; None if `stop` was set while we waited."""
    if issuer is not None:
        return await _issue_own(bootstrap, identity, trust, room, jid, wanted, issuer)
    said_waiting = False
    not_member = 0
    while not stop.is_set():
        issuers = list(getattr(bootstrap, "issuers", []))
        trust.issuers.update(i for i in map(_nick_id, issuers) if i is not None)
        if not issuers:
            if not said_waiting:
                log.warning("waiting for an issuer of the group (a node with an [issuer] section) to be in %s", room)
                said_waiting = True
            await _sleep(stop, RETRY)
            continue
        request = make_request(identity, room, time.time(), wanted).encode()
        nick = random.choice(issuers)
        answers = await bootstrap.exchange({nick: request}, timeout=ANSWER_TIMEOUT)
        answer = answers.get(nick)
        if answer is None:
            log.info("no certificate answer from issuer %s yet; asking again", nick)
            await _sleep(stop, RETRY)
            continue
        try:
            result = decode_answer(answer)
        except CertError as e:
            log.warning("issuer %s answered with something malformed (%s)", nick, e)
            await _sleep(stop, RETRY)
            continue
        if isinstance(result, Certificate):
            try:
                trust.set_certificate(result)
            except ValueError as e:
                raise EnrollError(f"issuer {nick} gave a certificate we cannot use: {e}") from None
            _check_wanted(result, wanted)
            log.info("certificate from issuer %s: %s as %s", nick, result.jid, result.address)
            return result
        if "is not a member" in result and not_member < NOT_MEMBER_TRIES:
            not_member += 1
            await _sleep(stop, RETRY)
            continue
        raise EnrollError(f"the group's issuer refused a certificate: {result}")
    return None


async def _issue_own(
    bootstrap: Any,
    identity: Identity,
    trust: GroupTrust,
    room: str,
    jid: str,
    wanted: ipaddress.IPv4Address | None,
    issuer: Issuer,
) -> Certificate:
    from xmpp_bootstrap.client import BootstrapError

    try:
        members = await bootstrap.fetch_affiliations()
    except BootstrapError as e:
        raise EnrollError(f"the issuer cannot read the member list of {room}: {e}") from None
    now = time.time()
    issuer.set_members(members, now)
    bare = jid.split("/", 1)[0].lower()
    try:
        cert = issuer.issue(make_request(identity, room, now, wanted), bare, now)
    except IssuerError as e:
        raise EnrollError(f"cannot issue our own certificate: {e}") from None
    trust.set_certificate(cert)
    _check_wanted(cert, wanted)
    log.info("issued our own certificate: %s as %s", cert.jid, cert.address)
    return cert


def _check_wanted(cert: Certificate, wanted: ipaddress.IPv4Address | None) -> None:
    if wanted is not None and cert.address.ip != wanted:
        raise EnrollError(f"the issuer gave {cert.address.ip}, not the configured [vnic] address {wanted}")


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass
