#!/usr/bin/env bash
# `make deb`: dist/dbguard_<version>_all.deb from this checkout (the files as they are now,
# committed or not), built by dpkg-buildpackage in a copy under build/deb, then lintian.
# Needs the build tools scripts/setup-host.sh installs (debhelper, dh-python,
# pybuild-plugin-pyproject, help2man, lintian).
set -euo pipefail
# Debian's own python3 and tools, whatever else is first on PATH (pyenv, a venv)
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
cd "$(dirname "$0")/.."

version=$(dpkg-parsechangelog -S Version)
upstream=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
if [[ $version != "$upstream" ]]; then
  echo "build-deb: debian/changelog says $version, pyproject.toml says $upstream: add a debian/changelog entry (dch -v $upstream)" >&2
  exit 2
fi

work=build/deb
src=$work/dbguard-$version
rm -rf "$work"
mkdir -p "$src/integrations" dist
cp -a pyproject.toml README.md LICENSE CHANGELOG.md config.example.toml dbguard debian docs "$src/"
cp -a integrations/systemd "$src/integrations/"
find "$src" -name __pycache__ -prune -exec rm -rf {} +

(cd "$src" && dpkg-buildpackage -us -uc -b) > "$work/build.log" 2>&1 || {
  tail -n 40 "$work/build.log" >&2
  echo "build-deb: dpkg-buildpackage failed; the whole log is $work/build.log" >&2
  exit 1
}
deb=dbguard_${version}_all.deb
mv "$work/$deb" dist/
echo "build-deb: dist/$deb"
# lintian: no error or warning; the overrides are in debian/dbguard.lintian-overrides, each explained
lintian --fail-on error,warning "dist/$deb"
