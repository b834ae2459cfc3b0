#!/usr/bin/env bash
# Compiles every C++ source of the CPU build (csrc/*.cpp, csrc/cpu/*.cpp: what setup.py compiles
# without CUDA; csrc/cuda needs nvcc, see tools/cuda_check.sh) for aarch64 with
# `aarch64-linux-gnu-g++ -fsyntax-only`, against the torch headers installed in the venv and
# with the flags setup.py and torch's BuildExtension give the real build: its -std, the
# TORCH_EXTENSION_NAME / TORCH_API_INCLUDE_EXTENSION_H / Py_LIMITED_API defines, -fopenmp,
# -DNDEBUG -Wall. Fails on any compile error (warnings are shown, not fatal); prints one OK line
# with the file count.
#
# Then the portable kernels run on aarch64: csrc/cpu/tuned_portable.cpp, what an ARM CPU runs,
# linked with tools/aarch64_kernel_check.cpp (an oracle in double, and the two functions of the
# extension the kernels call, given without torch) into a static aarch64 program, run under
# qemu-aarch64 (Debian's qemu-user). It fails the script when a check fails; without qemu (not
# installed and not installable here) it is skipped, and the OK line says so.
#
# The cross compiler is Debian's g++-aarch64-linux-gnu. When it or qemu-user is missing and we
# are root with apt-get (this project's machines and CI), it is installed (~10 s, qemu-user
# ~60 s); otherwise the script says what to install and fails (qemu: skips). TWOLAYER_NO_APT=1
# forbids the installs. AARCH64_CXX overrides the compiler, QEMU_AARCH64 the emulator. Python.h
# and pyconfig.h are the host's (x86-64): they parse for aarch64 too, both being LP64 Linux
# (only csrc/ops.cpp includes Python.h).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CXX_A64=${AARCH64_CXX:-aarch64-linux-gnu-g++}
start=$SECONDS

die() { echo "cross_aarch64: FAILED: $*" >&2; exit 1; }

# may_apt: whether this script may install Debian packages (root, apt-get, not forbidden).
may_apt() {
    [ "${TWOLAYER_NO_APT:-0}" != 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1
}
# apt_install PACKAGE: installs it, updating a stale or missing package list once; on failure
# prints apt's last lines and returns 1.
apt_install() {
    local log rc=0
    log=$(mktemp)
    export DEBIAN_FRONTEND=noninteractive
    { apt-get install -y -q --no-install-recommends "$1" >>"$log" 2>&1 \
        || { apt-get update -q >>"$log" 2>&1 && apt-get install -y -q --no-install-recommends "$1" >>"$log" 2>&1; }; } \
        || { tail -20 "$log" >&2; rc=1; }
    rm -f "$log"
    return $rc
}

if ! command -v "$CXX_A64" >/dev/null 2>&1; then
    hint="install Debian's g++-aarch64-linux-gnu (apt-get install g++-aarch64-linux-gnu)"
    if [ "${AARCH64_CXX:-}" ] || ! may_apt; then
        die "the aarch64 cross compiler $CXX_A64 is not installed: $hint"
    fi
    echo "cross_aarch64: $CXX_A64 not found: installing g++-aarch64-linux-gnu with apt-get"
    apt_install g++-aarch64-linux-gnu || die "apt-get could not install g++-aarch64-linux-gnu: $hint"
    command -v "$CXX_A64" >/dev/null 2>&1 || die "g++-aarch64-linux-gnu installed, but $CXX_A64 is still missing"
fi

[ -x "$PY" ] || die "$PY not found: run make setup first (the torch headers come from its torch)"

# The flags, one a line: read from torch's cpp_extension and from setup.py itself (its `cxx` list,
# the extension's name, py_limited_api), so they follow both without an edit here.
flags_file=$(mktemp)
tmp=$(mktemp -d)
trap 'rm -rf "$flags_file" "$tmp"' EXIT
"$PY" - >"$flags_file" <<'EOF' || die "could not derive the compile flags (see above)"
import ast, inspect, re, sys, sysconfig
from torch.utils import cpp_extension

tree = ast.parse(open("setup.py").read(), "setup.py")
cxx = name = limited = None
for node in ast.walk(tree):
    # cxx = ["-O3", "-fopenmp", ...]: the first plain-literal assignment to `cxx`.
    if (cxx is None and isinstance(node, ast.Assign) and isinstance(node.value, ast.List)
            and any(isinstance(t, ast.Name) and t.id == "cxx" for t in node.targets)):
        cxx = ast.literal_eval(node.value)
    if isinstance(node, ast.Call):
        func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if func == "CppExtension" and node.args and isinstance(node.args[0], ast.Constant):
            name = node.args[0].value
        for kw in node.keywords:
            if kw.arg == "py_limited_api" and isinstance(kw.value, ast.Constant):
                limited = kw.value.value
if cxx is None or name is None:
    sys.exit("setup.py: no `cxx = [...]` list or no CppExtension('name', ...) found")

# The -std torch's BuildExtension adds when the flags name none (C++20 for torch 2.13).
m = re.search(r"cpp_flag_prefix\s*\+\s*'(c\+\+\d+)'", inspect.getsource(cpp_extension))
std = m.group(1) if m else "c++20"

flags = ["-std=" + std, "-DNDEBUG", "-Wall"]  # -DNDEBUG -Wall: Python's CFLAGS, which setuptools passes
flags += [f for f in cxx if f.startswith(("-f", "-D", "-O")) and f != "-g0"]
flags += ["-DTORCH_API_INCLUDE_EXTENSION_H"]
if limited:
    flags += [f"-DPy_LIMITED_API={cpp_extension.min_supported_cpython}"]
flags += [f"-DTORCH_EXTENSION_NAME={name.rsplit('.', 1)[-1]}"]
for inc in cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]:
    flags += ["-I" + inc]
print("\n".join(flags))
EOF
mapfile -t FLAGS <"$flags_file"

# The sources setup.py compiles for the CPU build, largest first (the slowest start first).
mapfile -t SOURCES < <(ls -S csrc/*.cpp csrc/cpu/*.cpp)
[ "${#SOURCES[@]}" -gt 0 ] || die "no C++ sources under csrc/"

jobs=$(nproc 2>/dev/null || echo 2)
i=0
for src in "${SOURCES[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done
    ("$CXX_A64" -fsyntax-only "${FLAGS[@]}" "$src" >"$tmp/$i.log" 2>&1; echo $? >"$tmp/$i.rc") &
    i=$((i + 1))
done
wait
failed=()
for i in "${!SOURCES[@]}"; do
    if [ -s "$tmp/$i.log" ]; then cat "$tmp/$i.log"; fi  # errors, and any warnings
    [ "$(cat "$tmp/$i.rc" 2>/dev/null)" = 0 ] || failed+=("${SOURCES[$i]}")
done

version=$("$CXX_A64" -dumpfullversion 2>/dev/null || "$CXX_A64" -dumpversion)
std=$(printf '%s\n' "${FLAGS[@]}" | grep -m1 -- '^-std=')
if [ "${#failed[@]}" -gt 0 ]; then
    die "${#failed[@]} of ${#SOURCES[@]} C++ sources do not compile for aarch64: ${failed[*]}"
fi

# The portable kernels, run: compiled with the build's own flags (those above: -O3, -fopenmp),
# linked statically so that qemu needs no aarch64 libraries.
QEMU=${QEMU_AARCH64:-qemu-aarch64}
if ! command -v "$QEMU" >/dev/null 2>&1 && [ -z "${QEMU_AARCH64:-}" ] && may_apt; then
    echo "cross_aarch64: $QEMU not found: installing qemu-user with apt-get"
    apt_install qemu-user || echo "cross_aarch64: apt-get could not install qemu-user"
fi
if command -v "$QEMU" >/dev/null 2>&1; then
    "$CXX_A64" "${FLAGS[@]}" tools/aarch64_kernel_check.cpp csrc/cpu/tuned_portable.cpp \
        -static -pthread -o "$tmp/kernel_check" >"$tmp/link.log" 2>&1 \
        || { cat "$tmp/link.log"; die "the aarch64 kernel check does not build (above)"; }
    "$QEMU" "$tmp/kernel_check" >"$tmp/run.log" 2>&1 \
        || { cat "$tmp/run.log"; die "the portable kernels fail on aarch64 under $QEMU (above)"; }
    ran=$(tail -1 "$tmp/run.log")
else
    ran="not run: $QEMU is not installed (apt-get install qemu-user)"
fi
echo "cross_aarch64: OK: ${#SOURCES[@]} C++ sources compile for aarch64" \
    "($CXX_A64 $version -fsyntax-only $std, torch headers of $PY); $ran; in $((SECONDS - start)) s"
