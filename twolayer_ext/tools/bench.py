"""Benchmark harness: time one training step of every training recipe, in one run, as ratios.

    python -m twolayer_ext.bench                       # seed, medium, large, narrow; float32
    python -m twolayer_ext.bench --size seed --size 128,256,64,8 --dtype float64 --json out.json
    python -m twolayer_ext.bench --busy 1              # the same with one core kept busy

The recipes are twolayer_ext.tools.recipes' (the training CLI draws from the same registry):
every one trains the same problem (weights scaled by 1/sqrt(fan_in) so that the loss stays
finite at every size; the tutorial's unscaled draw overflows at the large sizes) from the same
initial arrays. Timing is torch.utils.benchmark (which synchronises CUDA), in interleaved rounds:
each round times every recipe once (numpy in rounds of its own after the others, so that
OpenBLAS's spinning threads do not steal cores from them), and the table reports the median over
rounds with its interquartile range. Ratios are against nn.Module with the same optimizer. A
recipe whose loss goes non-finite is reported as such, not timed; one whose warm-up step takes
over SLOW_STEP_S seconds is skipped. --json is rewritten (whole) after every size, so a run cut
short keeps what it measured. --plot draws a roofline: GFLOP/s against arithmetic intensity,
under the measured GEMM ceiling and memory bandwidth.
"""

import argparse
import contextlib
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch
from torch.utils import benchmark

from . import recipes as B
from .. import reference as R
from .._io import write_atomic
from ..ops import cpu_kernel_info

SIZES = {
    "seed": (64, 1000, 100, 10),
    "medium": (512, 1024, 256, 64),
    "large": (4096, 1024, 1024, 256),
    "narrow": (65536, 64, 64, 16),
    "gpu_narrow": (1048576, 64, 64, 16),
    "gpu_large": (8192, 4096, 4096, 1024),
}
DEFAULT_SIZES = {
    "cpu": ["seed", "medium", "large", "narrow"],
    "cuda": ["seed", "gpu_narrow", "gpu_large"],
}
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}  # every one on CPU and CUDA
# A recipe whose warm-up step takes longer is skipped (the plain-loop reference kernels take
# ~10 s per step at the large size); the first call is not judged (lazy init, compilation).
SLOW_STEP_S = 2.0
# Warm-up calls at most while auto still tries candidates (a handful in practice).
MAX_TRIAL_CALLS = 32
ADAM_LR = 1e-3  # torch.optim.Adam's default


def step_flops(N, D_in, H, D_out):
    """Forward (2 GEMMs) + backward without grad_x (3 GEMMs)."""
    return 4 * N * D_in * H + 6 * N * H * D_out


def step_bytes(N, D_in, H, D_out, itemsize, bias=False):
    """A step's compulsory memory traffic: x and the target read once, every weight read and
    written once (the hidden activations kept on chip, as the fused narrow path does)."""
    weights = D_in * H + H * D_out + (H + D_out if bias else 0)
    return itemsize * (N * D_in + N * D_out + 2 * weights)


# ---- load: busy-loop helpers -------------------------------------------------------------------

# Spins until killed, or until its parent (the benchmark) is gone: a benchmark killed by a
# timeout must not leave spinning orphans behind.
_BUSY_LOOP = """import os, sys
parent = int(sys.argv[1])
while os.getppid() == parent:
    for _ in range(100_000):
        pass
"""


@contextlib.contextmanager
def busy_loops(k):
    """k processes that each keep one core busy until the block ends; yields the Popen list."""
    procs = []
    try:
        for _ in range(k):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", _BUSY_LOOP, str(os.getpid())],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        yield procs
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


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
    return 2 * n**3 / best / 1e9


def memory_bandwidth(device, threads):
    """GB/s of a large tensor copy (bytes read + bytes written), far past the caches."""
    n = 1 << (25 if device == "cpu" else 27)  # 128 MiB / 512 MiB of float32 per buffer
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    timer = benchmark.Timer("dst.copy_(src)", globals={"dst": dst, "src": src}, num_threads=threads)
    return 2 * src.numel() * src.element_size() / timer.timeit(5).median / 1e9


def finite(loss):
    return math.isfinite(float(loss))


def _timed_call(step, device):
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss = step()
    if device == "cuda":
        torch.cuda.synchronize()
    return loss, time.perf_counter() - t0


def measure(size_name, shape, dtype, device, names, args, progress):
    N, D_in, H, D_out = shape
    x, y, params = R.tutorial_data(N, D_in, H, D_out, seed=args.seed, bias=args.bias)
    params["w1"] /= math.sqrt(D_in)
    params["w2"] /= math.sqrt(H)
    sgd_lr = 1e-3 / (N * D_out)  # a small step for the sum loss: stays finite at every size
    steps, results = {}, {}
    cell = f"{size_name} {str(dtype).removeprefix('torch.')}"
    for name in names:
        spec = B.parse(name)
        missing = B.missing(name)  # named on the command line, e.g. sgd_step[tuned-avx512]
        if missing:
            results[name] = {"status": f"skipped ({missing})"}
            continue
        lr = sgd_lr if spec.optimizer == "sgd" else ADAM_LR
        progress(f"{cell} {name}: warm-up", line=True)
        step = B.build(name, B.Problem(x, y, params, lr, device=device, dtype=dtype)).step
        # Warm up for a while, not a count: the first second of a process runs slow here
        # (seen: 15-20 ms narrow steps that settle at 11 ms), and compile needs a few calls;
        # and while auto still tries its candidates at full size (a large step's first calls).
        calls, t_end, status = 0, time.perf_counter() + args.warmup, None
        while (
            calls < spec.recipe.warmup_calls
            or time.perf_counter() < t_end
            or (calls < MAX_TRIAL_CALLS and B.trying(name, shape, dtype, device))
        ):
            loss, one = _timed_call(step, device)
            calls += 1
            if calls > 1 and one > SLOW_STEP_S:
                status = f"skipped (a step takes {one:.1f} s > {SLOW_STEP_S:g} s)"
                break
        if status is None and not finite(loss):
            status = "non-finite loss"
        if status is not None:
            results[name] = {"status": status}
            continue
        number = max(1, int(args.min_time / max(one, 1e-7)))
        timer = benchmark.Timer("step()", globals={"step": step}, num_threads=args.threads)
        steps[name] = (step, timer, number)
        results[name] = {"times": []}
    # Interleaved rounds, the order rotated each round, so drifts hit every recipe alike. numpy
    # gets its rounds after the others: OpenBLAS's threads spin for a while after each call and
    # would take cores from whatever ran next (torch's OpenMP threads do the same to it).
    timed = list(steps)
    for group in ([n for n in timed if n != "numpy"], [n for n in timed if n == "numpy"]):
        for r in range(args.rounds if group else 0):
            order = group[r % len(group) :] + group[: r % len(group)]
            progress(f"{cell} round {r + 1}/{args.rounds}", line=True)
            for name in order:
                progress(f"{cell} round {r + 1}/{args.rounds} {name}")
                step, timer, number = steps[name]
                results[name]["times"].append(timer.timeit(number).mean)
    flops = step_flops(*shape)
    for name in timed:
        if not finite(steps[name][0]()):
            results[name] = {"status": "non-finite loss"}
            continue
        t = np.array(results[name].pop("times"))
        q1, med, q3 = np.percentile(t, [25, 50, 75])
        results[name].update(
            status="ok", median_us=med * 1e6, iqr_us=(q3 - q1) * 1e6, gflops=flops / med / 1e9
        )
    return results


# ---- command line ------------------------------------------------------------------------------


def _recipe_name(text):
    try:
        B.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _size(text):
    if text in SIZES:
        return text, SIZES[text]
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) <= 0:
        raise argparse.ArgumentTypeError(
            f"must be one of {', '.join(SIZES)} or four positive ints N,D_in,H,D_out; got {text!r}"
        )
    return text, shape


def add_size_option(p, help):
    """--size NAME|N,D_in,H,D_out, repeatable (the benchmark's and the tuner's)."""
    p.add_argument("--size", action="append", type=_size, metavar="NAME|N,D_in,H,D_out", help=help)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m twolayer_ext.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_size_option(p, f"repeatable; names: {', '.join(SIZES)}")
    p.add_argument(
        "--dtype", action="append", choices=list(DTYPES), help="repeatable (default float32)"
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--recipe",
        "--backend",
        dest="backend",
        action="append",
        type=_recipe_name,
        metavar="NAME",
        help="a training recipe, repeatable (default: every one); names: " + ", ".join(B.names()),
    )
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument(
        "--busy",
        type=int,
        default=0,
        metavar="K",
        help="run K busy-loop processes while timing (a contended machine; default 0)",
    )
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--min-time", type=float, default=0.1, help="seconds per timed block")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per recipe")
    p.add_argument("--bias", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="every number; rewritten after each size")
    p.add_argument("--plot", metavar="FILE.png", help="the roofline and the speedups")
    args = p.parse_args(argv)

    if args.threads < 1 or args.rounds < 1 or args.min_time <= 0:
        p.error(
            f"--threads, --rounds and --min-time must be positive, got {args.threads}, "
            f"{args.rounds} and {args.min_time}"
        )
    if args.warmup < 0 or args.busy < 0:
        p.error(f"--warmup and --busy must be >= 0, got {args.warmup} and {args.busy}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    # Checked before a run that takes a minute, not when it comes to drawing.
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        p.error("--plot needs matplotlib: pip install matplotlib")
    args.size = args.size or [(s, SIZES[s]) for s in DEFAULT_SIZES[args.device]]
    args.dtype = args.dtype or ["float32"]
    for opt in ("json", "plot"):
        path = getattr(args, opt)
        if path:
            try:
                open(path, "ab").close()
            except OSError as e:
                p.error(f"--{opt}: cannot write {path}: {e.strerror}")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    progress = Progress()

    def save():
        if args.json:
            text = json.dumps(report, indent=1).encode()
            write_atomic(args.json, lambda f: f.write(text))

    report = {
        "machine": machine_info(args.device),
        "threads": args.threads,
        "busy": args.busy,
        "device": args.device,
        "kernel": cpu_kernel_info(),
        "ceiling_gflops": {},
        "results": [],
    }
    with busy_loops(args.busy):
        progress("memory bandwidth", line=True)
        report["bandwidth_gbs"] = memory_bandwidth(args.device, args.threads)
        for dtype_name in args.dtype:
            dtype = DTYPES[dtype_name]
            progress(f"GEMM ceiling {dtype_name}", line=True)
            ceiling = gemm_ceiling(args.device, dtype, args.threads)
            report["ceiling_gflops"][dtype_name] = ceiling
            names = [
                n
                for n in (args.backend or B.names(device=args.device))
                if B.runs_on(n, args.device, dtype)
            ]
            for size_name, shape in args.size:
                results = measure(size_name, shape, dtype, args.device, names, args, progress)
                flops = step_flops(*shape)
                nbytes = step_bytes(*shape, torch.finfo(dtype).bits // 8, args.bias)
                for name, r in results.items():
                    if r.get("status") == "ok":
                        base = results.get(B.baseline(name), {}).get("median_us")
                        r["pct_ceiling"] = 100 * r["gflops"] / ceiling
                        r["speedup_vs_module"] = base / r["median_us"] if base else None
                    report["results"].append(
                        {
                            "size": size_name,
                            "shape": shape,
                            "dtype": dtype_name,
                            "variant": B.variant_ran(name, shape, dtype, args.device),
                            "mflop_per_step": flops / 1e6,
                            "mbyte_per_step": nbytes / 1e6,
                            "flop_per_byte": flops / nbytes,
                            "backend": name,
                            **r,
                        }
                    )
                save()
    progress.close()
    print_table(report)
    if args.plot:
        plot(report, args.plot)


class Progress:
    """What the benchmark is doing, on stderr: on a terminal, one line rewritten in place with
    every message; elsewhere (a log, a pipe), a line per message called with line=True: each
    (size, recipe) warm-up and each timing round, so a long run shows it is alive."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()

    def __call__(self, msg, line=False):
        if self.tty:
            self.stream.write(f"\r\033[K{msg}")
        elif line:
            self.stream.write(f"bench: {msg}\n")
        else:
            return
        self.stream.flush()

    def close(self):
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()


def machine_info(device):
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
    }
    # The wisdom file's name for the CPU: a VM may show one model name for several generations.
    info["cpu"] = torch.ops.twolayer_ext.cpu_name()
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def print_table(report):
    m = report["machine"]
    print(
        f"# {m.get('gpu', m['cpu'])}, {report['threads']} threads, {report['busy']} busy "
        f"process(es); torch {m['torch']}, numpy {m['numpy']}; ours: {report['kernel']}"
    )
    print(
        "# GEMM ceiling (best of torch and numpy): "
        + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in report["ceiling_gflops"].items())
        + f"; memory bandwidth (copy) {report['bandwidth_gbs']:.1f} GB/s"
    )
    header = [
        "size",
        "dtype",
        "recipe",
        "variant",
        "median us",
        "IQR us",
        "GFLOP/s",
        "% ceil",
        "x module",
    ]
    rows = []
    for r in report["results"]:
        head = [r["size"], r["dtype"], r["backend"], r.get("variant", "-")]
        if r.get("status") != "ok":
            rows.append(head + [r["status"]])
            continue
        sp = f"{r['speedup_vs_module']:.2f}" if r.get("speedup_vs_module") else "-"
        rows.append(
            head
            + [
                f"{r['median_us']:,.0f}",
                f"{r['iqr_us']:,.0f}",
                f"{r['gflops']:.1f}",
                f"{r['pct_ceiling']:.0f}%",
                sp,
            ]
        )
    print(format_table(header, rows, left=4))


def format_table(header, rows, left):
    """The lines of a table whose columns are as wide as their widest cell: the first `left`
    columns flush left, the rest flush right. A row may end in one cell that spans the rest
    (a status such as "non-finite loss"); it does not widen the columns it spans."""
    n = len(header)
    width = [
        max([len(header[c])] + [len(row[c]) for row in rows if len(row) == n or c < len(row) - 1])
        for c in range(n)
    ]

    def line(cells):
        out = [
            f"{v:<{width[c]}}" if c < left else f"{v:>{width[c]}}" for c, v in enumerate(cells[:n])
        ]
        if len(cells) < n:  # a spanning last cell: flush left after the fixed columns
            out[-1] = cells[-1]
        return " ".join(out).rstrip()

    return "\n".join([line(header)] + [line(r) for r in rows])


def plot(report, path):
    """Top: a roofline per dtype (each recipe's GFLOP/s per size at the size's arithmetic
    intensity, under min(ceiling, bandwidth x intensity)). Bottom: speedups over nn.Module."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["results"] if r.get("status") == "ok"]
    dtypes = list(report["ceiling_gflops"])
    backends = list(dict.fromkeys(r["backend"] for r in ok))
    colors = {b: plt.cm.tab20(i % 20) for i, b in enumerate(backends)}
    fig = plt.figure(figsize=(max(9, 4.5 * len(dtypes)), 8.5))
    grid = fig.add_gridspec(2, len(dtypes))
    bw = report["bandwidth_gbs"]
    for col, dtype in enumerate(dtypes):
        ax = fig.add_subplot(grid[0, col])
        rows = [r for r in ok if r["dtype"] == dtype]
        ceiling = report["ceiling_gflops"][dtype]
        ai = [r["flop_per_byte"] for r in rows] or [1.0]
        xs = np.logspace(math.log10(min(ai) / 4), math.log10(max(ai) * 4), 200)
        ax.loglog(xs, np.minimum(ceiling, bw * xs), color="black", lw=1.5)
        ax.text(
            xs[-1],
            ceiling,
            f"GEMM ceiling {ceiling:.0f} GFLOP/s",
            ha="right",
            va="bottom",
            fontsize=7,
        )
        ax.text(
            xs[0],
            bw * xs[0],
            f"  copy {bw:.0f} GB/s",
            ha="left",
            va="bottom",
            fontsize=7,
            rotation=30,
        )
        for b in backends:
            pts = [r for r in rows if r["backend"] == b]
            ax.scatter(
                [r["flop_per_byte"] for r in pts],
                [r["gflops"] for r in pts],
                color=colors[b],
                s=22,
                label=b,
                zorder=3,
            )
        for size, a in dict.fromkeys((r["size"], r["flop_per_byte"]) for r in rows):
            ax.annotate(
                size,
                (a, ceiling),
                xytext=(0, -12),
                textcoords="offset points",
                ha="center",
                fontsize=7,
                color="0.4",
            )
            ax.axvline(a, color="0.85", lw=0.8, zorder=0)
        ax.set_xlabel("arithmetic intensity (flop per compulsory byte)")
        ax.set_ylabel("GFLOP/s")
        ax.set_title(f"roofline, {dtype}", fontsize=9)
        ax.grid(True, which="major", alpha=0.3)
    bx = fig.add_subplot(grid[1, :])
    ratios = [r for r in ok if r.get("speedup_vs_module")]
    groups = list(dict.fromkeys((r["size"], r["dtype"]) for r in ratios))
    width = 0.8 / max(len(backends), 1)
    for i, b in enumerate(backends):
        pts = [
            (g, r["speedup_vs_module"])
            for g, key in enumerate(groups)
            for r in ratios
            if r["backend"] == b and (r["size"], r["dtype"]) == key
        ]
        bx.bar(
            [g + i * width for g, _ in pts], [v for _, v in pts], width, color=colors[b], label=b
        )
    bx.axhline(1.0, color="black", linewidth=0.8)
    bx.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    bx.set_xticklabels([f"{s}\n{d}" for s, d in groups])
    bx.set_ylabel("speedup over nn.Module, same optimizer (x)")
    bx.set_yscale("log")
    bx.legend(fontsize=7, ncol=4)
    fig.suptitle(
        f"one training step, {report['device']}, {report['threads']} threads, "
        f"{report['busy']} busy",
        fontsize=10,
    )
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


if __name__ == "__main__":
    main()
