#!/usr/bin/env bash
# `make check`: the static checks, no build needed (well under a minute on 2 cores).
#   1. ruff over every .py in the tree (rules in pyproject.toml [tool.ruff]: pyflakes + E9), so
#      code that only a GPU machine runs (tests/test_cuda.py, ...) is still checked here;
#   2. every C++ source of the CPU build compiled for aarch64 (tools/cross_aarch64.sh).
# Both always run; the exit status is non-zero if either failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

status=0
start=$SECONDS
if "$PY" -m ruff --version >/dev/null 2>&1; then
    if "$PY" -m ruff check --no-cache --output-format concise .; then
        echo "check: ruff OK ($("$PY" -m ruff --version))"
    else
        echo "check: ruff FAILED (findings above)"
        status=1
    fi
else
    echo "check: ruff is not installed in $PY's environment (make setup installs it)"
    status=1
fi

PY=$PY bash tools/cross_aarch64.sh || status=1

if [ "$status" -eq 0 ]; then
    echo "check: OK in $((SECONDS - start)) s"
else
    echo "check: FAILED in $((SECONDS - start)) s"
fi
exit "$status"
