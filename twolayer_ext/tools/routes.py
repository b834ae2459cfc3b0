"""Where a training step's time goes, route by route, in one interleaved run.

    python -m twolayer_ext.routes                              # seed, medium, large, narrow, mlp, 1x1
    python -m twolayer_ext.routes --size seed --threads 1 --threads 2 --dtype float64
    python -m twolayer_ext.routes --busy 1                     # with one core kept busy

Per size, dtype and thread count, medians over interleaved rounds (microseconds per call):
  sgd_step     the one-call step (forward, loss, backward, SGD update);
  fused f+b    TwoLayerNet.loss + backward, no optimizer (grads set to None before each);
  seq f+b      nn.Sequential + MSELoss(sum) + backward, no optimizer;
  SGD, SGD foreach, Adam, Adam foreach, Adam fused
               the optimizer's step alone on the four parameters, torch's defaults and the
               opt-in CPU implementations (the same on both routes: ratios compare like with like);
  floor        the step's five GEMMs alone (torch.mm), what no unfused step beats;
  bwd floor    torch's least backward, (w * 2).sum().backward() for a one-element leaf w: what
               any loss.backward() costs on this machine (torch's Python and its engine) before
               a gradient is computed, with its code and data in cache.
Ratios: fused f+b / sgd_step (the fused loss's cost against the one-call step) and
(seq f+b + SGD) / (fused f+b + SGD) (the drop-in route against nn.Sequential, same SGD).
The mlp size (256, 512, 256, 16) also times a whole AdamW + clip_grad_norm_ step both ways.
"""

import argparse
import statistics
import sys
import time

import torch
from torch import nn

from .. import TwoLayerNet, sgd_step
from .recipes import five_gemms
from .bench import DTYPES, _size, busy_loops
from .bench import SIZES as BENCH_SIZES

SIZES = {**BENCH_SIZES, "mlp": (256, 512, 256, 16), "1x1": (1, 1, 1, 1)}
OPTIMIZERS = {
    "SGD": lambda p: torch.optim.SGD(p, lr=1e-9),
    "SGD foreach": lambda p: torch.optim.SGD(p, lr=1e-9, foreach=True),
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-9),
    "Adam foreach": lambda p: torch.optim.Adam(p, lr=1e-9, foreach=True),
    "Adam fused": lambda p: torch.optim.Adam(p, lr=1e-9, fused=True),
}


def _problem(shape, dtype):
    N, D_in, H, D_out = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D_in, generator=g, dtype=dtype)
    y = torch.randn(N, D_out, generator=g, dtype=dtype)
    net = TwoLayerNet(D_in, H, D_out, dtype=dtype)
    return x, y, net


def _calls(shape, dtype):
    """name -> a no-argument call, each timed on its own copy of the problem."""
    x, y, net = _problem(shape, dtype)
    seq = net.to_sequential()
    w1, w2 = net.w1.detach().clone(), net.w2.detach().clone()
    b1, b2 = net.b1.detach().clone(), net.b2.detach().clone()
    mse = nn.MSELoss(reduction="sum")

    def fused_fb():
        for p in net.parameters():
            p.grad = None
        net.loss(x, y, "sum").backward()

    def seq_fb():
        for p in seq.parameters():
            p.grad = None
        mse(seq(x), y).backward()

    leaf = torch.zeros(1, dtype=dtype, requires_grad=True)

    def bwd_floor():
        leaf.grad = None
        (leaf * 2).sum().backward()

    calls = {
        "sgd_step": lambda: sgd_step(x, y, w1, w2, b1, b2, lr=1e-9),
        "fused f+b": fused_fb,
        "seq f+b": seq_fb,
        "floor": five_gemms(x, y, w1, w2),
        "bwd floor": bwd_floor,
    }
    opt_net = TwoLayerNet(*shape[1:], dtype=dtype)
    for p in opt_net.parameters():
        p.grad = torch.randn_like(p)
    for name, make in OPTIMIZERS.items():
        calls[name] = make(opt_net.parameters()).step
    if shape == SIZES["mlp"]:
        calls["seq AdamW step"], calls["fused AdamW step"] = _adamw_steps(x, y, net, seq)
    return calls


def _adamw_steps(x, y, net, seq):
    """A newcomer's training step both ways: loss, backward, clip_grad_norm_, AdamW."""

    def make(model, loss_of):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-9)

        def step():
            opt.zero_grad()
            loss_of().backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

        return step

    mse = nn.MSELoss()
    return (make(seq, lambda: mse(seq(x), y)), make(net, lambda: net.loss(x, y, "mean")))


def measure(calls, rounds, block_s):
    """Median microseconds per call of each, over interleaved rounds of ~block_s each."""
    reps = {}
    for name, f in calls.items():  # warm-up, and how many calls fill a block
        f()
        fastest = float("inf")
        for _ in range(3):  # the fastest of three: one call stalled by a busy core sets no count
            t0 = time.perf_counter()
            f()
            fastest = min(fastest, time.perf_counter() - t0)
        reps[name] = max(1, int(block_s / max(fastest, 1e-7)))
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, f in calls.items():
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                f()
            times[name].append((time.perf_counter() - t0) / reps[name] * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m twolayer_ext.routes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--size", action="append", type=lambda s: (s, SIZES[s]) if s in SIZES else _size(s)
    )
    p.add_argument("--dtype", action="append", choices=["float32", "float64"])
    p.add_argument("--threads", action="append", type=int)
    p.add_argument("--busy", type=int, default=0)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--block", type=float, default=0.02, help="seconds per timed block")
    args = p.parse_args(argv)
    sizes = args.size or [
        (n, SIZES[n]) for n in ("seed", "medium", "large", "narrow", "mlp", "1x1")
    ]
    cols = ["sgd_step", "fused f+b", "seq f+b", "floor", "bwd floor", *OPTIMIZERS]
    print(f"# {torch.__version__}, busy processes: {args.busy}; microseconds per call (medians)")
    print(
        f"{'size':<8} {'dtype':<8} {'thr':>3} "
        + " ".join(f"{c:>12}" for c in cols)
        + f" {'f+b/sgd':>8} {'vs seq+SGD':>10}"
    )
    with busy_loops(args.busy):
        for threads in args.threads or [torch.get_num_threads()]:
            torch.set_num_threads(threads)
            for dtype in args.dtype or ["float32"]:
                for name, shape in sizes:
                    t = measure(_calls(shape, DTYPES[dtype]), args.rounds, args.block)
                    ratio = t["fused f+b"] / t["sgd_step"]
                    vs_seq = (t["seq f+b"] + t["SGD"]) / (t["fused f+b"] + t["SGD"])
                    print(
                        f"{name:<8} {dtype:<8} {threads:>3} "
                        + " ".join(f"{t[c]:>12,.1f}" for c in cols)
                        + f" {ratio:>8.2f} {vs_seq:>9.2f}x",
                        flush=True,
                    )
                    if "seq AdamW step" in t:
                        print(
                            f"{'':<8} {'':<8} {'':>3} AdamW + clip, whole step: nn.Sequential "
                            f"{t['seq AdamW step']:,.0f} us, TwoLayerNet.loss "
                            f"{t['fused AdamW step']:,.0f} us "
                            f"({t['seq AdamW step'] / t['fused AdamW step']:.2f}x); GEMM floor "
                            f"{t['floor']:,.0f} us"
                        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
