"""Install polish: the loader's rebuild advice fits how the package was installed; the license
and the type-hint marker ship with it."""

import os
from pathlib import Path

import pytest

import twolayer_ext
from twolayer_ext import _loader

ROOT = Path(__file__).resolve().parents[1]


def test_rebuild_advice_for_an_editable_install():
    pkg = str(ROOT / "twolayer_ext")
    editable = {"url": ROOT.as_uri(), "dir_info": {"editable": True}}
    assert _loader.rebuild_command(pkg, editable).startswith(
        f"pip install --no-build-isolation -e {ROOT} "
    )


def test_rebuild_advice_for_a_source_tree_built_in_place():
    pkg = str(ROOT / "twolayer_ext")
    other = {"url": "file:///elsewhere", "dir_info": {"editable": True}}
    for direct_url in ({}, other):
        assert _loader.rebuild_command(pkg, direct_url).startswith(
            f"cd {ROOT} && python setup.py build_ext --inplace"
        )


def test_rebuild_advice_for_a_regular_install(tmp_path):
    pkg = str(tmp_path / "site-packages" / "twolayer_ext")
    from_dir = {"url": "file:///src/twolayer%20ext", "dir_info": {}}
    assert _loader.rebuild_command(pkg, from_dir) == (
        "pip install --no-build-isolation --no-deps --force-reinstall /src/twolayer ext"
    )
    assert "-e " not in _loader.rebuild_command(pkg, {"url": "https://x/y.whl"})


def test_this_install_gets_advice_for_itself():
    advice = _loader.rebuild_command()
    assert "--no-build-isolation" in advice or "build_ext --inplace" in advice
    assert str(Path(twolayer_ext.__file__).resolve().parents[1]) in advice


def toml_parser():
    """tomllib (Python 3.11+); on 3.10, which pyproject.toml allows, tomli (the same parser as a
    package), or a skip naming it."""
    try:
        import tomllib
    except ModuleNotFoundError:
        return pytest.importorskip(
            "tomli", reason="Python 3.10 reads TOML with tomli (pip install tomli)"
        )
    return tomllib


def test_license_and_type_marker_ship():
    meta = toml_parser().loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "BSD-3-Clause"
    assert "BSD 3-Clause" in (ROOT / "LICENSE").read_text()
    assert "py.typed" in meta["tool"]["setuptools"]["package-data"]["twolayer_ext"]
    assert os.path.exists(os.path.join(os.path.dirname(twolayer_ext.__file__), "py.typed"))
