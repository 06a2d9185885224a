#!/usr/bin/env bash
# Installs everything dbguard and its test suite need on a Debian/Ubuntu host, as root.
# Idempotent: each step checks first, so `make test` can call it every time.
set -euo pipefail

need_pkgs=(
  python3 python3-venv python3-bpfcc bpftool linux-headers-amd64
  postgresql postgresql-contrib mariadb-server mariadb-client
  earlyoom util-linux procps
  redis-server memcached pgbouncer   # the application caches and pooler the suite starts its own instances of
  python3-matplotlib   # benchmarks/ plots; the venv sees system site-packages
  # what the .deb depends on (tests/integration/test_wheel.py runs the wheel on these alone),
  # and prometheus-client, the oracle the unit tests compare dbguard's own exposition with
  python3-psycopg python3-pymysql python3-tenacity python3-prometheus-client
  # `make deb` and its test: Debian's build tools and lintian
  debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools lintian help2man
  qemu-system-x86 debootstrap e2fsprogs   # the cgroup v2 test VM (scripts/vm/build-image.sh)
)

missing=()
for p in "${need_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup-host: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# BCC compiles against the running kernel's headers. Debian ships none for this kernel,
# but any recent headers work for programs that use only tracepoints and helpers.
kver=$(uname -r)
moddir=/lib/modules/$kver
if [[ ! -e $moddir/build/include && -z "${BCC_KERNEL_SOURCE:-}" ]]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1 || true)
  common=${hdr%-amd64}-common
  if [[ -z $hdr || ! -d $common ]]; then
    echo "setup-host: no kernel headers under /usr/src; install linux-headers-amd64" >&2
    exit 1
  fi
  mkdir -p "$moddir"
  ln -sfn "$hdr" "$moddir/build"
  ln -sfn "$common" "$moddir/source"
  echo "setup-host: linked $moddir/build -> $hdr"
fi

# tracefs is where BCC finds tracepoint formats.
if [[ ! -e /sys/kernel/tracing/events ]] && ! grep -q ' /sys/kernel/tracing ' /proc/mounts; then
  mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || true
fi
