#!/usr/bin/env bash
# make sanitize: build twolayer_ext with AddressSanitizer + UndefinedBehaviorSanitizer on a COPY
# of the source tree (the in-tree _C*.so and _build_info.py are never touched), then run the test
# suite against that copy with the sanitizer runtimes preloaded. Fails on any sanitizer report.
#
#   bash tools/sanitize.sh                 # whole suite
#   bash tools/sanitize.sh tests/test_x.py # a subset (pytest arguments)
#   KEEP=1 bash tools/sanitize.sh          # keep the temp dir (build log, reports) afterwards
#   SANITIZE_ASAN_OPTIONS=detect_leaks=0 bash tools/sanitize.sh   # try another ASan option set
#
# Needs gcc's libasan/libubsan (gcc -print-file-name=libasan.so) and the project's .venv.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
CXX_BIN="${CXX:-g++}"
START=$(date +%s)

LIBASAN="$("$CXX_BIN" -print-file-name=libasan.so)"
LIBUBSAN="$("$CXX_BIN" -print-file-name=libubsan.so)"
for lib in "$LIBASAN" "$LIBUBSAN"; do
  [[ -f "$lib" ]] || { echo "sanitize: $lib not found (install gcc's libasan/libubsan)"; exit 2; }
done
LIBASAN="$(readlink -f "$LIBASAN")"
LIBUBSAN="$(readlink -f "$LIBUBSAN")"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/twolayer-sanitize.XXXXXX")"
cleanup() { if [[ -z "${KEEP:-}" ]]; then rm -rf "$WORK"; else echo "sanitize: kept $WORK"; fi; }
trap cleanup EXIT
SRC="$WORK/src"
LOGDIR="$WORK/reports"
mkdir -p "$SRC" "$LOGDIR"

# 1. Copy the tree: no venv, no build outputs, no compiled extension, no git metadata.
tar -C "$ROOT" --exclude='./.venv*' --exclude='./build' --exclude='./.git' --exclude='*.so' \
    --exclude='*.egg-info' --exclude='__pycache__' --exclude='./.hypothesis' \
    --exclude='./twolayer_ext/_build_info.py' -cf - . | tar -C "$SRC" -xf -

# 2. Sanitizer flags. -O1 -g: readable reports; -fno-sanitize-recover: UBSan aborts on its first
#    report instead of printing and going on. setup.py puts TWOLAYER_EXTRA_CFLAGS after its own
#    flags (-O3 -g0), so they win.
SAN_CFLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all -O1 -g"
SAN_LDFLAGS="-fsanitize=address,undefined"
export TWOLAYER_EXTRA_CFLAGS="$SAN_CFLAGS" TWOLAYER_EXTRA_LDFLAGS="$SAN_LDFLAGS"

# 3. Build in place in the copy (never `pip install`: that would repoint the venv's package).
echo "sanitize: building the ASan/UBSan extension in $SRC"
if ! (cd "$SRC" && TWOLAYER_CUDA="${TWOLAYER_CUDA:-0}" MAX_JOBS="${MAX_JOBS:-2}" \
      "$PY" setup.py -q build_ext --inplace > "$WORK/build.log" 2>&1); then
  tail -40 "$WORK/build.log"; echo "sanitize: build failed"; exit 1
fi
SO="$(ls "$SRC"/twolayer_ext/_C*.so)"
# The build must really be instrumented, or a clean run means nothing.
SYMS="$(nm -D --undefined-only "$SO")"   # (not piped into grep -q: SIGPIPE + pipefail)
grep -q '__asan_report' <<< "$SYMS" || { echo "sanitize: $SO is not ASan-instrumented"; exit 1; }
grep -q '__ubsan_handle' <<< "$SYMS" || { echo "sanitize: $SO is not UBSan-instrumented"; exit 1; }
BUILT=$(date +%s)
echo "sanitize: built in $((BUILT - START)) s"

# 4. Canaries: a use-after-free (ASan's) and a signed overflow (UBSan's) in a tiny instrumented
#    library, loaded the way the extension is. Each must abort the process with a report, or the
#    options below could not fail a run and a clean result would mean nothing. (UBSan ignores
#    log_path in this setup and reports on stderr; -fno-sanitize-recover makes it abort, which
#    fails the test or the suite.)
cat > "$WORK/canary.cpp" <<'CPPEOF'
#include <climits>
#include <cstdlib>
extern "C" int use_after_free(int i) { int* p = (int*)std::malloc(4 * sizeof(int)); p[0] = 1; std::free(p); return p[i]; }
extern "C" int signed_overflow(int i) { int x = INT_MAX; return x + i; }
CPPEOF
"$CXX_BIN" -shared -fPIC $SAN_CFLAGS "$WORK/canary.cpp" -o "$WORK/canary.so"
canary() {  # $1: function, $2: text its report must contain
  mkdir -p "$WORK/canary-$1"
  if (LD_PRELOAD="$LIBASAN:$LIBUBSAN" \
      ASAN_OPTIONS="$ASAN_RUN_OPTIONS:log_path=$WORK/canary-$1/asan" \
      UBSAN_OPTIONS="$UBSAN_RUN_OPTIONS:log_path=$WORK/canary-$1/ubsan" \
      "$PY" -c "import ctypes, sys; ctypes.CDLL(sys.argv[1]).$1(1)" "$WORK/canary.so") \
     > "$WORK/canary-$1.out" 2>&1; then
    echo "sanitize: the $1 canary was NOT caught: the sanitizer setup is broken"; exit 1
  fi
  grep -qs "$2" "$WORK/canary-$1.out" "$WORK/canary-$1"/* \
    || { echo "sanitize: the $1 canary died without a '$2' report"; exit 1; }
}

# 5. Run the suite against the copy with the runtimes preloaded (python and torch are not
#    instrumented, so ASan must come first in the process). Options, each needed:
#    detect_leaks=0             CPython and torch keep allocations until exit by design (the
#                               only option needed for a clean run; alloc_dealloc_mismatch=0 and
#                               verify_asan_link_order=0 turned out unnecessary: LD_PRELOAD puts
#                               libasan first, and no new/free mismatch shows up)
#    halt_on_error/abort_on_error: the first report kills the process, so pytest fails
#    log_path: reports also land in files, checked below (a report in a subprocess counts too)
#    (SANITIZE_ASAN_OPTIONS replaces the set, to check which ones are needed.)
ASAN_RUN_OPTIONS="${SANITIZE_ASAN_OPTIONS:-detect_leaks=0:halt_on_error=1:abort_on_error=1}"
UBSAN_RUN_OPTIONS="halt_on_error=1:print_stacktrace=1"
canary use_after_free "AddressSanitizer: heap-use-after-free"
canary signed_overflow "runtime error: signed integer overflow"
echo "sanitize: both canaries caught (ASan: use-after-free, UBSan: signed overflow)"
export LD_PRELOAD="$LIBASAN:$LIBUBSAN${LD_PRELOAD:+:$LD_PRELOAD}"
export ASAN_OPTIONS="$ASAN_RUN_OPTIONS:log_path=$LOGDIR/asan"
export UBSAN_OPTIONS="$UBSAN_RUN_OPTIONS:log_path=$LOGDIR/ubsan"
export TWOLAYER_SANITIZE=1   # tests scale down their 100k-call loops under the sanitizers
export PYTHONDONTWRITEBYTECODE=1
cd "$SRC"
"$PY" -c "import twolayer_ext, sys; f = twolayer_ext.__file__; sys.exit(0 if f.startswith('$SRC') else 'sanitize: imported ' + f + ', not the copy')"
set +e
"$PY" -m pytest -q -p no:cacheprovider "${@:-tests}"
RC=$?
set -e
END=$(date +%s)
REPORTS=$(ls "$LOGDIR" 2>/dev/null | wc -l)
if [[ "$REPORTS" -ne 0 ]]; then
  for f in "$LOGDIR"/*; do echo "==== $f"; head -60 "$f"; done
  echo "sanitize: FAILED: $REPORTS sanitizer report(s) (build $((BUILT - START)) s, tests $((END - BUILT)) s)"
  exit 1
fi
if [[ "$RC" -ne 0 ]]; then
  echo "sanitize: FAILED: the test suite failed under the sanitizers (rc $RC; build $((BUILT - START)) s, tests $((END - BUILT)) s)"
  exit "$RC"
fi
echo "sanitize: OK, no sanitizer reports (build $((BUILT - START)) s, tests $((END - BUILT)) s, total $((END - START)) s)"
