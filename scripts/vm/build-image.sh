#!/usr/bin/env bash
# Builds the cgroup v2 test VM from Debian packages only, and caches it:
#   /var/cache/dbguard-vm/<key>/{root.img,vmlinuz,initrd.img}
# <key> is a hash of this script, scripts/vm/guest/ and pyproject.toml's dependencies, so a
# change to any of them builds a new image and an unchanged one is reused. Prints the image directory on stdout (last line).
# The guest: Debian bookworm with its own kernel (6.1, matching headers, so BCC builds
# there), systemd on the unified cgroup hierarchy with systemd-oomd, PostgreSQL 15, MariaDB,
# BCC and the Python packages dbguard and its tests import. The repository is not copied in:
# lab/vm.py shares it over 9p at each boot.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${DBGUARD_VM_CACHE:-/var/cache/dbguard-vm}
mirror=${DBGUARD_VM_MIRROR:-http://deb.debian.org/debian}
size=${DBGUARD_VM_IMAGE_SIZE:-6G}

guest_pkgs=(
  linux-image-amd64 linux-headers-amd64 initramfs-tools
  systemd systemd-sysv systemd-oomd udev dbus
  postgresql-15 postgresql-client-15 postgresql-contrib
  mariadb-server mariadb-client
  bpfcc-tools python3-bpfcc bpftool
  python3 python3-psycopg python3-pymysql python3-tenacity python3-prometheus-client
  python3-pytest python3-hypothesis python3-pip
  procps util-linux kmod iproute2
)

# dbguard's own Python dependencies, as pyproject.toml declares them: where Debian's are too
# old, pip puts newer ones in /usr/local (today Debian's satisfy them all).
# The host's pip downloads them (it has the host's index and certificates; host and guest are
# both bookworm's Python 3.11), the guest's installs them offline.
py=${DBGUARD_VM_PYTHON:-python3}
mapfile -t py_deps < <("$py" -c 'import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))' "$here/../../pyproject.toml")

key=$( { cat "$0"; find "$here/guest" -type f -print0 | sort -z | xargs -0 cat; printf '%s\n' "${py_deps[@]}"; } \
       | sha256sum | cut -c1-16)
out=$cache/$key
if [[ -s $out/root.img && -s $out/vmlinuz && -s $out/initrd.img ]]; then
  echo "$out"
  exit 0
fi

for tool in debootstrap mkfs.ext4 qemu-system-x86_64; do
  command -v "$tool" >/dev/null || { echo "build-image: $tool missing: run scripts/setup-host.sh (make setup)" >&2; exit 1; }
done
[[ $(id -u) == 0 ]] || { echo "build-image: needs root (debootstrap, chroot): run it as root" >&2; exit 1; }

mkdir -p "$cache"
exec 9>"$cache/build.lock"
flock 9                                   # one build at a time; a parallel caller reuses it
if [[ -s $out/root.img ]]; then echo "$out"; exit 0; fi

t0=$SECONDS
work=$(mktemp -d "$cache/build.XXXXXX")
root=$work/root
cleanup() {
  for m in dev/pts dev proc sys; do umount -l "$root/$m" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

echo "build-image: debootstrap bookworm from $mirror" >&2
debootstrap --variant=minbase bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 \
  || { tail -20 "$work/debootstrap.log" >&2; exit 1; }

mount -t proc proc "$root/proc"
mount -t sysfs sys "$root/sys"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"     # no daemons start in the chroot
chmod +x "$root/usr/sbin/policy-rc.d"

echo "build-image: installing ${#guest_pkgs[@]} packages" >&2
chroot "$root" env DEBIAN_FRONTEND=noninteractive sh -c \
  "apt-get update -qq && apt-get install -y -qq --no-install-recommends ${guest_pkgs[*]}" \
  >"$work/apt.log" 2>&1 || { tail -30 "$work/apt.log" >&2; exit 1; }

"$py" -m pip download -q -d "$root/tmp/wheels" "${py_deps[@]}" >>"$work/apt.log" 2>&1 \
  || { tail -30 "$work/apt.log" >&2; exit 1; }
chroot "$root" pip install -q --no-index --find-links /tmp/wheels --break-system-packages \
  --root-user-action=ignore "${py_deps[@]}" >>"$work/apt.log" 2>&1 || { tail -30 "$work/apt.log" >&2; exit 1; }
rm -rf "$root/tmp/wheels"

rm -f "$root/usr/sbin/policy-rc.d"
# Guest configuration: the test runner unit, no password for root on the console, no
# database started at boot (the tests start their own instances).
cp -r "$here/guest/." "$root/"
chroot "$root" sh -c '
  set -e
  systemctl enable dbguard-vm.service
  systemctl disable postgresql.service mariadb.service 2>/dev/null || true
  systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_reap.service systemd-timesyncd.service 2>/dev/null || true
  passwd -d root
  echo dbguard-vm > /etc/hostname
  apt-get clean
' >>"$work/apt.log" 2>&1
for m in dev/pts dev proc sys; do umount -l "$root/$m"; done

kernel=$(ls "$root"/boot/vmlinuz-* | sort -V | tail -n1)
initrd=$(ls "$root"/boot/initrd.img-* | sort -V | tail -n1)
mkdir -p "$work/img"
cp "$kernel" "$work/img/vmlinuz"
cp "$initrd" "$work/img/initrd.img"
echo "build-image: making the root file system ($size, sparse)" >&2
mkfs.ext4 -q -L dbguard-vm -d "$root" "$work/img/root.img" "$size" >&2
echo "kernel $(basename "$kernel") built in $((SECONDS - t0)) s" >"$work/img/build.info"
rm -rf "$out"
mv "$work/img" "$out"
# Images of older build scripts are dead weight (2 GB each): keep only this one.
find "$cache" -mindepth 1 -maxdepth 1 -type d ! -name "$key" ! -name 'build.*' -exec rm -rf {} +
echo "build-image: done in $((SECONDS - t0)) s: $out" >&2
echo "$out"
