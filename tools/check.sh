#!/usr/bin/env bash
# `make check`: the static checks, no build needed (about a minute on 2 cores).
#   1. ruff check over every .py in the tree (rules in pyproject.toml [tool.ruff]: pyflakes + E9),
#      so code that only a GPU machine runs (tests/test_cuda.py, ...) is still checked here;
#   2. ruff format --check: the Python layout;
#   3. mypy on the package (pyproject.toml [tool.mypy]);
#   4. clang-format --dry-run over csrc/ and tools/*.cpp (.clang-format);
#   5. every C++ source of the CPU build compiled for aarch64, and the portable kernels run there
#      under qemu-aarch64 against an oracle (tools/cross_aarch64.sh).
# All always run; the exit status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BIN=$(dirname "$PY")

status=0
start=$SECONDS
step() {  # step NAME COMMAND...: runs it, says OK or FAILED
    local name=$1
    shift
    if "$@"; then
        echo "check: $name OK"
    else
        echo "check: $name FAILED (findings above)"
        status=1
    fi
}
if ! "$PY" -m ruff --version >/dev/null 2>&1 || ! "$PY" -m mypy --version >/dev/null 2>&1 \
        || [ ! -x "$BIN/clang-format" ]; then
    echo "check: ruff, mypy and clang-format must be installed in $PY's environment (make setup)"
    exit 1
fi
step "ruff check ($("$PY" -m ruff --version))" "$PY" -m ruff check --no-cache --output-format concise .
step "ruff format" "$PY" -m ruff format --no-cache --check .
step "mypy ($("$PY" -m mypy --version | cut -d' ' -f2))" "$PY" -m mypy --no-incremental twolayer_ext
mapfile -t CSRC < <(git ls-files 'csrc/*.cpp' 'csrc/*.h' 'csrc/*.inc' 'csrc/*.cu' 'csrc/*.cuh' 'tools/*.cpp')
step "clang-format ($("$BIN/clang-format" --version | grep -o '[0-9][0-9.]*' | head -1), ${#CSRC[@]} files)" \
    "$BIN/clang-format" --dry-run --Werror "${CSRC[@]}"

PY=$PY bash tools/cross_aarch64.sh || status=1

if [ "$status" -eq 0 ]; then
    echo "check: OK in $((SECONDS - start)) s"
else
    echo "check: FAILED in $((SECONDS - start)) s"
fi
exit "$status"
