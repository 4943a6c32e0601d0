#!/usr/bin/env bash
# Install everything the test suite needs on a fresh machine, then run the whole suite.
# README's test command and .ci/run are this script. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e ".[dev]"
if ! command -v aarch64-linux-gnu-gcc >/dev/null 2>&1; then
    scripts/install_cross.sh >/dev/null      # cross compiler for the arm64 TVM build test
fi
set +e
python3 -m pytest -q -rfEs "$@"      # -r: failures, errors and skips (with reasons) in the summary
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "scripts/test.sh: pytest collected no tests; that is a failure" >&2
    exit 1
fi
exit "$rc"
