#!/usr/bin/env bash
# make cuda-check: compiles the CUDA build of the extension, on a machine with nvcc and no GPU.
#
# It uses its own venv (.venv-cuda, a CUDA build of torch) and builds a copy of the source tree
# in a temp dir, so the checkout's own build (twolayer_ext/_C*.so, _build_info.py) is never
# touched. Then it checks the .so holds the CUDA kernels, and runs tools/gpu_check.sh's dry run
# in that copy: every step of the GPU check that needs no GPU (the plan, the tool checks, each
# test group's selection, the benchmark's backends and command lines, summary.json, the
# output-file budget), then the real script, which must stop at once without a GPU. Nothing
# runs on a GPU here: tools/gpu_check.sh on a GPU machine does that.
#
# Overridable: CUDA_HOME (/usr/local/cuda), TORCH_CUDA_ARCH_LIST (9.0), MAX_JOBS (2),
# CUDA_TORCH_SPEC (torch==2.14.1), CUDA_VENV (.venv-cuda).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CUDA_VENV:-$ROOT/.venv-cuda}"
TORCH_SPEC="${CUDA_TORCH_SPEC:-torch==2.14.1}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
export TWOLAYER_CUDA=1
START=$SECONDS

if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "cuda-check: no nvcc in CUDA_HOME=$CUDA_HOME (set CUDA_HOME to the toolkit)" >&2
  exit 1
fi

# (a) The venv: created on a fresh clone, refreshed otherwise (pip is a no-op when up to date).
test -x "$VENV/bin/python" || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check \
  "$TORCH_SPEC" numpy pytest ninja "setuptools>=77" wheel
PY="$VENV/bin/python"
"$PY" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else
  f"cuda-check: torch {torch.__version__} in the venv is not a CUDA build")'

# (b) Build a copy of the tree (no venvs, builds, .so files or git data).
WORK="$(mktemp -d "${TMPDIR:-/tmp}/twolayer-cuda-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
tar -C "$ROOT" -c --exclude='./.venv*' --exclude='./build' --exclude='./.git' \
  --exclude='./out' --exclude='*.so' --exclude='__pycache__' --exclude='*.egg-info' --exclude='*.log' \
  . | tar -C "$WORK" -x
echo "cuda-check: building in $WORK (CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS)"
(cd "$WORK" && "$PY" setup.py -q build_ext --inplace > "$WORK/build.log" 2>&1) || {
  tail -60 "$WORK/build.log"
  echo "cuda-check: FAILED: the CUDA build does not compile (log above)" >&2
  exit 1
}
grep -m1 -o 'twolayer_ext: building.*' "$WORK/build.log"
# Warnings in our own sources (not torch's headers) are shown, so they get fixed.
{ grep -i warning "$WORK/build.log" | grep -F "csrc/" | sort -u | sed 's/^/cuda-check: /'; } || true
BUILD_S=$((SECONDS - START))
# The slowest objects (ninja's log: start and end in ms): a parallel build on a GPU machine
# takes about as long as the slowest one (tools/gpu_check.sh plans its build step on that).
NINJA_LOG="$(find "$WORK/build" -name .ninja_log 2>/dev/null | head -1 || true)"
if [ -n "$NINJA_LOG" ]; then
  echo "cuda-check: slowest objects here (MAX_JOBS=$MAX_JOBS): $(awk -F'\t' '!/^#/ {
      n = split($4, p, "/"); printf "%d %s\n", ($2 - $1) / 1000, p[n] }' "$NINJA_LOG" \
    | sort -rn | head -4 | awk '{printf "%s %ss, ", $2, $1}' | sed 's/, $//')"
fi

# (c) The .so exists and holds the CUDA entry points and our kernels' device code.
SO="$(ls "$WORK"/twolayer_ext/_C*.so 2>/dev/null | head -1)"
if [ -z "$SO" ]; then
  echo "cuda-check: FAILED: no twolayer_ext/_C*.so was built" >&2
  exit 1
fi
failed=0
symbols="$(nm -C "$SO")"  # captured once: `nm | grep -q` fails under pipefail (SIGPIPE)
for sym in twolayer::cuda::{two_layer_fwd,two_layer_bwd,l2_loss_fwd,l2_loss_bwd,two_layer_l2_loss_fwd,sgd_step}\( \
           {relu_with_sign_mask,apply_relu_mask,squared_error_partials,finish_loss}_kernel; do
  if ! grep -q -F "$sym" <<<"$symbols"; then
    echo "cuda-check: FAILED: ${sym%(} not in $SO" >&2
    failed=1
  fi
done
if ! readelf -S -W "$SO" | grep -q -F .nv_fatbin; then
  echo "cuda-check: FAILED: $SO has no device code (.nv_fatbin section)" >&2
  failed=1
fi
[ "$failed" -eq 0 ] || exit 1
# Loading it (no GPU needed) catches undefined symbols, which linking a .so does not.
(cd "$WORK" && "$PY" -c 'import twolayer_ext as t, sys; sys.exit(0 if "cuda" in t.available_devices()
  else f"cuda-check: FAILED: the built module has no CUDA kernels registered: {t.BUILD_INFO}")')
arches="not listed: no cuobjdump in this toolkit"
if [ -x "$CUDA_HOME/bin/cuobjdump" ]; then
  arches="$("$CUDA_HOME/bin/cuobjdump" --list-elf "$SO" | grep -o 'sm_[0-9a-z]*' | sort -u | tr '\n' ' ')"
fi
echo "cuda-check: OK: $(basename "$SO") loads, has the 6 CUDA ops and the 4 kernels, with device code ($arches)"

# (d) The GPU check's dry run, in the built copy: tools/gpu_check.sh --dry-run runs every step
#     that needs no GPU and must pass (its plan and table are shown); then the real script,
#     which without a usable CUDA device must fail within seconds, its last line "no usable
#     CUDA device: ..." and summary.json saying why, never pass by skipping every CUDA test.
DRY="$WORK/gpu-check-dry-run"
set +e
PYTHON="$PY" bash "$WORK/tools/gpu_check.sh" --dry-run "$DRY" 2>&1 | sed 's/^/  | /'
dry_rc=${PIPESTATUS[0]}
set -e
"$PY" - "$dry_rc" "$DRY" <<'EOF'
import json, os, sys
rc, out = int(sys.argv[1]), sys.argv[2]
problems = []
if rc != 0:
    problems.append(f"it exited {rc}")
try:
    s = json.load(open(os.path.join(out, "summary.json")))
    if not (s["ok"] and s["dry_run"] and s["finished"]):
        problems.append(f"summary.json: ok {s['ok']}, dry_run {s['dry_run']}: {s['reason']}")
    bad = {k: v["status"] for k, v in s["steps"].items() if v["status"] != "ok"}
    if bad:
        problems.append(f"steps not ok: {bad}")
    if "compile" in s["bench_backends"] or not s["bench_backends"]:
        problems.append(f"benchmark backends: {s['bench_backends']}")
    files = [f for _, _, fs in os.walk(out) for f in fs]
    if len(files) > s["max_output_files"]:
        problems.append(f"{len(files)} output files: {files}")
except (OSError, ValueError, KeyError) as e:
    problems.append(f"no readable summary.json: {e}")
sys.exit(f"cuda-check: FAILED: the gpu_check.sh dry run: {'; '.join(problems)}" if problems else 0)
EOF
echo "cuda-check: OK: the gpu_check.sh dry run ran every step that needs no GPU"

if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "cuda-check: a GPU is visible: the no-GPU run skipped (run tools/gpu_check.sh OUTDIR for the real check)"
else
  NOGPU="$WORK/gpu-check-no-gpu"
  set +e
  nogpu_out="$(PYTHON="$PY" bash "$WORK/tools/gpu_check.sh" "$NOGPU" 2>&1)"
  nogpu_rc=$?
  set -e
  echo "cuda-check: without a GPU, tools/gpu_check.sh exited $nogpu_rc: $(tail -1 <<<"$nogpu_out")"
  "$PY" - "$nogpu_rc" "$nogpu_out" "$NOGPU/summary.json" <<'EOF'
import json, sys
rc, out, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
problems = []
if rc == 0:
    problems.append("it exited 0")
last = out.strip().splitlines()[-1] if out.strip() else ""
if not last.startswith("no usable CUDA device: "):
    problems.append(f"its last line does not start 'no usable CUDA device: ': {last!r}")
if "=== build" in out:
    problems.append("it went on to the build")
try:
    s = json.load(open(path))
    if s["ok"] is not False or not s["reason"].startswith("no usable CUDA device: "):
        problems.append(f"summary.json does not say why: {s}")
except (OSError, ValueError, KeyError) as e:
    problems.append(f"no readable summary.json: {e}")
sys.exit(f"cuda-check: FAILED: gpu_check.sh without a GPU: {'; '.join(problems)}" if problems else 0)
EOF
  echo "cuda-check: OK: without a GPU the real run stops at the preflight and summary.json says why"
fi

# (e) Timing.
echo "cuda-check: build ${BUILD_S}s, total $((SECONDS - START))s"
