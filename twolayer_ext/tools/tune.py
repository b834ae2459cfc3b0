"""Measure auto's CPU kernel choice ahead of time, and remember it in the wisdom file.

    python -m twolayer_ext.tune                          # the benchmark sizes, float32, this thread count
    python -m twolayer_ext.tune --size seed --size 256,512,256,16 --dtype float64 --threads 1 --threads 2
    python -m twolayer_ext.tune --bounded --json picks.json  # as a first call would measure

Ahead of time, each problem is timed at its own size. The first call of a new (dtype,
thread count, shape bucket) measures the same way but within a time budget (about 70 ms), on
fewer rows when a step is large; --bounded measures that way here. A large step's first
whole-step calls then try the candidates at full size, and decide (docs/design.md). Picks go to the wisdom file
(TWOLAYER_WISDOM, else the user's cache folder; see docs/design.md), so later processes reuse them.
"""

import argparse
import json
import sys

import torch

from .. import _loader  # noqa: F401  (loads _C)
from .._io import write_atomic
from .bench import DTYPES, SIZES, add_size_option

_ops = torch.ops.twolayer_ext


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m twolayer_ext.tune",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_size_option(
        p,
        f"repeatable; a name ({', '.join(SIZES)}) or four ints (default: seed, medium, large, narrow)",
    )
    p.add_argument(
        "--dtype",
        action="append",
        choices=["float32", "float64"],
        help="repeatable (default float32)",
    )
    p.add_argument(
        "--threads",
        action="append",
        type=int,
        help=f"repeatable (default {torch.get_num_threads()}, torch's)",
    )
    p.add_argument(
        "--bounded",
        action="store_true",
        help="measure within the first call's budget, not at each size's own N",
    )
    p.add_argument("--json", metavar="FILE", help="every measurement, as a JSON list")
    args = p.parse_args(argv)
    if any(t < 1 for t in args.threads or []):
        p.error("--threads must be positive")
    args.size = args.size or [(n, SIZES[n]) for n in ("seed", "medium", "large", "narrow")]
    args.dtype = args.dtype or ["float32"]
    args.threads = args.threads or [torch.get_num_threads()]
    return args


def main(argv=None):
    args = parse_args(argv)
    rows = []
    print(
        f"{'size':<10} {'dtype':<8} {'threads':>7}  {'pick':<14} {'rows':>6} {'cost ms':>8}  times per step"
    )
    for threads in args.threads:
        torch.set_num_threads(threads)
        for dtype in args.dtype:
            for name, shape in args.size:
                r = json.loads(_ops.cpu_kernel_tune(list(shape), DTYPES[dtype], not args.bounded))
                r.update(size=name, shape=list(shape), dtype=dtype, threads=threads)
                rows.append(r)
                times = ", ".join(f"{k} {v:,.0f} us" for k, v in r["us"].items())
                if r["busy_core"]:
                    times += " (a core was busy: not written to the wisdom file)"
                elif r["trials"]:
                    times += (
                        f"; then {r['trials']} trials at full size in the first whole-step calls"
                        " decide (not written until then)"
                    )
                print(
                    f"{name:<10} {dtype:<8} {threads:>7}  {r['pick']:<14} {r['rows']:>6} "
                    f"{r['cost_ms']:>8.1f}  {times}",
                    flush=True,
                )
    print(f"wisdom: {rows[-1]['wisdom'] or 'off (TWOLAYER_WISDOM=off: in memory only)'}")
    if args.json:
        write_atomic(args.json, lambda f: f.write(json.dumps(rows, indent=1).encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
