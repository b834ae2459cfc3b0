# make demo : set up .venv, build, run the main job (the tutorial trained three ways)
# make test : set up .venv, build, run every test
# Override the torch pin with e.g. `make test TORCH_SPEC='torch==2.14.1'`.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY          = $(VENV)/bin/python
DEPS        = "$(TORCH_SPEC)" numpy pytest hypothesis ninja setuptools wheel matplotlib scikit-learn

.PHONY: all setup build test demo bench cuda-check sanitize clean
all: test

# Creates or refreshes the venv (pip is a no-op when everything is already there).
setup:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check $(DEPS)

# --no-build-isolation: build against the torch in the venv, not a fresh download (ABI).
build: setup
	@$(PY) -m pip install --disable-pip-version-check --no-build-isolation -v -e . > build.log 2>&1 \
		|| { tail -40 build.log; echo "build failed: see build.log"; exit 1; }
	@grep -m1 -o 'twolayer_ext: building.*' build.log

test: build
	$(PY) -m pytest -q -p no:cacheprovider tests

demo: build
	@mkdir -p build
	$(PY) -m twolayer_ext.train --plot build/demo_loss.png

bench: build
	$(PY) -m twolayer_ext.bench

# Compiles the CUDA build with no GPU (own venv with a CUDA torch), then checks that
# tools/gpu_check.sh fails loudly without a GPU (its dry run); see tools/cuda_check.sh.
cuda-check:
	bash tools/cuda_check.sh

# ASan/UBSan build of the extension, then the test suite under it; see tools/sanitize.sh.
sanitize: setup
	bash tools/sanitize.sh

clean:
	rm -rf build *.egg-info twolayer_ext/*.so twolayer_ext/_build_info.py build.log
