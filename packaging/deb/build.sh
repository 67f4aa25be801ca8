#!/usr/bin/env bash
# Build the Debian package: `bash packaging/deb/build.sh` -> dist/lazysnap_<version>_<arch>.deb
#
# The daemon goes into its own virtual environment, /opt/lazysnap, built here from the
# project's wheel and its dependencies (pip: PyPI or the local wheel cache). A venv is not
# relocatable, so it is built in a staging directory and its few absolute paths (script
# shebangs, pyvenv.cfg) are rewritten to /opt/lazysnap; bytecode is compiled with the final
# paths. The interpreter is the system's python3, so the package is for the Debian release
# (Python minor version) it was built on: Debian 12 -> python3.11.
#
# Needs: python3 with venv (python3-venv), dpkg-deb; and, to build pyfuse3 if no wheel is
# cached, libfuse3-dev, pkg-config and a C compiler. Does not need root (files are recorded
# as root:root). Environment: OUT_DIR (default <repo>/dist), PYTHON (default /usr/bin/python3),
# SRC_DIR (the Python project to package, default <repo>; packaging files always come from <repo>).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${OUT_DIR:-$repo/dist}
src=${SRC_DIR:-$repo}
python=${PYTHON:-/usr/bin/python3}
prefix=/opt/lazysnap

version=$("$python" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$src/pyproject.toml")
arch=$(dpkg --print-architecture)
pyver=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
deb="$out/lazysnap_${version}_${arch}.deb"

work=$(mktemp -d "${TMPDIR:-/tmp}/lazysnap-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
stage=$work/root
venv=$stage$prefix

step() { printf '== %s\n' "$*" >&2; }

# A copy of the sources, so building the wheel leaves nothing (build/, *.egg-info) in the repo.
step "lazysnap $version for $arch (python$pyver)"
mkdir -p "$work/src"
tar -C "$src" --exclude=__pycache__ --exclude='*.egg-info' -cf - pyproject.toml README.md snapshotter \
  | tar -C "$work/src" -xf -

step "virtual environment $prefix"
"$python" -m venv "$venv"
# pip's own output only when it fails: it is long, and the versions are listed below anyway.
pip() { "$venv/bin/python" -m pip --disable-pip-version-check --no-input "$@"; }
quiet() {
  local log
  if ! log=$("$@" 2>&1); then
    printf '%s\n' "$log" >&2
    return 1
  fi
}
quiet pip wheel --no-deps --wheel-dir "$work/wheel" "$work/src"
quiet pip install --no-compile "$work"/wheel/lazysnap-*.whl
# The package manager's tools are not needed at run time.
quiet pip uninstall -y pip setuptools
step "installed: $("$venv/bin/python" -c '
import importlib.metadata as m
print(", ".join(sorted(f"{d.name} {d.version}" for d in m.distributions())))')"

# Rewrite the staging path out of every text file that names it (scripts' #! lines, pyvenv.cfg,
# activate*); binaries never do.
grep -rlI --null -F "$stage" "$venv/bin" "$venv/pyvenv.cfg" | xargs -0 -r sed -i "s|$stage||g"
if grep -rqI -F "$stage" "$venv/bin" "$venv/pyvenv.cfg"; then
  echo "build.sh: the staging path is still named in $venv" >&2
  exit 1
fi
# Bytecode now, with the installed paths, so the daemon writes none under /opt (dpkg would
# not know those files) and tracebacks name /opt/lazysnap/...
"$venv/bin/python" -m compileall -q -j0 -s "$stage" -p / "$venv/lib" >/dev/null || true

step "files"
install -d "$stage/usr/bin" "$stage/lib/systemd/system" "$stage/etc/lazysnap" \
  "$stage/etc/containerd/conf.d" "$stage/usr/share/doc/lazysnap"
ln -s "$prefix/bin/lazysnap" "$stage/usr/bin/lazysnap"
# The unit names the command where a source install puts it; the package puts it in /usr/bin.
# The daemon and the holder that keeps its FUSE connection across restarts.
for unit in lazysnap.service lazysnap-fuse-holder.service; do
  sed 's|/usr/local/bin/lazysnap|/usr/bin/lazysnap|g' "$repo/packaging/$unit" \
    > "$stage/lib/systemd/system/$unit"
done
install -m 0644 "$repo/packaging/config.toml" "$stage/etc/lazysnap/config.toml"
install -m 0644 "$repo/packaging/containerd/lazysnap.toml" "$stage/etc/containerd/conf.d/lazysnap.toml"
install -m 0644 "$src/README.md" "$stage/usr/share/doc/lazysnap/README.md"
install -m 0644 "$repo/packaging/README.md" "$stage/usr/share/doc/lazysnap/README.packaging.md"
install -m 0644 "$repo/packaging/containerd-config.toml" \
  "$stage/usr/share/doc/lazysnap/containerd-config.toml"
printf 'lazysnap\n\nLicense: Apache-2.0 (see /usr/share/common-licenses/Apache-2.0).\n' \
  > "$stage/usr/share/doc/lazysnap/copyright"

install -d "$stage/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
sed -e "s|@VERSION@|$version|" -e "s|@ARCH@|$arch|" -e "s|@SIZE@|$size|" \
  "$here/control.in" > "$stage/DEBIAN/control"
printf '%s\n' /etc/lazysnap/config.toml /etc/containerd/conf.d/lazysnap.toml \
  > "$stage/DEBIAN/conffiles"
install -m 0755 "$here/postinst" "$here/prerm" "$here/postrm" "$stage/DEBIAN/"

step "package $deb"
mkdir -p "$out"
# xz at a low level: a few seconds instead of a minute, for a package about as small.
dpkg-deb --root-owner-group -Zxz -z1 --build "$stage" "$deb" >/dev/null
echo "$deb"
