"""The GEMM table: our GEMM inside the fused forward against the platform BLAS, one thread.

    python -m twolayer_ext.gemm_bench                    # the issue's four shapes
    python -m twolayer_ext.gemm_bench --shape 512,1024,256 --dtype float32 --threads 2

"ours[variant]" is two_layer with D_out = 1 through that CPU variant, so the first GEMM
(M x K x N = N x D_in x H) with its fused bias/ReLU epilogue is nearly all of the work; MKL is
torch.mm (torch's BLAS), OpenBLAS is numpy's np.dot. Each cell is the best of --repeats timed
blocks (the least disturbed run), interleaved across the contenders. When timing numpy, unset
OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE for this command only (see docs/performance.md).
"""

import argparse
import time

import numpy as np
import torch

from ..ops import CPU_VARIANTS, cpu_kernel_missing, two_layer, use_cpu_kernel

SHAPES = [(4096, 1024, 1024), (512, 1024, 256), (64, 1000, 100)]
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _best_seconds(fn, repeats, min_time=0.05):
    fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    number = max(1, int(min_time / one))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t0) / number)
    return best


def contenders(M, K, N, dtype):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(M, K, generator=g, dtype=torch.float64).to(dtype)
    b = (torch.randn(K, N, generator=g, dtype=torch.float64) / K**0.5).to(dtype)
    w2 = torch.randn(N, 1, generator=g, dtype=torch.float64).to(dtype)
    out = {}
    for v in CPU_VARIANTS:
        if v != "reference" and not cpu_kernel_missing(v):

            def ours(v=v):
                with use_cpu_kernel(v):
                    two_layer(a, b, w2)

            out[f"ours[{v}]"] = ours
    c = torch.empty(M, N, dtype=dtype)
    out["MKL (torch.mm)"] = lambda: torch.mm(a, b, out=c)
    an, bn = a.numpy(), b.numpy()
    cn = np.empty((M, N), dtype=an.dtype)
    out["OpenBLAS (numpy)"] = lambda: np.dot(an, bn, out=cn)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m twolayer_ext.gemm_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--shape", action="append", metavar="M,K,N")
    p.add_argument("--dtype", action="append", choices=list(DTYPES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape] if args.shape else SHAPES
    if any(len(s) != 3 or min(s) <= 0 for s in shapes):
        p.error("--shape must be three positive ints M,K,N")
    torch.set_num_threads(args.threads)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
    except ImportError:
        pass
    print(f"# GFLOP/s, best of {args.repeats}, {args.threads} thread(s)")
    for dname in args.dtype or ["float32", "float64"]:
        for M, K, N in shapes:
            fns = contenders(M, K, N, DTYPES[dname])
            best = {name: float("inf") for name in fns}
            for _ in range(args.repeats):  # interleaved rounds
                for name, fn in fns.items():
                    best[name] = min(best[name], _best_seconds(fn, 1))
            flops = 2 * M * K * N
            rate = {name: flops / t / 1e9 for name, t in best.items()}
            blas = max(v for k, v in rate.items() if not k.startswith("ours"))
            cells = "  ".join(f"{k} {v:6.1f}" for k, v in rate.items())
            ours = max(v for k, v in rate.items() if k.startswith("ours["))
            print(f"{M}x{K}x{N} {dname}: {cells}  | best ours / best BLAS {ours / blas:.2f}")


if __name__ == "__main__":
    main()
