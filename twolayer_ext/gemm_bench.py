"""`python -m twolayer_ext.gemm_bench`: runs twolayer_ext.tools.gemm_bench, as `python -m twolayer_ext.tools.gemm_bench`."""

import runpy

if __name__ == "__main__":
    runpy.run_module("twolayer_ext.tools.gemm_bench", run_name="__main__", alter_sys=True)
