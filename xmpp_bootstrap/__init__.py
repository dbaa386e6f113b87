"""XMPP bootstrap: login, room membership and the first hello exchange; an in-memory twin for tests."""

from xmpp_bootstrap import _slixmpp_version  # noqa: F401 (first: before any module here imports slixmpp)
from xmpp_bootstrap.bootstrap import Bootstrap
from xmpp_bootstrap.client import XmppBootstrap, XmppSettings
from xmpp_bootstrap.memory import MemoryBootstrap, MemoryRoom
from xmpp_bootstrap.protocol import MAX_HELLO, decode_hello, encode_hello
from xmpp_bootstrap.session import BootstrapError

__all__ = [
    "MAX_HELLO",
    "Bootstrap",
    "BootstrapError",
    "MemoryBootstrap",
    "MemoryRoom",
    "XmppBootstrap",
    "XmppSettings",
    "decode_hello",
    "encode_hello",
]
