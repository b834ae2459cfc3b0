"""`python -m twolayer_ext.bench`: runs twolayer_ext.tools.bench, as `python -m twolayer_ext.tools.bench`."""

import runpy

if __name__ == "__main__":
    runpy.run_module("twolayer_ext.tools.bench", run_name="__main__", alter_sys=True)
