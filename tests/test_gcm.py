"""AES-256-GCM in the compiled module (overlay/_gcm.h): each implementation that can run here gives the bytes an
independent one gives (the `cryptography` package, its own OpenSSL), the two open each other's packets, and a
changed byte is refused by both. Where the build and the CPU have what ipsec-mb needs, it is the one in use."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay._fast import GCM, GCM_IMPLS, Forged, Keys, aesgcm_open, aesgcm_seal
from overlay.cli import _status_table
from tests.support.memgroup import MemoryGroup

REPO = Path(__file__).resolve().parents[1]
IMPLS = list(GCM_IMPLS)
keys = st.binary(min_size=32, max_size=32)
nonces = st.binary(min_size=12, max_size=12)
# Small packets byte by byte, and any size up to a super-frame (seeded bytes: hypothesis can replay them).
payloads = st.one_of(
    st.binary(max_size=300),
    st.tuples(st.integers(0, 66000), st.integers(0, 2**32)).map(lambda t: random.Random(t[1]).randbytes(t[0])),
)


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=150, deadline=None)
@given(key=keys, nonce=nonces, ad=st.binary(max_size=80), data=payloads)
def test_each_implementation_seals_as_an_independent_one_and_opens_it(
    impl: str, key: bytes, nonce: bytes, ad: bytes, data: bytes
) -> None:
    reference = AESGCM(key).encrypt(nonce, data, ad)
    assert aesgcm_seal(key, nonce, ad, data, impl=impl) == reference
    assert aesgcm_open(key, nonce, ad, reference, impl=impl) == data


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=100, deadline=None)
@given(key=keys, nonce=nonces, ad=st.binary(max_size=40), data=st.binary(max_size=200), where=st.integers(0))
def test_a_changed_byte_of_ciphertext_tag_or_associated_data_is_refused(
    impl: str, key: bytes, nonce: bytes, ad: bytes, data: bytes, where: int
) -> None:
    sealed = aesgcm_seal(key, nonce, ad, data, impl=impl)
    both = bytearray(ad + sealed)
    both[where % len(both)] ^= 0x01
    with pytest.raises(Forged):
        aesgcm_open(key, nonce, bytes(both[: len(ad)]), bytes(both[len(ad) :]), impl=impl)
    with pytest.raises(Forged):
        aesgcm_open(key, nonce, ad, sealed[:15], impl=impl)


@pytest.mark.skipif(len(IMPLS) < 2, reason="one AES-GCM implementation here")
@settings(max_examples=100, deadline=None)
@given(data=payloads, ptype=st.sampled_from([0x83, 0x84, 0x86]), first=st.sampled_from(IMPLS))
def test_link_packets_of_one_implementation_open_with_the_other(data: bytes, ptype: int, first: str) -> None:
    other = next(i for i in IMPLS if i != first)
    k1, k2 = os.urandom(32), os.urandom(32)
    sender, receiver = Keys(k1, k2, impl=first), Keys(k2, k1, impl=other)
    packet = sender.seal(ptype, 7, data)
    assert receiver.open(packet, int.from_bytes(packet[5:13], "big")) == data
    # A head bound to the tag of the packet after it (SEALED and TUNNEL packets), the other way round.
    inner = os.urandom(40)
    bound = receiver.seal_header(9, data[:28], inner, ptype)
    counter = int.from_bytes(bound[5:13], "big")
    assert sender.open_header(bound, counter, len(data[:28]) + 16) == data[:28]
    changed = bound[:-1] + bytes([bound[-1] ^ 1])  # the inner packet's tag, which the head is bound to
    with pytest.raises(Forged):
        Keys(k2, k1, impl=first).open_header(changed, counter, len(data[:28]) + 16)


@pytest.mark.parametrize("impl", IMPLS)
def test_keys_refuse_work_before_they_are_set_and_are_set_once(impl: str) -> None:
    blank = Keys.__new__(Keys)
    with pytest.raises(RuntimeError, match="not initialised"):
        blank.seal(0x83, 1, b"x")
    keys = Keys(bytes(32), bytes(32), impl=impl)
    with pytest.raises(RuntimeError, match="set once"):
        keys.__init__(bytes(32), bytes(32))  # type: ignore[misc]


def test_an_unknown_or_unavailable_implementation_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no AES-GCM implementation"):
        Keys(bytes(32), bytes(32), impl="rot13")
    with pytest.raises(ValueError, match="no AES-GCM implementation"):
        aesgcm_seal(bytes(32), bytes(12), b"", b"x", impl="rot13")
    if "ipsec-mb" not in IMPLS:
        with pytest.raises(ValueError, match="cannot run here"):
            Keys(bytes(32), bytes(32), impl="ipsec-mb")


def test_ipsec_mb_runs_where_the_build_and_cpu_have_it_and_not_at_all_when_the_environment_says_openssl() -> None:
    built = Path("/usr/include/intel-ipsec-mb.h").exists()
    capable = {"aes", "pclmulqdq", "avx2"} <= cpu_flags()  # what its AVX2 code needs
    if not (built and capable):
        assert IMPLS[0] == "openssl"
        pytest.skip("no ipsec-mb build or no AVX2 here: OpenSSL it is")
    assert IMPLS[0] == "ipsec-mb" and GCM.startswith("ipsec-mb")
    probe = "import overlay._fast as f; print(','.join(f.GCM_IMPLS), f.GCM)"
    env = {**os.environ, "IPOP_OVERLAY_GCM": "openssl"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=REPO, capture_output=True, text=True, check=True)
    impls, name = out.stdout.split(" ", 1)
    assert impls == "openssl" and name.startswith("OpenSSL")


def test_a_nodes_status_names_the_cipher_and_the_data_path_in_use() -> None:
    async def scenario() -> None:
        g = MemoryGroup(seed=41)
        try:
            node = await g.add_node()
            st = node.status()
            assert st["cipher"] == f"AES-256-GCM, {GCM}"
            assert f"cipher   AES-256-GCM, {GCM}" in _status_table(st).splitlines()
            assert st["lanes"] == 0  # a memory TAP: no Engine
            assert "data     Python" in _status_table(st).splitlines()
            for lanes, says in ((1, "compiled, 1 lane"), (2, "compiled, 2 lanes")):
                assert f"data     {says}" in _status_table({**st, "lanes": lanes}).splitlines()
        finally:
            await g.stop()

    asyncio.run(scenario())


CROSS_CHECK = """
import os, random, sys
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
import overlay._fast as f
rng = random.Random(7)
for size in [0, 1, 15, 16, 17, 63, 64, 65, 255, 256, 1400, 1457, 4096, 60000, 65535]:
    key, nonce, ad = rng.randbytes(32), rng.randbytes(12), rng.randbytes(rng.choice([0, 13, 29]))
    data = rng.randbytes(size)
    sealed = f.aesgcm_seal(key, nonce, ad, data)
    assert sealed == AESGCM(key).encrypt(nonce, data, ad), size
    assert f.aesgcm_open(key, nonce, ad, sealed) == data, size
    packet = f.Keys(key, key[::-1]).seal(0x83, 5, data)
    assert f.Keys(key[::-1], key, impl="openssl").open(packet, 0) == data, size
print(f.GCM)
"""


@pytest.mark.skipif("ipsec-mb" not in IMPLS or "avx2" not in cpu_flags(), reason="no ipsec-mb with AVX2 here")
def test_the_ipsec_mb_code_a_cpu_without_avx512_runs_seals_as_an_independent_implementation() -> None:
    env = {**os.environ, "IPOP_OVERLAY_GCM": "ipsec-mb-avx2"}
    out = subprocess.run(
        [sys.executable, "-c", CROSS_CHECK], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("(AVX2)")
