#!/usr/bin/env bash
# Installs everything ipop-overlay needs on a fresh Debian machine (as root) and the project itself into
# .venv. Idempotent: a second run only checks. Starts no service: Prosody is only ever started by the tests
# and the demo, with a generated config, inside network namespaces they create.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "setup: run as root (network namespaces, TAP devices and apt-get need it)" >&2
  exit 1
fi

DEBS=(prosody iperf3 iputils-ping iptables iproute2 openssl procps python3 python3-venv python3-pip)
missing=()
for p in "${DEBS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  # Debian's prosody package starts a system-wide server listening on every address of the root namespace
  # unless service starts are refused while it installs: refuse them (policy-rc.d exit 101), then restore.
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    made_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q "${missing[@]}"
  if [ "$made_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
fi
# Never leave the packaged system service enabled: our Prosody always runs with an explicit config.
if command -v systemctl >/dev/null 2>&1 && systemctl is-enabled prosody >/dev/null 2>&1; then
  systemctl disable prosody >/dev/null 2>&1 || true
fi

# Python: the interpreter on PATH if it is 3.11 or newer, in a virtual environment of our own.
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "setup: $PY is older than 3.11; set PYTHON=/path/to/python3.11" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c 'import overlay, slixmpp, aioice, nacl, pyroute2, cryptography, networkx, hypothesis' \
     >/dev/null 2>&1 || [ pyproject.toml -nt .venv/.installed ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test,plot]'
  touch .venv/.installed
fi
echo "setup: ready ($(.venv/bin/python --version), $(.venv/bin/ipop-overlay --help >/dev/null && echo ipop-overlay ok))"
