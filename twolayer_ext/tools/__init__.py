"""The tools around the library: the training CLI (train), the benchmark (bench) and the
training recipes they share (recipes), the GEMM table (gemm_bench), the per-route timings
(routes), the ahead-of-time tuner (tune), and their data sets and DDP helpers.

The library (twolayer_ext: ops, module, reference oracles) imports none of this.
"""
