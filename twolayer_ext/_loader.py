"""Loads the compiled ops (twolayer_ext._C) and says what it holds."""

import importlib
import json
import os
from types import ModuleType
from typing import Dict, List, Optional
from urllib.parse import unquote, urlparse

import torch

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def rebuild_command(package_dir: str = PACKAGE_DIR, direct_url: Optional[dict] = None) -> str:
    """The command that rebuilds the extension for how this copy was installed.

    package_dir: where the package was imported from; direct_url: pip's direct_url.json of the
    installed distribution (PEP 610), None when there is none (read from the metadata when the
    default package_dir is asked about).
    """
    if direct_url is None and package_dir == PACKAGE_DIR:
        direct_url = _installed_direct_url()
    url = (direct_url or {}).get("url", "")
    source = unquote(urlparse(url).path) if url.startswith("file://") else None
    editable = bool((direct_url or {}).get("dir_info", {}).get("editable"))
    root = os.path.dirname(package_dir)
    if os.path.exists(os.path.join(root, "setup.py")):  # imported from a source tree
        if editable and source and os.path.realpath(source) == os.path.realpath(root):
            return f"pip install --no-build-isolation -e {root}   (or: make build, in {root})"
        return f"cd {root} && python setup.py build_ext --inplace   (or: make build)"
    # An installed copy (site-packages): reinstall it from its source, against this torch.
    return "pip install --no-build-isolation --no-deps --force-reinstall " + (
        source or "<the twolayer_ext source folder>"
    )


def _installed_direct_url() -> Optional[dict]:
    from importlib import metadata

    try:
        text = metadata.distribution("twolayer_ext").read_text("direct_url.json")
        return json.loads(text) if text else None
    except (metadata.PackageNotFoundError, ValueError):
        return None


def _import_build_info() -> Optional[ModuleType]:
    """twolayer_ext._build_info (written by setup.py at build time, git-ignored), None when the
    extension was never built. Imported by name: its attributes are read as Any."""
    try:
        return importlib.import_module("._build_info", __package__)
    except ImportError:  # never built
        return None


_build_info = _import_build_info()

# _C is the compiled extension (a .so, no Python source or stub for a type checker to read):
# imported by name, for its side effect only (importing it registers the ops).
try:
    importlib.import_module("._C", __package__)
except ImportError as e:
    built = _build_info.TORCH_VERSION if _build_info else "unknown (no build found)"
    raise ImportError(
        f"twolayer_ext: cannot load the compiled extension twolayer_ext._C: {e}\n"
        f"  built against torch {built}; installed torch is {torch.__version__}\n"
        f"  rebuild it against the installed torch: {rebuild_command()}"
    ) from e

if _build_info and _build_info.TORCH_VERSION != torch.__version__:
    import warnings

    warnings.warn(
        f"twolayer_ext._C was built against torch {_build_info.TORCH_VERSION} but torch "
        f"{torch.__version__} is installed; if anything fails, rebuild: {rebuild_command()}",
        RuntimeWarning,
        stacklevel=2,
    )

BUILD_INFO: Dict[str, Optional[str]] = {
    "torch": _build_info.TORCH_VERSION if _build_info else None,
    "backend": _build_info.BACKEND if _build_info else None,
    "reason": _build_info.REASON if _build_info else None,
}


def available_devices() -> List[str]:
    """Device types that have kernels in this build, e.g. ['cpu'] or ['cpu', 'cuda']."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return [
        dev
        for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))
        if has("twolayer_ext::two_layer_fwd", key)
    ]
