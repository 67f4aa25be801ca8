#!/usr/bin/env bash
# lazysnap quickstart: on a fresh Debian 12 machine, as root, install what is missing, then start
# a scratch registry, containerd and lazysnap on loopback in a temporary directory, build and
# push a small image, run a container through lazysnap, show a lazy start of an eStargz image
# (time and bytes fetched against the image's size), and clean up.
# Nothing outside the temporary directory is touched; your system containerd keeps running.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ $(id -u) -ne 0 ]]; then
  echo "the demo mounts overlay filesystems and runs containers: run it as root (sudo)" >&2
  exit 1
fi
bash .ci/install
# The demo drives the same harness as the end-to-end tests (tests/e2e), which always tears
# down every process and mount it started, even on Ctrl-C.
PYTHONPATH=. exec .venv/bin/python examples/quickstart.py "$@"
