#!/usr/bin/env bash
# Installs the tools the integration tests use: ansible-core + ansible-lint and
# kubernetes-validate (PyPI, into .venv), promtool (from Debian's `prometheus` package) and
# systemd-analyze (Debian's `systemd`). Idempotent: each step checks first, so `make setup`
# can call it every time. Run as root from the repository root (or give VENV=...).
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=$VENV/bin/python
if [[ ! -x $PY ]]; then
  echo "setup-integrations: $PY missing; run 'make venv' first" >&2
  exit 1
fi

# pip picks the newest releases that support this Python (Debian 12: 3.11).
pip_pkgs=("ansible-core>=2.16" "ansible-lint>=24.2" "kubernetes-validate>=1.30")
need_pip=0
for tool in ansible-playbook ansible-lint kubernetes-validate; do
  [[ -x $VENV/bin/$tool ]] || need_pip=1
done
if ((need_pip)); then
  echo "setup-integrations: pip installing ${pip_pkgs[*]} into $VENV"
  "$PY" -m pip install -q "${pip_pkgs[@]}"
fi

# promtool: the Debian package `prometheus` carries the server, a web UI and an init script
# that its postinst would start. Only the promtool binary is needed, so take it out of the
# .deb instead of installing the package (no service started, ~25 MB instead of ~96 MB).
if [[ ! -x $VENV/bin/promtool ]]; then
  echo "setup-integrations: extracting promtool from Debian's prometheus package"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && apt-get download -qq prometheus >/dev/null 2>&1) || {
    apt-get update -qq && (cd "$tmp" && apt-get download -qq prometheus >/dev/null)
  }
  dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x"
  install -m 0755 "$tmp/x/usr/bin/promtool" "$VENV/bin/promtool"
fi

if ! command -v systemd-analyze >/dev/null; then
  echo "setup-integrations: installing Debian package systemd (for systemd-analyze)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends systemd >/dev/null
fi
