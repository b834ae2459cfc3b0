"""`python -m twolayer_ext.train`: runs twolayer_ext.tools.train, as `python -m twolayer_ext.tools.train`."""

import runpy

if __name__ == "__main__":
    runpy.run_module("twolayer_ext.tools.train", run_name="__main__", alter_sys=True)
