# make demo : set up .venv, build, run the main job (the tutorial trained four ways)
# make test : set up .venv, build, run every test
# make test-fast: set up .venv, build, run every test but the slow ones (-m "not slow": ~1 min)
# make check: ruff check + ruff format --check, mypy, clang-format --dry-run, and every C++ source
#             compiled for aarch64, the portable kernels run under qemu-aarch64 (no build
#             needed; tools/check.sh)
# Override the torch pin with e.g. `make test TORCH_SPEC='torch==2.14.1'`.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY          = $(VENV)/bin/python
DEPS        = "$(TORCH_SPEC)" numpy pytest hypothesis ninja "setuptools>=77" wheel matplotlib scikit-learn "ruff>=0.17,<0.18" "mypy>=2.4,<2.5" "clang-format>=23,<24"
# What the venv was last set up with: pip runs only when this changes (it takes seconds even
# when everything is installed).
DEPS_STAMP  = $(VENV)/.twolayer-deps

.PHONY: all setup build test test-fast check demo bench cuda-check sanitize clean
all: test

setup:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if [ "$$(cat $(DEPS_STAMP) 2>/dev/null)" != '$(DEPS)' ]; then \
		$(PY) -m pip install -q --disable-pip-version-check $(DEPS) && echo '$(DEPS)' > $(DEPS_STAMP); \
	fi

# Incremental: build_ext --inplace compiles into the persistent build/ folder, where ninja
# rebuilds only the objects whose sources, headers or flags changed (--force: always hand the
# decision to ninja and relink, so a flag change is never skipped as "up-to-date"). No build
# isolation anywhere: build against the torch in the venv, not a fresh download (ABI).
# The first time, pip registers the package (editable, console script) without compiling it
# again (TWOLAYER_REGISTER_ONLY, see setup.py); the import check runs outside the tree.
# While it builds: the line saying what is built, then ninja's "[k/n]" line as each object
# finishes, shortened to its source file, and the link; everything else (full commands, warnings)
# only in build.log, whose tail shows when the build fails.
build: setup
	@PYTHONUNBUFFERED=1 bash -o pipefail -c '$(PY) setup.py build_ext --inplace --force 2>&1 \
		| tee build.log | sed -nu -e "s|$(CURDIR)/||g" -e "/^twolayer_ext: /p" -e "/^ninja: no work/p" \
			-e "s|^\(\[[0-9]*/[0-9]*\]\) .* -c \([^ ]*\) .*|\1 \2|p" \
			-e "s|^.* -shared .* -o [^ ]*/\([^ /]*/[^ /]*\.so\).*|linking \1|p"' \
		|| { tail -40 build.log; echo "build failed: see build.log"; exit 1; }
	@(cd / && $(abspath $(PY)) -c 'import importlib.util as u, sys; s = u.find_spec("twolayer_ext"); \
		sys.exit(s is None or s.origin != sys.argv[1])' "$(CURDIR)/twolayer_ext/__init__.py") \
	|| TWOLAYER_REGISTER_ONLY=1 $(PY) -m pip install -q --disable-pip-version-check \
		--no-build-isolation --no-deps -e . >> build.log 2>&1 \
	|| { tail -40 build.log; echo "pip install -e . failed: see build.log"; exit 1; }

test: build
	$(PY) -m pytest -q -p no:cacheprovider tests

# The edit-and-check loop: every test but those marked slow (leaks, >2^31 elements, DDP, CLI
# subprocesses, hypothesis runs: pyproject.toml's markers). `make test` still runs them all.
test-fast: build
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests

# Fast static checks, no build: ruff (lint and format), mypy, clang-format, and every C++ source
# of the CPU build compiled for aarch64 with -fsyntax-only, the portable kernels run for aarch64
# under qemu-aarch64 (see tools/check.sh).
check: setup
	@PY=$(PY) bash tools/check.sh

demo: build
	@mkdir -p build
	$(PY) -m twolayer_ext.train --plot build/demo_loss.png

bench: build
	$(PY) -m twolayer_ext.bench

# Compiles the CUDA build with no GPU (own venv with a CUDA torch), runs tools/gpu_check.sh
# --dry-run (every step that needs no GPU), then checks that the real run stops at its
# preflight without a GPU; see tools/cuda_check.sh.
cuda-check:
	bash tools/cuda_check.sh

# ASan/UBSan build of the extension, then the test suite under it; see tools/sanitize.sh.
sanitize: setup
	bash tools/sanitize.sh

clean:
	rm -rf build *.egg-info twolayer_ext/*.so twolayer_ext/_build_info.py build.log
