"""Loads the compiled ops (twolayer_ext._C) and says what it holds."""
import torch

REBUILD = "pip install --no-build-isolation -e .   (or: make build)"

try:
    from . import _build_info
except ImportError:  # never built
    _build_info = None

try:
    from . import _C  # noqa: F401  (importing it registers the ops)
except ImportError as e:
    built = _build_info.TORCH_VERSION if _build_info else "unknown (no build found)"
    raise ImportError(
        f"twolayer_ext: cannot load the compiled extension twolayer_ext._C: {e}\n"
        f"  built against torch {built}; installed torch is {torch.__version__}\n"
        f"  rebuild it against the installed torch: {REBUILD}"
    ) from e

if _build_info and _build_info.TORCH_VERSION != torch.__version__:
    import warnings

    warnings.warn(
        f"twolayer_ext._C was built against torch {_build_info.TORCH_VERSION} but torch "
        f"{torch.__version__} is installed; if anything fails, rebuild: {REBUILD}",
        RuntimeWarning,
        stacklevel=2,
    )

BUILD_INFO = {
    "torch": _build_info.TORCH_VERSION if _build_info else None,
    "backend": _build_info.BACKEND if _build_info else None,
    "reason": _build_info.REASON if _build_info else None,
}


def available_devices():
    """Device types that have kernels in this build, e.g. ['cpu'] or ['cpu', 'cuda']."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return [dev for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))
            if has("twolayer_ext::two_layer_fwd", key)]
