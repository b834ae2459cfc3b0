"""Benchmark harness: time one training step of every backend, in one run, as ratios.

    python -m twolayer_ext.bench                       # seed, medium, large, narrow; float32
    python -m twolayer_ext.bench --size seed --size 128,256,64,8 --dtype float64 --json out.json

Every backend trains the same problem (weights scaled by 1/sqrt(fan_in) so that the loss stays
finite at every size; the tutorial's unscaled draw overflows at the large sizes) from the same
initial arrays. Timing is torch.utils.benchmark (which synchronises CUDA), in interleaved rounds:
each round times every backend once (numpy in rounds of its own after the others, so that
OpenBLAS's spinning threads do not steal cores from them), and the table reports the median over
rounds with its interquartile range. A backend whose loss goes non-finite is reported as such, not timed.
"""
import argparse
import json
import math
import platform
import sys
import time

import numpy as np
import torch
from torch import nn
from torch.utils import benchmark

from . import reference as R
from .ops import cpu_kernel_info, l2_loss, sgd_step, two_layer, use_cpu_kernel

SIZES = {
    "seed": (64, 1000, 100, 10),
    "medium": (512, 1024, 256, 64),
    "large": (4096, 1024, 1024, 256),
    "narrow": (65536, 64, 64, 16),
    "gpu_narrow": (1048576, 64, 64, 16),
    "gpu_large": (8192, 4096, 4096, 1024),
}
DEFAULT_SIZES = {"cpu": ["seed", "medium", "large", "narrow"],
                 "cuda": ["seed", "gpu_narrow", "gpu_large"]}
DTYPES = {"float32": torch.float32, "float64": torch.float64,
          "bfloat16": torch.bfloat16, "float16": torch.float16}
BASELINE = "module"


def step_flops(N, D_in, H, D_out):
    """Forward (2 GEMMs) + backward without grad_x (3 GEMMs)."""
    return 4 * N * D_in * H + 6 * N * H * D_out


# ---- backends: each builds its own copy of the state and returns step() -> loss -------------

def _torch_xy(x, y, device, dtype):
    return tuple(torch.tensor(a, device=device).to(dtype) for a in (x, y))


def _torch_state(p, device, dtype, requires_grad=False):
    return {k: None if v is None else
            torch.tensor(v, device=device).to(dtype).requires_grad_(requires_grad)
            for k, v in p.items()}


def make_numpy(x, y, params, lr, device, dtype):
    np_dtype = {torch.float32: np.float32, torch.float64: np.float64}[dtype]
    x, y = x.astype(np_dtype), y.astype(np_dtype)
    p = {k: None if v is None else v.astype(np_dtype) for k, v in params.items()}
    return lambda: R.numpy_sgd_step(x, y, p, lr)


def make_manual(x, y, params, lr, device, dtype):
    xt, yt = _torch_xy(x, y, device, dtype)
    p = _torch_state(params, device, dtype)
    return lambda: R.manual_sgd_step(xt, yt, p, lr)


def make_autograd(x, y, params, lr, device, dtype):
    xt, yt = _torch_xy(x, y, device, dtype)
    p = _torch_state(params, device, dtype, requires_grad=True)
    return lambda: R.autograd_sgd_step(xt, yt, p, lr)


def make_module(x, y, params, lr, device, dtype):
    """What a PyTorch user writes: nn.Sequential + MSELoss(sum) + torch.optim.SGD."""
    xt, yt = _torch_xy(x, y, device, dtype)
    bias = params["b1"] is not None
    D_in, H = params["w1"].shape
    D_out = params["w2"].shape[1]
    model = nn.Sequential(nn.Linear(D_in, H, bias=bias), nn.ReLU(), nn.Linear(H, D_out, bias=bias))
    model.to(device=device, dtype=dtype)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(params["w1"].T))
        model[2].weight.copy_(torch.tensor(params["w2"].T))
        if bias:
            model[0].bias.copy_(torch.tensor(params["b1"]))
            model[2].bias.copy_(torch.tensor(params["b2"]))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.MSELoss(reduction="sum")

    def step():
        opt.zero_grad()
        loss = loss_fn(model(xt), yt)
        loss.backward()
        opt.step()
        return loss.detach()
    return step


def _manual_step(x, y, w1, w2, b1, b2, lr: float):
    h, h_relu, y_pred = R.manual_forward(x, w1, w2, b1, b2)
    diff = y_pred - y
    grads = R.manual_backward(x, w1, w2, h, h_relu, 2.0 * diff)
    w1.sub_(lr * grads["w1"])
    w2.sub_(lr * grads["w2"])
    if b1 is not None:
        b1.sub_(lr * grads["b1"])
        b2.sub_(lr * grads["b2"])
    return diff.pow(2).sum()


def make_compile(x, y, params, lr, device, dtype):
    """torch.compile (inductor, default mode) of the tutorial's manual step."""
    xt, yt = _torch_xy(x, y, device, dtype)
    p = _torch_state(params, device, dtype)
    fn = torch.compile(_manual_step, fullgraph=True)
    return lambda: fn(xt, yt, p["w1"], p["w2"], p["b1"], p["b2"], lr)


def make_ext_autograd(x, y, params, lr, device, dtype):
    """two_layer + l2_loss + autograd + an in-place SGD update."""
    xt, yt = _torch_xy(x, y, device, dtype)
    p = _torch_state(params, device, dtype, requires_grad=True)
    weights = [w for w in p.values() if w is not None]

    def step():
        loss = l2_loss(two_layer(xt, p["w1"], p["w2"], p["b1"], p["b2"]), yt)
        grads = torch.autograd.grad(loss, weights)
        with torch.no_grad():
            torch._foreach_add_(weights, grads, alpha=-lr)
        return loss.detach()
    return step


def make_sgd_step(variant):
    def make(x, y, params, lr, device, dtype):
        xt, yt = _torch_xy(x, y, device, dtype)
        p = _torch_state(params, device, dtype)

        def step():
            return sgd_step(xt, yt, p["w1"], p["w2"], p["b1"], p["b2"], lr=lr)

        if variant == "tuned":  # the default: no switching inside the timed call
            return step

        def step_with_variant():
            with use_cpu_kernel(variant):
                return step()
        return step_with_variant
    return make


def make_gemm_floor(x, y, params, lr, device, dtype):
    """Not a training step: the five bare torch.mm calls of one (BLAS / cuBLAS), as a floor."""
    xt, yt = _torch_xy(x, y, device, dtype)
    w1, w2 = (torch.tensor(params[k], device=device).to(dtype) for k in ("w1", "w2"))
    N, H, D_out = xt.shape[0], w1.shape[1], w2.shape[1]
    h = torch.empty(N, H, device=device, dtype=dtype)
    out = torch.empty(N, D_out, device=device, dtype=dtype)
    gh = torch.empty_like(h)
    gw1, gw2 = torch.empty_like(w1), torch.empty_like(w2)

    def step():
        torch.mm(xt, w1, out=h)
        torch.mm(h, w2, out=out)
        torch.mm(h.t(), yt, out=gw2)
        torch.mm(yt, w2.t(), out=gh)
        torch.mm(xt.t(), gh, out=gw1)
        return torch.zeros((), device=device)
    return step


BACKENDS = {
    "numpy": make_numpy,
    "manual": make_manual,
    "autograd": make_autograd,
    "module": make_module,
    "compile": make_compile,
    "ext_autograd": make_ext_autograd,
    "sgd_step": make_sgd_step("tuned"),
    "sgd_step[reference]": make_sgd_step("reference"),
    "gemm_floor": make_gemm_floor,
}
NOT_ON = {"cuda": {"numpy", "sgd_step[reference]"}}
NOT_FOR_DTYPE = {torch.bfloat16: {"numpy"}, torch.float16: {"numpy"}}
# The plain-loop reference runs at a few GFLOP/s: skip it where one step takes many seconds.
REFERENCE_MAX_FLOPS = 3e9


# ---- measurement -------------------------------------------------------------------------------

def gemm_ceiling(device, dtype, threads):
    """GFLOP/s of the best of torch.mm and numpy on an n^3 GEMM (n = 2048 CPU, 8192 CUDA)."""
    n = 2048 if device == "cpu" else 8192
    a = torch.randn(n, n, device=device).to(dtype)
    timer = benchmark.Timer("torch.mm(a, a)", globals={"torch": torch, "a": a}, num_threads=threads)
    best = timer.timeit(3).median
    if device == "cpu" and dtype in (torch.float32, torch.float64):
        an = a.numpy()
        timer = benchmark.Timer("np.dot(an, an)", globals={"np": np, "an": an}, num_threads=threads)
        best = min(best, timer.timeit(3).median)
    return 2 * n ** 3 / best / 1e9


def finite(loss):
    return math.isfinite(float(loss))


def measure(size_name, shape, dtype, device, backends, args, progress):
    N, D_in, H, D_out = shape
    x, y, params = R.tutorial_data(N, D_in, H, D_out, seed=args.seed, bias=args.bias)
    params["w1"] /= math.sqrt(D_in)
    params["w2"] /= math.sqrt(H)
    lr = 1e-3 / (N * D_out)  # a small step for the sum loss: stays finite at every size
    flops = step_flops(*shape)
    steps, results = {}, {}
    for name in backends:
        if name == "sgd_step[reference]" and flops > REFERENCE_MAX_FLOPS:
            results[name] = {"status": f"skipped (> {REFERENCE_MAX_FLOPS:.0e} flop per step)"}
            continue
        progress(f"{size_name} {name}: warm-up")
        step = BACKENDS[name](x, y, params, lr, device, dtype)
        # Warm up for a while, not a count: the first second of a process runs slow here
        # (seen: 15-20 ms narrow steps that settle at 11 ms), and compile needs a few calls.
        loss, calls, t_end = None, 0, time.perf_counter() + args.warmup
        while calls < (5 if name == "compile" else 2) or time.perf_counter() < t_end:
            loss = step()
            calls += 1
        if not finite(loss):
            results[name] = {"status": "non-finite loss"}
            continue
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        one = time.perf_counter() - t0
        number = max(1, int(args.min_time / max(one, 1e-7)))
        timer = benchmark.Timer("step()", globals={"step": step}, num_threads=args.threads)
        steps[name] = (step, timer, number)
        results[name] = {"times": []}
    # Interleaved rounds, the order rotated each round, so drifts hit every backend alike. numpy
    # gets its rounds after the others: OpenBLAS's threads spin for a while after each call and
    # would take cores from whatever ran next (torch's OpenMP threads do the same to it).
    names = list(steps)
    for group in ([n for n in names if n != "numpy"], [n for n in names if n == "numpy"]):
        for r in range(args.rounds if group else 0):
            order = group[r % len(group):] + group[:r % len(group)]
            for name in order:
                progress(f"{size_name} round {r + 1}/{args.rounds} {name}")
                step, timer, number = steps[name]
                results[name]["times"].append(timer.timeit(number).mean)
    for name in names:
        if not finite(steps[name][0]()):
            results[name] = {"status": "non-finite loss"}
            continue
        t = np.array(results[name]["times"])
        q1, med, q3 = np.percentile(t, [25, 50, 75])
        results[name].update(status="ok", median_us=med * 1e6, iqr_us=(q3 - q1) * 1e6,
                             gflops=flops / med / 1e9)
    return flops, results


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m twolayer_ext.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", action="append", metavar="NAME|N,D_in,H,D_out",
                   help=f"repeatable; names: {', '.join(SIZES)}")
    p.add_argument("--dtype", action="append", choices=list(DTYPES), help="repeatable (default float32)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--backend", action="append", choices=list(BACKENDS), help="repeatable (default all)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--min-time", type=float, default=0.1, help="seconds per timed block")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per backend")
    p.add_argument("--bias", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--plot", metavar="FILE.png")
    args = p.parse_args(argv)

    def fail(msg):
        p.error(msg)

    if args.threads < 1 or args.rounds < 1 or args.min_time <= 0 or args.warmup < 0:
        fail("--threads, --rounds and --min-time must be positive, --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA device is available")
    sizes = []
    for s in args.size or DEFAULT_SIZES[args.device]:
        if s in SIZES:
            sizes.append((s, SIZES[s]))
            continue
        try:
            shape = tuple(int(v) for v in s.split(","))
        except ValueError:
            shape = ()
        if len(shape) != 4 or min(shape) <= 0:
            fail(f"--size must be one of {', '.join(SIZES)} or four positive ints N,D_in,H,D_out; got {s!r}")
        sizes.append((s, shape))
    dtypes = [DTYPES[d] for d in (args.dtype or ["float32"])]
    for dt in dtypes:
        if args.device == "cpu" and dt not in (torch.float32, torch.float64):
            fail(f"--dtype {dt}: the CPU kernels take float32 and float64")
    if args.plot:
        try:
            open(args.plot, "ab").close()
        except OSError as e:
            fail(f"--plot: cannot write {args.plot}: {e.strerror}")
    torch.set_num_threads(args.threads)

    tty = sys.stderr.isatty()

    def progress(msg):
        if tty:
            sys.stderr.write(f"\r\033[K{msg}")
            sys.stderr.flush()

    report = {"machine": machine_info(args.device), "threads": args.threads, "device": args.device,
              "kernel": cpu_kernel_info(), "results": []}
    for dtype in dtypes:
        progress(f"GEMM ceiling {dtype}")
        ceiling = gemm_ceiling(args.device, dtype, args.threads)
        report.setdefault("ceiling_gflops", {})[str(dtype).replace("torch.", "")] = ceiling
        for size_name, shape in sizes:
            backends = [b for b in (args.backend or BACKENDS)
                        if b not in NOT_ON.get(args.device, ()) and b not in NOT_FOR_DTYPE.get(dtype, ())]
            flops, results = measure(size_name, shape, dtype, args.device, backends, args, progress)
            base = results.get(BASELINE, {}).get("median_us")
            for name, r in results.items():
                if r.get("status") == "ok":
                    r["pct_ceiling"] = 100 * r["gflops"] / ceiling
                    r["speedup_vs_module"] = base / r["median_us"] if base else None
                r.pop("times", None)
                report["results"].append({"size": size_name, "shape": shape,
                                           "dtype": str(dtype).replace("torch.", ""),
                                           "mflop_per_step": flops / 1e6, "backend": name, **r})
    if tty:
        sys.stderr.write("\r\033[K")
    print_table(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.plot:
        plot(report, args.plot)


def machine_info(device):
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "platform": platform.platform()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def print_table(report):
    m = report["machine"]
    print(f"# {m.get('gpu', m['cpu'])}, {report['threads']} threads; torch {m['torch']}, numpy {m['numpy']}; "
          f"ours: {report['kernel']}")
    print("# GEMM ceiling (best of torch and numpy): " +
          ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in report["ceiling_gflops"].items()))
    print(f"{'size':<14} {'dtype':<8} {'backend':<20} {'median us':>11} {'IQR us':>9} "
          f"{'GFLOP/s':>8} {'% ceil':>7} {'x module':>9}")
    for r in report["results"]:
        if r.get("status") != "ok":
            print(f"{r['size']:<14} {r['dtype']:<8} {r['backend']:<20} {r['status']}")
            continue
        sp = f"{r['speedup_vs_module']:.2f}" if r.get("speedup_vs_module") else "-"
        print(f"{r['size']:<14} {r['dtype']:<8} {r['backend']:<20} {r['median_us']:>11,.0f} "
              f"{r['iqr_us']:>9,.0f} {r['gflops']:>8.1f} {r['pct_ceiling']:>6.0f}% {sp:>9}")


def plot(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["results"] if r.get("status") == "ok" and r.get("speedup_vs_module")]
    groups = list(dict.fromkeys((r["size"], r["dtype"]) for r in ok))
    backends = list(dict.fromkeys(r["backend"] for r in ok))
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(groups)), 4))
    width = 0.8 / max(len(backends), 1)
    for i, b in enumerate(backends):
        xs, ys = [], []
        for g, (size, dtype) in enumerate(groups):
            for r in ok:
                if r["backend"] == b and r["size"] == size and r["dtype"] == dtype:
                    xs.append(g + i * width)
                    ys.append(r["speedup_vs_module"])
        ax.bar(xs, ys, width, label=b)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"{s}\n{d}" for s, d in groups])
    ax.set_ylabel("speedup over nn.Module + SGD (x)")
    ax.set_yscale("log")
    ax.set_title(f"one training step, {report['device']}, {report['threads']} threads")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
