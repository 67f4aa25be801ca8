#!/usr/bin/env bash
# The project's one test command (README and CI both run exactly this): installs what is
# missing, then runs every test. Extra arguments go to pytest, e.g. `bash tests/run.sh -m e2e`.
# Run it as root: the root/fuse/e2e tests are skipped otherwise, and in CI (CI=true) a skip fails.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash .ci/install

status=0
.venv/bin/python -m pytest -q -ra "$@" || status=$?
if [[ $status -eq 5 ]]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$status"
