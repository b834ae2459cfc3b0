"""`python -m twolayer_ext.routes`: runs twolayer_ext.tools.routes, as `python -m twolayer_ext.tools.routes`."""

import runpy

if __name__ == "__main__":
    runpy.run_module("twolayer_ext.tools.routes", run_name="__main__", alter_sys=True)
