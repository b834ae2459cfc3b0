"""Builds twolayer_ext._C: CPU kernels always, CUDA kernels when they can be built.

TWOLAYER_CUDA=1 forces the CUDA build (and fails if it cannot be done), TWOLAYER_CUDA=0
forces CPU-only; unset, CUDA is built when torch is a CUDA build and nvcc is found.
Build with the installed torch: pip install --no-build-isolation -e .

`make build` instead compiles with `setup.py build_ext --inplace --force` into the persistent
build/ folder, where ninja recompiles only what changed (sources, headers or flags), and registers
the package with pip once with TWOLAYER_REGISTER_ONLY=1: an editable install that leaves the
extension out (pip would compile it again in a fresh temporary folder) and uses the in-place one.
"""

import glob
import os
import shlex
import sys

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))


def choose_backend():
    """Returns (build_cuda, reason)."""
    forced = os.environ.get("TWOLAYER_CUDA", "").strip()
    if forced not in ("", "0", "1"):
        sys.exit(f"twolayer_ext: TWOLAYER_CUDA must be 0 or 1, got {forced!r}")
    if forced == "0":
        return False, "TWOLAYER_CUDA=0"
    missing = []
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} is a CPU-only build")
    cuda_home = cpp_extension.CUDA_HOME
    if cuda_home is None or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        missing.append("no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc)")
    if not glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")):
        missing.append("no CUDA sources in csrc/cuda")
    if not missing and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # torch picks the architectures from the visible GPUs, and crashes when there are none.
        missing.append(
            "no GPU visible to choose an architecture for (set TORCH_CUDA_ARCH_LIST, e.g. 9.0)"
        )
    if missing:
        if forced == "1":
            sys.exit(
                "twolayer_ext: TWOLAYER_CUDA=1 but CUDA cannot be built: " + "; ".join(missing)
            )
        return False, "; ".join(missing)
    why = "TWOLAYER_CUDA=1" if forced == "1" else "found"
    return (
        True,
        f"{why}: torch {torch.__version__} with CUDA {torch.version.cuda}, nvcc in {cuda_home}",
    )


def write_build_info(backend, reason):
    # Read at import time, so a failed load can say which torch this was built for.
    with open(os.path.join(HERE, "twolayer_ext", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py at build time.\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"BACKEND = {backend!r}\n")
        f.write(f"REASON = {reason!r}\n")


def announce(line):
    """Prints `line`, and shows it through pip too.

    pip captures a build backend's output and shows it only with -v or when the build fails; on a
    terminal the line also goes straight to it (/dev/tty), so that a plain `pip install .` says
    what it builds. Not when pip shows the output anyway (our stdout is then the terminal)."""
    print(line, flush=True)
    if "PIP_BUILD_TRACKER" not in os.environ or sys.stdout.isatty():
        return
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(f"\n{line}\n")  # pip's spinner holds the current line
    except OSError:
        pass  # no terminal: pip's log (-v) has the line


class BuildExtension(cpp_extension.BuildExtension):
    """Says what it builds when the build starts (pip runs setup.py for its metadata too)."""

    def build_extensions(self):
        for ext in self.extensions:
            announce(f"twolayer_ext: building the {ext.backend} extension ({ext.reason})")
        super().build_extensions()


def unity_sources(sources):
    """The sources compiled as a few larger translation units: returns what to compile.

    Most of a C++ source's compile time is spent parsing torch's headers (ATen/core/Tensor.h,
    the ATen/ops/ headers, torch/library.h, autograd), so each group of sources sharing them is
    compiled as one file that #includes them all: a first build needs ~40% less CPU time.
    The tuned ISA builds stay apart (each is its own target pragma, and their time is codegen).
    Each source still compiles alone (tools/cross_aarch64.sh checks that). A name that two
    sources of one group both define at file scope is then an error: rename one of them, or
    build with TWOLAYER_UNITY=0 (one object per source) to find it.
    """
    groups = {"ops": [], "cpu": []}
    alone = []
    for src in sources:
        if os.path.basename(src).startswith("tuned_"):
            alone.append(src)
        else:
            groups["cpu" if src.startswith("csrc/cpu/") else "ops"].append(src)
    out_dir = os.path.join("build", "unity")
    os.makedirs(out_dir, exist_ok=True)
    unity = []
    for name, members in groups.items():
        if not members:
            continue
        path = os.path.join(out_dir, f"{name}.cpp")
        text = "// Generated by setup.py (unity_sources): compiled instead of these sources.\n"
        text += "".join(f'#include "{os.path.relpath(m, out_dir)}"\n' for m in members)
        # Rewritten only when it changes: ninja rebuilds whatever is newer than its object.
        if not os.path.exists(path) or open(path).read() != text:
            with open(path, "w") as f:
                f.write(text)
        unity.append(path)
    # ninja starts jobs in this order: the longest compiles (the groups) first.
    return unity + alone


def extension():
    build_cuda, reason = choose_backend()
    backend = "CUDA" if build_cuda else "CPU-only"
    write_build_info(backend, reason)

    # No -std flag: torch's BuildExtension passes the standard its headers need (C++20 for 2.14).
    cxx = ["-O3", "-fopenmp", "-g0"]
    # Extra flags go last, so they win (tools/sanitize.sh passes -fsanitize=... -O1 -g this way).
    cxx += shlex.split(os.environ.get("TWOLAYER_EXTRA_CFLAGS", ""))
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    grouped = sources
    if os.environ.get("TWOLAYER_UNITY", "1").strip() != "0":
        sources = unity_sources(sources)
    link = ["-fopenmp"] + shlex.split(os.environ.get("TWOLAYER_EXTRA_LDFLAGS", ""))
    # Headers too: setuptools relinks only when a dependency is newer than the .so, and ninja's
    # own header tracking only rebuilds the objects.
    depends = (
        sorted(
            f for ext in ("h", "inc", "cuh") for f in glob.glob(f"csrc/**/*.{ext}", recursive=True)
        )
        + ["setup.py"]
        + grouped
    )
    kwargs = dict(extra_link_args=link, py_limited_api=True, depends=depends)
    if not build_cuda:
        ext = cpp_extension.CppExtension(
            "twolayer_ext._C", sources, extra_compile_args={"cxx": cxx}, **kwargs
        )
        ext.backend, ext.reason = backend, reason
        return ext
    cxx.append("-DTWOLAYER_WITH_CUDA")
    nvcc = ["-O3", "-DTWOLAYER_WITH_CUDA", "--expt-relaxed-constexpr"]
    # torch's ATen/cuda headers include cuBLAS/cuSPARSE/cuSOLVER headers, which a bare toolkit
    # may lack; the nvidia-* wheels torch depends on carry them (nvidia/cu13/include,
    # nvidia/cublas/include, ...). -isystem is searched after -I, so CUDA_HOME/include still wins.
    site_packages = os.path.dirname(os.path.dirname(torch.__file__))
    library_headers = ("cublas_v2.h", "cusparse.h", "cusolverDn.h")
    for inc in sorted(glob.glob(os.path.join(site_packages, "nvidia", "*", "include"))):
        if any(os.path.exists(os.path.join(inc, h)) for h in library_headers):
            cxx += ["-isystem", inc]
            nvcc += ["-isystem", inc]
    ext = cpp_extension.CUDAExtension(
        "twolayer_ext._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        **kwargs,
    )
    ext.backend, ext.reason = backend, reason
    return ext


register_only = os.environ.get("TWOLAYER_REGISTER_ONLY", "").strip() == "1"
setup(
    packages=find_packages(include=["twolayer_ext", "twolayer_ext.*"]),
    ext_modules=[] if register_only else [extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
