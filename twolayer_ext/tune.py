"""`python -m twolayer_ext.tune`: runs twolayer_ext.tools.tune, as `python -m twolayer_ext.tools.tune`."""

import runpy

if __name__ == "__main__":
    runpy.run_module("twolayer_ext.tools.tune", run_name="__main__", alter_sys=True)
