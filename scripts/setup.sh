#!/usr/bin/env bash
# Installs everything ipop-overlay needs on a fresh Debian machine (as root) and the project itself into
# .venv. Idempotent: a second run only checks. Starts no service: Prosody, ejabberd and coturn are only ever
# started by the tests and the demo, with explicit options, inside network namespaces they create.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "setup: run as root (network namespaces, TAP devices and apt-get need it)" >&2
  exit 1
fi

# ejabberd pulls in erlang-base, which ships epmd (the tests start their own, inside a namespace).
# gcc, python3-dev and libssl-dev build the compiled data path (overlay/_fast.c) against OpenSSL's libcrypto;
# on amd64, libipsec-mb-dev adds Intel's ipsec-mb, whose AES-GCM takes over where it runs its AVX2 or AVX-512 code (overlay/_gcm.h).
# ethtool turns a lab veth's UDP segmentation off, as on a NIC without it (tests/test_mtu_netns.py,
# bench/iperf_tap.py --software-gso).
DEBS=(prosody ejabberd erlang-base coturn iperf3 iputils-ping iptables iproute2 conntrack openssl procps python3 python3-venv python3-pip
      gcc python3-dev libssl-dev ethtool)
if [ "$(dpkg --print-architecture)" = amd64 ]; then DEBS+=(libipsec-mb-dev); fi
missing=()
for p in "${DEBS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  # Debian's prosody, ejabberd and coturn packages start system-wide servers listening on every address of the root
  # namespace unless service starts are refused while they install: refuse them (a policy-rc.d that exits
  # 101, see invoke-rc.d(8)), whatever policy was there before, and put the old policy back afterwards.
  policy=/usr/sbin/policy-rc.d
  saved_policy=""
  if [ -e "$policy" ]; then
    saved_policy=$(mktemp)
    cp -p "$policy" "$saved_policy"
  fi
  restore_policy() {
    if [ -n "$saved_policy" ]; then mv -f "$saved_policy" "$policy"; else rm -f "$policy"; fi
  }
  trap restore_policy EXIT
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod +x "$policy"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q "${missing[@]}"
  restore_policy
  trap - EXIT
fi
# Never leave a packaged system service enabled or running: our Prosody, ejabberd and coturn always run with
# explicit options inside test namespaces. (Stopping goes through the service manager, never by process name.)
# epmd.socket/epmd.service come with erlang-base: socket activation would start a system epmd on port 4369.
for service in prosody ejabberd epmd.socket epmd coturn; do
  if command -v systemctl >/dev/null 2>&1; then
    if systemctl is-enabled "$service" >/dev/null 2>&1; then
      systemctl disable "$service" >/dev/null 2>&1 || true
    fi
    if [ -d /run/systemd/system ] && systemctl is-active "$service" >/dev/null 2>&1; then
      echo "setup: stopping the system $service service"
      systemctl stop "$service" || true
    fi
  fi
done

# Python: the interpreter on PATH if it is 3.11 or newer, in a virtual environment of our own.
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "setup: $PY is older than 3.11; set PYTHON=/path/to/python3.11" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c 'import overlay._fast, slixmpp, aioice, nacl, cryptography, networkx, prometheus_client, hypothesis, xdist' \
     >/dev/null 2>&1 || [ pyproject.toml -nt .venv/.installed ] || [ setup.py -nt .venv/.installed ] \
     || [ -n "$(find overlay -maxdepth 1 -name '_*.[ch]' -newer .venv/.installed)" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test,plot]'
  touch .venv/.installed
fi
# Byte-code for our own packages, as pip writes it for an installed package: without it every node compiles
# them again at start, and the compiler's leftovers stay in its heap (~1.3 MB resident per node, measured).
.venv/bin/python -m compileall -q -j 0 overlay xmpp_bootstrap >/dev/null
echo "setup: ready ($(.venv/bin/python --version), $(.venv/bin/ipop-overlay --help >/dev/null && echo ipop-overlay ok))"
