#!/usr/bin/env bash
# tools/gpu_check.sh [--dry-run] OUTDIR: everything a GPU machine should check, planned to end
# within 9 minutes (build included) on an H200, so it fits a 10-minute first run.
#
# The plan (each step's time limit) is printed first; then, in this order:
#   preflight  torch sees a CUDA device and runs a kernel on it, the `ninja` binary is found,
#              setuptools is >= 77, numpy and pytest import; if not, the run stops here with
#              the reason as its last line and in summary.json;
#   build      the extension, in place, with this machine's python, torch and nvcc (sm_90 unless
#              TORCH_CUDA_ARCH_LIST says otherwise), the CUDA build forced; available_devices()
#              must then have "cuda";
#   core       the core correctness tests: the [cuda] cases of test_oracle_agreement, test_sgd_step,
#              test_shapes, test_special_values, test_strides, test_fused_loss, and test_cuda.py
#              but for its torch.compile tests;
#   hostile    the hostile-input table (its CUDA rows run only here) and test_hostile's [cuda] cases;
#   rest       the [cuda] cases of every other test file but test_opcheck and test_compile;
#   opcheck    test_opcheck.py's [cuda] cases (torch.library.opcheck: the slow ones);
#   compile    torch.compile on CUDA: mode="reduce-overhead" (CUDA graphs), cold inductor compiles;
#   bench      the benchmark on CUDA, cut to fit: float32 and bfloat16, every CUDA backend of
#              twolayer_ext.tools.recipes but the compiled ones (`compile`, `compile_module`), a
#              few short rounds;
#   bench_compile  `compile` against `module` at the seed size only, if time is left.
# Each test group is its own pytest run with TWOLAYER_REQUIRE_CUDA=1 (a session without CUDA
# fails instead of skipping) and its own time limit: it is stopped with SIGINT, so pytest still
# writes its junit file, and a group that times out leaves the others' results alone. The tests
# fail if no CUDA case ran.
#
# OUTDIR gets at most 8 files (what a GPU machine hands back): gpu_check.log (the console),
# summary.json (every step's status, seconds, limit and detail, the failed tests, the CUDA cases
# run; rewritten after each step), logs.tar.gz (env.txt, build.log, each step's log and junit
# file; rewritten after each step), bench.json and bench_compile.json.
#
# --dry-run (or GPU_CHECK_DRY_RUN=1) runs every step that needs no GPU, then stops: the plan,
# the tool checks of the preflight, an import of the extension as built (no rebuild), each test
# group's selection (pytest --collect-only; a group that selects nothing fails), the benchmark's
# backends resolved from twolayer_ext.tools.recipes and its command lines checked by its own argument
# parser, summary.json, logs.tar.gz and the output-file budget. `make cuda-check` runs it.
#
# Overridable: PYTHON (python3), CUDA_HOME, TORCH_CUDA_ARCH_LIST (9.0), MAX_JOBS (nproc).
set -uo pipefail

DRY="${GPU_CHECK_DRY_RUN:-0}"
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
if [ $# -ne 1 ]; then
  echo "usage: $0 [--dry-run] OUTDIR" >&2
  exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
OUT_FILES=(gpu_check.log summary.json logs.tar.gz bench.json bench_compile.json)
MAX_OUT_FILES=8
rm -f "${OUT_FILES[@]/#/$OUT/}"  # no stale results
LOGS="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-logs.XXXXXX")"  # archived into logs.tar.gz
trap 'rm -rf "$LOGS"' EXIT
PY="${PYTHON:-python3}"
export TWOLAYER_CUDA=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if [ -z "${CUDA_HOME:-}" ]; then
  if command -v nvcc >/dev/null; then CUDA_HOME="$(dirname "$(dirname "$(command -v nvcc)")")"
  else CUDA_HOME=/usr/local/cuda; fi
fi
export CUDA_HOME
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"

# ---- the plan ----------------------------------------------------------------------------------
# Every step has its own time limit (seconds); together they end within DEADLINE, 9 minutes, so
# the run fits 10 minutes with a margin for the machine. A step also never runs past DEADLINE
# less END_MARGIN (the summary and the archive after it). The benchmark takes what the tests
# leave, above its own limit, but keeps COMPILE_MIN for bench_compile, which runs only when that
# much is left (inductor compiles take ~30 s).
DEADLINE=540 END_MARGIN=10 COMPILE_MIN=45 KILL_AFTER=5
STEPS=(preflight build core hostile rest opcheck compile bench bench_compile)
# The limits, from timings on a loaded 2-core machine without a GPU (make cuda-check): the
# slowest object compiles in ~50 s (two_layer_cuda.cu, tuned_avx512.cpp), so a 16-job build
# takes about a minute; opcheck's [cpu] twins take ~35 s; the hostile table ~3 s plus its CUDA
# rows; compile pays three cold inductor compiles.
declare -A LIMIT=([preflight]=30 [build]=150 [core]=75 [hostile]=30 [rest]=60 [opcheck]=60
                  [compile]=75 [bench]=45 [bench_compile]=0)
TEST_GROUPS=(core hostile rest opcheck compile)
declare -A FILES KEYWORDS
FILES[core]="tests/test_oracle_agreement.py tests/test_sgd_step.py tests/test_shapes.py
  tests/test_special_values.py tests/test_strides.py tests/test_fused_loss.py tests/test_cuda.py"
KEYWORDS[core]="cuda and not reduce_overhead"
FILES[hostile]="tests/test_hostile.py"
KEYWORDS[hostile]="cuda or hostile_inputs"
FILES[opcheck]="tests/test_opcheck.py"
KEYWORDS[opcheck]="cuda"
FILES[compile]="tests/test_cuda.py tests/test_compile.py"
KEYWORDS[compile]="reduce_overhead or (cuda and compile)"
# rest: every other test file. Not test_gpu_readiness.py (it runs this script's dry run; no
# CUDA case) nor test_properties.py (CPU only; it needs hypothesis to import).
FILES[rest]=""
for f in tests/test_*.py; do
  case " ${FILES[core]} ${FILES[hostile]} ${FILES[opcheck]} ${FILES[compile]} " in
    *[[:space:]]"$f"[[:space:]]*) continue ;;
  esac
  case "$f" in tests/test_gpu_readiness.py|tests/test_properties.py) continue ;; esac
  FILES[rest]+="${FILES[rest]:+ }$f"
done
KEYWORDS[rest]="cuda"
# The benchmark: the CUDA backends (resolved at run time from twolayer_ext.tools.recipes) but the
# compiled ones (compile, compile_module).
BENCH_ARGS=(--device cuda --size seed --size gpu_narrow --size gpu_large --dtype float32
            --dtype bfloat16 --rounds 3 --warmup 0.25 --min-time 0.05)
BENCH_COMPILE_ARGS=(--device cuda --size seed --dtype float32 --rounds 3 --warmup 0.25
                    --min-time 0.05 --backend module --backend compile)
# pytest_args GROUP: the group's pytest arguments, into the array PYTEST_ARGS.
pytest_args() {
  local files
  read -r -a files <<<"$(echo ${FILES[$1]})"
  PYTEST_ARGS=(-m pytest -q -p no:cacheprovider -rfEs --durations=5 -k "${KEYWORDS[$1]}" "${files[@]}")
}

declare -A STATUS SECS DETAIL
for s in "${STEPS[@]}"; do STATUS[$s]="not run" SECS[$s]=0 DETAIL[$s]=""; done
REASON=""       # why the run failed, for summary.json
FINISHED=0      # 1 once every step has run (summary.json says so)
CUDA_CASES=0    # CUDA test cases that ran (not skipped), over every group
BENCH_BACKENDS=""
START=$SECONDS
left() { echo $((DEADLINE - END_MARGIN - (SECONDS - START))); }
fail() { [ -n "$REASON" ] || REASON="$1"; }

print_plan() {
  local total=0 s
  echo "=== gpu_check plan$([ "$DRY" = 1 ] && echo " (DRY RUN: every step that needs no GPU, then stop)"):"
  echo "    steps in order, each with its time limit; all end within ${DEADLINE}s (9 min), build included"
  for s in "${STEPS[@]}"; do
    case $s in
      bench_compile) printf '    %-14s %5s  %s\n' "$s" "rest" \
                       "only if >= ${COMPILE_MIN}s are left: bench ${BENCH_COMPILE_ARGS[*]}" ;;
      bench) printf '    %-14s %4ss+ %s\n' "$s" "${LIMIT[$s]}" \
               "the time the tests leave, less ${COMPILE_MIN}s: bench ${BENCH_ARGS[*]} (--backend: every CUDA one but compile)" ;;
      preflight) printf '    %-14s %4ss  %s\n' "$s" "${LIMIT[$s]}" "a CUDA device runs a kernel; ninja; setuptools >= 77" ;;
      build) printf '    %-14s %4ss  %s\n' "$s" "${LIMIT[$s]}" \
               "setup.py build_ext --inplace (TWOLAYER_CUDA=1, arch $TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)" ;;
      *) printf '    %-14s %4ss  pytest -k "%s" %s\n' "$s" "${LIMIT[$s]}" "${KEYWORDS[$s]}" \
           "$(echo ${FILES[$s]} | sed 's#tests/##g')" ;;
    esac
    total=$((total + LIMIT[$s]))
  done
  echo "    sum of the limits: ${total}s of ${DEADLINE}s (${END_MARGIN}s kept for the summary)"
  echo "    output: ${OUT_FILES[*]} (at most $MAX_OUT_FILES files in $OUT)"
  if [ $total -gt $((DEADLINE - END_MARGIN)) ]; then
    echo "gpu_check: the plan's limits add up to ${total}s, over $((DEADLINE - END_MARGIN))s" >&2
    return 1
  fi
}

quoted() { printf '%q ' "$@" | sed 's/ $//'; }  # a command line as the shell would take it

# run_step NAME LIMIT LOGFILE COMMAND...: runs it with a time limit (SIGINT, then SIGKILL
# KILL_AFTER s later), its output into LOGFILE (and the last lines to the console); records
# status (ok / FAILED rc=N / TIMEOUT) and seconds.
run_step() {
  local name=$1 limit=$2 log=$3 t0=$SECONDS rc
  shift 3
  echo "=== $name (limit ${limit}s): $(quoted "$@")"
  timeout -s INT --kill-after=$KILL_AFTER "$limit" "$@" > "$log" 2>&1
  rc=$?
  SECS[$name]=$((SECONDS - t0))
  tail -15 "$log"
  if [ $rc -eq 0 ]; then STATUS[$name]=ok
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then STATUS[$name]="TIMEOUT"
  else STATUS[$name]="FAILED rc=$rc"; fi
  echo "=== $name: ${STATUS[$name]} in ${SECS[$name]}s"
  return $rc
}

# step_limit NAME: the step's limit, cut to the time left before the deadline (0: no time left).
step_limit() {
  local l=${LIMIT[$1]} t
  t=$(left)
  [ "$t" -ge "$l" ] || l=$t
  [ "$l" -ge 5 ] || l=0
  echo "$l"
}

# summary.json (and logs.tar.gz): every step's status, seconds, limit and detail, the failed
# tests and the CUDA cases run (from the junit files), why it failed. Rewritten after each step,
# so a run stopped from outside still leaves the steps done so far.
write_summary() {
  local args=() s
  for s in "${STEPS[@]}"; do args+=("$s" "${STATUS[$s]}" "${SECS[$s]}" "${LIMIT[$s]}" "${DETAIL[$s]}"); done
  "$PY" - "$OUT/summary.json" "$LOGS" "$MAX_OUT_FILES" "$DRY" "$FINISHED" "$((SECONDS - START))" "$DEADLINE" \
    "$REASON" "$CUDA_CASES" "$BENCH_BACKENDS" "${args[@]}" <<'EOF'
import glob, json, os, sys
import xml.etree.ElementTree as ET
path, logs, max_files, dry, finished, total, deadline, reason, cuda_cases, backends, *rest = sys.argv[1:]
steps = {rest[i]: {"status": rest[i + 1], "seconds": int(rest[i + 2]), "limit": int(rest[i + 3]),
                   "detail": rest[i + 4]} for i in range(0, len(rest), 5)}
finished = finished == "1"
ok = finished and not reason and all(s["status"] == "ok" for s in steps.values())
if not ok and not reason:
    reason = "a step failed: see steps" if finished else "unfinished: stopped before its end"
failures = []
for junit in sorted(glob.glob(os.path.join(logs, "junit_*.xml"))):
    try:
        cases = list(ET.parse(junit).getroot().iter("testcase"))
    except (OSError, ET.ParseError):
        continue
    for c in cases:
        bad = c.find("failure")
        bad = c.find("error") if bad is None else bad
        if bad is not None:
            msg = (bad.get("message") or "").strip().splitlines()
            failures.append(f'{c.get("classname")}::{c.get("name")}: {msg[0][:200] if msg else ""}')
summary = {"ok": ok, "dry_run": dry == "1", "finished": finished, "reason": None if ok else reason,
           "total_seconds": int(total), "planned_seconds": int(deadline),
           "cuda_cases_run": int(cuda_cases), "bench_backends": backends.split(),
           "steps": steps, "failed_tests": failures[:50], "failed_tests_total": len(failures),
           "max_output_files": int(max_files),
           "output_files": sorted({"summary.json"} | {
               os.path.relpath(os.path.join(d, f), os.path.dirname(path))
               for d, _, fs in os.walk(os.path.dirname(path)) for f in fs if not f.endswith(".tmp")})}
with open(path + ".tmp", "w") as f:
    json.dump(summary, f, indent=2)
os.replace(path + ".tmp", path)
EOF
  tar -C "$LOGS" -czf "$OUT/logs.tar.gz.tmp" . && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"
}

# check_out_budget: the files in OUTDIR (a GPU machine hands back at most MAX_OUT_FILES).
check_out_budget() {
  local n
  n=$(find "$OUT" -type f | wc -l)
  echo "output folder: $n files (at most $MAX_OUT_FILES): $(cd "$OUT" && find . -type f | sed 's#^\./##' | sort | tr '\n' ' ')"
  if [ "$n" -gt "$MAX_OUT_FILES" ]; then
    fail "the output folder has $n files, over the $MAX_OUT_FILES a GPU machine hands back"
    return 1
  fi
}

# ---- 0. preflight, before anything slow ----------------------------------------------------------
PREFLIGHT_PY='
import sys
try:
    import torch
except Exception as e:
    sys.exit(f"cannot import torch: {e}")
if not torch.version.cuda:
    sys.exit(f"torch {torch.__version__} is a CPU-only build")
if not torch.cuda.is_available():
    try:
        torch.cuda.init()  # raises with the driver'"'"'s own reason
        why = "torch.cuda.is_available() is False"
    except Exception as e:
        why = str(e).strip().splitlines()[0]
    sys.exit(f"{why} (torch {torch.__version__}, CUDA {torch.version.cuda})")
name = torch.cuda.get_device_name(0)
try:  # e.g. a driver too old for this torch, or no kernel image for this GPU
    ok = torch.ones(4, device="cuda").add_(1).sum().item() == 8.0
except Exception as e:
    sys.exit(f"a kernel on {name} failed: {str(e).strip().splitlines()[0]}")
if not ok:
    sys.exit(f"a kernel on {name} gave a wrong result")
print(f"{name} (torch {torch.__version__}, CUDA {torch.version.cuda})")
'
# The build tools: torch runs the `ninja` binary (pip's ninja puts it next to the venv's python,
# which need not be on PATH); without it torch compiles serially, far past the build's limit.
# pyproject.toml's SPDX license string needs setuptools >= 77; the tests need numpy and pytest.
tools_check() {
  local py_dir
  py_dir="$(dirname "$(command -v "$PY" || echo "$PY")")"
  if ! command -v ninja >/dev/null && [ -x "$py_dir/ninja" ]; then export PATH="$py_dir:$PATH"; fi
  if ! command -v ninja >/dev/null; then
    echo "no ninja binary on PATH or next to $PY (pip install ninja)"
    return 1
  fi
  "$PY" -c '
import sys
try:
    import numpy, pytest, setuptools
except ImportError as e:
    sys.exit(f"{e.name} is not installed (pip install numpy pytest \"setuptools>=77\")")
v = setuptools.__version__
if int(v.split(".")[0]) < 77:
    sys.exit(f"setuptools {v} is older than 77, which pyproject.toml needs (pip install \"setuptools>=77\")")
print(f"setuptools {v}, numpy {numpy.__version__}, pytest {pytest.__version__}")' 2>&1 || return 1
  echo "ninja $(ninja --version) ($(command -v ninja))"
}

preflight() {
  local t0=$SECONDS why tools rc=0
  if tools="$(tools_check)"; then tools="$(paste -sd ';' <<<"$tools" | sed 's/;/; /g')"
  else why="$(tail -1 <<<"$tools")" rc=1; fi
  if [ $rc -eq 0 ] && [ "$DRY" = 1 ]; then
    why="dry run: no device check; $tools"
  elif [ $rc -eq 0 ]; then
    why="$(timeout -s INT --kill-after=$KILL_AFTER "${LIMIT[preflight]}" "$PY" -c "$PREFLIGHT_PY" 2>&1)"
    rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
      why="torch took over ${LIMIT[preflight]}s to find a device (python: $PY)"
    elif [ $rc -ne 0 ]; then
      why="$(tail -1 <<<"${why:-$PY exited with $rc and no output}")"
    fi
    [ $rc -ne 0 ] || why="$why; $tools"
  fi
  SECS[preflight]=$((SECONDS - t0)) DETAIL[preflight]="$why"
  if [ $rc -eq 0 ]; then
    STATUS[preflight]=ok
    echo "=== preflight: ok: $why"
    return 0
  fi
  STATUS[preflight]="FAILED rc=$rc"
  if [ -n "${tools:-}" ] && [ "$why" = "$(tail -1 <<<"$tools")" ]; then
    REASON="build tools missing: $why"
  else
    REASON="no usable CUDA device: $why"
  fi
  return 1
}

# ---- 1. build ------------------------------------------------------------------------------------
build() {
  local devices
  {
    echo "date: $(date -u +%FT%TZ)"
    echo "host: $(uname -a)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1
    echo "nvcc: $("$CUDA_HOME/bin/nvcc" --version 2>&1 | tail -2 | tr '\n' ' ')"
    "$PY" -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__,
      "cuda", torch.version.cuda)'
    "$PY" -c 'import numpy, pytest; print("numpy", numpy.__version__, "pytest", pytest.__version__)'
    echo "CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
  } > "$LOGS/env.txt" 2>&1
  if [ "$DRY" = 1 ]; then  # no rebuild: the extension as built here must import
    local t0=$SECONDS
    if devices="$("$PY" -c 'import twolayer_ext as t; print(t.available_devices())' 2>&1)"; then
      STATUS[build]=ok DETAIL[build]="dry run: no rebuild; the extension as built imports, devices $devices"
    else
      STATUS[build]="FAILED" DETAIL[build]="dry run: the extension does not import: $(tail -1 <<<"$devices")"
      fail "the extension does not import: see logs.tar.gz"
    fi
    SECS[build]=$((SECONDS - t0))
    echo "=== build: ${STATUS[build]}: ${DETAIL[build]}"
    return
  fi
  # In place: writes twolayer_ext/_C*.so and _build_info.py in this tree, from scratch.
  rm -rf build twolayer_ext/_C*.so
  if run_step build "$(step_limit build)" "$LOGS/build.log" "$PY" setup.py build_ext --inplace; then
    DETAIL[build]="$(grep -m1 -o 'twolayer_ext: building the [A-Za-z-]* extension' "$LOGS/build.log")"
    if ! devices="$("$PY" -c 'import sys, twolayer_ext as t; d = t.available_devices(); print(d)
sys.exit(0 if "cuda" in d else 1)' 2>&1)"; then
      STATUS[build]="FAILED" DETAIL[build]="no CUDA kernels in the build: $(tail -1 <<<"$devices")"
      fail "the build has no CUDA kernels: $(tail -1 <<<"$devices")"
    fi
    echo "available devices: $devices"
  else
    DETAIL[build]="${STATUS[build]}: see build.log in logs.tar.gz"
    fail "the build ${STATUS[build]}: see build.log in logs.tar.gz"
  fi
}

# ---- 2. the test groups ------------------------------------------------------------------------
# junit_counts FILE: "<CUDA cases run> <passed> <failed> <skipped>" from a junit file; a CUDA case
# is one of test_cuda.py or with "cuda" in its name, that did not skip.
junit_counts() {
  "$PY" - "$1" <<'EOF'
import sys, xml.etree.ElementTree as ET
try:
    cases = list(ET.parse(sys.argv[1]).getroot().iter("testcase"))
except (OSError, ET.ParseError):
    print(0, 0, 0, 0)
    sys.exit()
skipped = [c.find("skipped") is not None for c in cases]
failed = [c.find("failure") is not None or c.find("error") is not None for c in cases]
cuda = sum(1 for c, s in zip(cases, skipped)
           if ("test_cuda" in c.get("classname", "") or "cuda" in c.get("name", "")) and not s)
print(cuda, len(cases) - sum(skipped) - sum(failed), sum(failed), sum(skipped))
EOF
}

# The dry run's selections: every group's pytest --collect-only in one python process (one
# import of torch and the tests instead of one per group), each into collect_GROUP.log; prints
# "GROUP RC" per group. Without TWOLAYER_REQUIRE_CUDA, which would stop a session without CUDA.
COLLECT_PY='
import contextlib, os, sys
import pytest
os.environ.pop("TWOLAYER_REQUIRE_CUDA", None)
logs, groups, args = sys.argv[1], [], sys.argv[2:]
for a in args:
    if a.startswith("@group="):
        groups.append((a[len("@group="):], []))
    else:
        groups[-1][1].append(a)
for name, group_args in groups:
    with open(os.path.join(logs, f"collect_{name}.log"), "w") as f, \
            contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        rc = pytest.main(group_args + ["--collect-only"])
    print(name, int(rc))
'

collect_groups() {
  local args=() g rc n t0=$SECONDS rcs
  for g in "${TEST_GROUPS[@]}"; do
    pytest_args "$g"
    args+=("@group=$g" "${PYTEST_ARGS[@]:2}")  # without "-m pytest"
    echo "=== $g: $(quoted "$PY" "${PYTEST_ARGS[@]}" --collect-only)"
  done
  rcs="$("$PY" -c "$COLLECT_PY" "$LOGS" "${args[@]}" 2>"$LOGS/collect.log")"
  for g in "${TEST_GROUPS[@]}"; do
    rc="$(awk -v g="$g" '$1 == g {print $2}' <<<"$rcs")"
    n=$(grep -c '::' "$LOGS/collect_$g.log" 2>/dev/null)
    SECS[$g]=$(( (SECONDS - t0) / ${#TEST_GROUPS[@]} ))
    if [ "${rc:-1}" = 0 ] && [ "${n:-0}" -gt 0 ]; then
      STATUS[$g]=ok DETAIL[$g]="dry run: $n cases selected (would run in ${LIMIT[$g]}s at most)"
    else
      STATUS[$g]="FAILED rc=${rc:-none}"
      DETAIL[$g]="dry run: collection failed or selected nothing (${n:-0} cases): see collect_$g.log"
      tail -15 "$LOGS/collect_$g.log" "$LOGS/collect.log" 2>/dev/null
      fail "test group $g: ${DETAIL[$g]}"
    fi
    echo "=== $g: ${STATUS[$g]}: ${DETAIL[$g]}"
  done
}

test_group() {
  local g=$1 limit cuda passed failed skipped
  pytest_args "$g"
  if [ "${STATUS[build]}" != ok ]; then
    DETAIL[$g]="skipped: no build"
    return
  fi
  limit=$(step_limit "$g")
  if [ "$limit" -eq 0 ]; then
    STATUS[$g]="TIMEOUT" DETAIL[$g]="not started: no time left before the deadline"
    fail "test group $g not started: no time left"
    return
  fi
  run_step "$g" "$limit" "$LOGS/tests_$g.log" env TWOLAYER_REQUIRE_CUDA=1 "$PY" \
    "${PYTEST_ARGS[@]}" --junitxml="$LOGS/junit_$g.xml"
  read -r cuda passed failed skipped <<<"$(junit_counts "$LOGS/junit_$g.xml")"
  CUDA_CASES=$((CUDA_CASES + cuda))
  DETAIL[$g]="$passed passed, $failed failed, $skipped skipped; $cuda CUDA cases run"
  if [ "${STATUS[$g]}" = ok ] && [ "$cuda" -eq 0 ]; then
    STATUS[$g]="FAILED" DETAIL[$g]+=" (none: see tests_$g.log)"
  fi
  [ "${STATUS[$g]}" = ok ] || fail "tests $g ${STATUS[$g]}: see summary.json failed_tests and tests_$g.log"
}

# ---- 3. the benchmark ----------------------------------------------------------------------------
# bench_backends: the CUDA backends of twolayer_ext.tools.recipes but the compiled ones, one
# --backend each.
BENCH_BACKENDS_PY='
from twolayer_ext.tools import recipes as B
print(" ".join(n for n in B.names(device="cuda", optimizers=("sgd",))
               if not B.parse(n).recipe.compiled))
'
# The benchmark's own argument parser checks each command line ("@NAME" starts one; device cuda
# swapped for cpu, which it refuses without a GPU; no --json, which it would create). Prints
# "NAME ok|refused: DETAIL" per line.
BENCH_PARSE_PY='
import contextlib, io, sys
from twolayer_ext.tools import bench
cmds = []
for a in sys.argv[1:]:
    if a.startswith("@"):
        cmds.append((a[1:], []))
    else:
        cmds[-1][1].append("cpu" if a == "cuda" else a)
for name, argv in cmds:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            a = bench.parse_args(argv)
        print(name, "ok:", "sizes", [s for s, _ in a.size], "dtypes", a.dtype, "backends", a.backend)
    except SystemExit:
        print(name, "refused:", err.getvalue().strip().splitlines()[-1])
'

bench() {
  local args=() b limit
  if ! BENCH_BACKENDS="$("$PY" -c "$BENCH_BACKENDS_PY" 2>"$LOGS/bench_backends.log")" \
      || [ -z "$BENCH_BACKENDS" ]; then
    STATUS[bench]="FAILED" DETAIL[bench]="cannot resolve the backends: $(tail -1 "$LOGS/bench_backends.log")"
    fail "bench: ${DETAIL[bench]}"
    BENCH_BACKENDS=""
    return
  fi
  for b in $BENCH_BACKENDS; do args+=(--backend "$b"); done
  echo "bench: backends $BENCH_BACKENDS; compile at the seed size only (bench_compile);"
  echo "       left out to fit the time: float16 and float64, rounds beyond 3 (default 7)"
  if [ "$DRY" = 1 ]; then
    local t0=$SECONDS s out line
    echo "=== bench: $(quoted "$PY" -m twolayer_ext.bench "${BENCH_ARGS[@]}" "${args[@]}" --json "$OUT/bench.json")"
    echo "=== bench_compile: $(quoted "$PY" -m twolayer_ext.bench "${BENCH_COMPILE_ARGS[@]}" --json "$OUT/bench_compile.json")"
    out="$("$PY" -c "$BENCH_PARSE_PY" @bench "${BENCH_ARGS[@]}" "${args[@]}" \
      @bench_compile "${BENCH_COMPILE_ARGS[@]}" 2>&1)"
    for s in bench bench_compile; do
      line="$(grep -m1 "^$s " <<<"$out")"
      if [ "${line#"$s "}" != "${line#"$s ok: "}" ]; then
        STATUS[$s]=ok DETAIL[$s]="dry run: arguments accepted: ${line#"$s ok: "}"
      else
        STATUS[$s]="FAILED" DETAIL[$s]="dry run: arguments refused: ${line:-$(tail -1 <<<"$out")}"
        fail "$s: ${DETAIL[$s]}"
      fi
      echo "=== $s: ${STATUS[$s]}: ${DETAIL[$s]}"
    done
    SECS[bench]=$((SECONDS - t0))
    return
  fi
  if [ "${STATUS[build]}" != ok ]; then
    DETAIL[bench]="skipped: no build" DETAIL[bench_compile]="skipped: no build"
    return
  fi
  # Timing is the harness's: torch.utils.benchmark after warm-up, which synchronises the device
  # at both ends of each timed block of steps.
  limit=$(($(left) - COMPILE_MIN))
  [ "$limit" -ge "${LIMIT[bench]}" ] || limit=$(step_limit bench)
  if [ "$limit" -ge 5 ]; then
    run_step bench "$limit" "$LOGS/bench.log" "$PY" -m twolayer_ext.bench "${BENCH_ARGS[@]}" \
      "${args[@]}" --json "$OUT/bench.json"
  else
    STATUS[bench]="TIMEOUT"
  fi
  DETAIL[bench]="$([ -s "$OUT/bench.json" ] && echo "bench.json written" || echo "no bench.json")"
  [ "${STATUS[bench]}" = ok ] || fail "bench ${STATUS[bench]}: see bench.log in logs.tar.gz"
  if [ "$(left)" -ge "$COMPILE_MIN" ]; then
    run_step bench_compile "$(left)" "$LOGS/bench_compile.log" "$PY" -m twolayer_ext.bench \
      "${BENCH_COMPILE_ARGS[@]}" --json "$OUT/bench_compile.json"
    DETAIL[bench_compile]="$([ -s "$OUT/bench_compile.json" ] && echo "bench_compile.json written" \
      || echo "no bench_compile.json")"
  else
    STATUS[bench_compile]=ok DETAIL[bench_compile]="left out: only $(left)s left (< ${COMPILE_MIN}s)"
  fi
}

# ---- the run -------------------------------------------------------------------------------------
table() {
  echo
  [ "$DRY" = 1 ] || { echo "=== benchmark (from bench.log)"; tail -40 "$LOGS/bench.log" 2>/dev/null; echo; }
  printf '%-14s %-14s %7s %6s  %s\n' step status seconds limit detail
  local s
  for s in "${STEPS[@]}"; do
    printf '%-14s %-14s %7s %6s  %s\n' "$s" "${STATUS[$s]}" "${SECS[$s]}" "${LIMIT[$s]}" "${DETAIL[$s]}"
  done
  printf '%-14s %-14s %7s %6s  %s\n' total "" "$((SECONDS - START))" "$DEADLINE" "summary.json, logs.tar.gz in $OUT"
}

main() {
  local s g ok=1
  print_plan || { REASON="the plan does not fit ${DEADLINE}s"; FINISHED=1; write_summary; return 1; }
  if ! preflight; then
    for s in "${STEPS[@]:1}"; do DETAIL[$s]="skipped: ${REASON%%:*}"; done
    FINISHED=1
    write_summary
    echo "$REASON (nothing built or run; $OUT/summary.json)" >&2
    return 1
  fi
  write_summary
  build
  write_summary
  if [ "$DRY" = 1 ]; then
    collect_groups
  else
    for g in "${TEST_GROUPS[@]}"; do
      test_group "$g"
      write_summary
    done
  fi
  if [ "$DRY" != 1 ] && [ "${STATUS[build]}" = ok ] && [ "$CUDA_CASES" -eq 0 ]; then
    fail "no CUDA test case ran: see the tests_*.log in logs.tar.gz"
  fi
  bench
  FINISHED=1
  write_summary
  table
  check_out_budget
  write_summary  # with the budget's verdict
  for s in "${STEPS[@]}"; do [ "${STATUS[$s]}" = ok ] || ok=0; done
  [ -z "$REASON" ] || ok=0
  if [ "$DRY" = 1 ]; then
    if [ $ok = 1 ]; then echo "dry run: ok: every step that needs no GPU ran; stopped before the GPU"
    else echo "dry run: FAILED: ${REASON:-a step failed}"; fi
  fi
  [ $ok = 1 ]
}

main 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
