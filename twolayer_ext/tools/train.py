"""The training CLI: python -m twolayer_ext.train (installed as twolayer-train).

  --data random (default)  the tutorial's problem, trained by every --recipe (by default
                           the numpy oracle, torch by hand, autograd and our fused sgd_step;
                           any recipe of twolayer_ext.tools.recipes) from the same
                           arrays: a loss table, how far apart they are, time per step
  --data digits            TwoLayerNet on scikit-learn's handwritten digits (the fused loss +
                           torch.optim.SGD), test accuracy
  --ddp (under torchrun)   either data set with TwoLayerNet in DistributedDataParallel, each
                           global batch sharded across the ranks; rank 0 reports

Bad input gets one line on stderr and exit code 2 before anything runs; a loss that goes
non-finite stops the run with one line and exit code 1; output files are written whole (a
temporary file, then a rename) after training.
"""

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from . import recipes as B
from . import data as D
from .._io import write_atomic
from .._loader import available_devices
from ..module import TwoLayerNet
from ..ops import l2_loss

PROG = "twolayer_ext.train"
# The comparison trains with SGD at --lr: every training recipe of the registry can take part.
CHOICES = tuple(B.names(optimizers=("sgd",), training_only=True))
TUTORIAL = ("numpy", "manual", "autograd", "sgd_step")  # the default: the tutorial four ways
DTYPES = {"float32": (np.float32, torch.float32), "float64": (np.float64, torch.float64)}
# Defaults for options left unset, per data set. random: the tutorial exactly. digits: chosen
# so the default run reaches ~97-98% test accuracy in about a second of training.
DEFAULTS = {
    "random": dict(
        N=64,
        D_in=1000,
        H=100,
        D_out=10,
        lr=1e-6,
        steps=500,
        bias=False,
        dtype="float64",
        log_every=50,
    ),
    "digits": dict(N=32, H=100, lr=5e-3, epochs=20, bias=True, dtype="float32", log_every=1),
}
NOT_FOR = {"random": ("epochs",), "digits": ("D_in", "D_out", "steps", "backend")}


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit code 2."""


class Diverged(Exception):
    """A non-finite training loss: reported as one line, exit code 1."""


def _check_finite(loss, where, args):
    """Diverged unless loss is finite; where: the step, e.g. "step 4 of numpy"."""
    if not math.isfinite(loss):
        raise Diverged(
            f"stopped at {where}: the loss is {loss} (the run diverged: the "
            f"learning rate --lr {args.lr:g} is likely too large; try a smaller one)"
        )


# ---- arguments ---------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _number(convert, ok, expected):
    """An argparse type: convert(text), accepted when ok(value), else 'must be <expected>'."""

    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
        return value

    return parse


_positive_int = _number(int, lambda v: v > 0, "a positive integer")
_seed = _number(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _number(float, lambda v: 0 < v < math.inf, "a finite number > 0")


def _recipe_list(text):
    names = [n.strip() for n in text.split(",")]
    if names == ["all"]:
        return CHOICES
    for n in names:
        try:
            spec = B.parse(n)
        except ValueError:
            spec = None
        if spec is None or spec.optimizer != "sgd" or not spec.recipe.trains:
            what = f"unknown recipe {n!r}"
        elif B.missing(n):
            what = f"recipe {n!r} {B.missing(n)}, which this one lacks"
        else:
            continue
        raise argparse.ArgumentTypeError(
            f"{what} (choose from {', '.join(CHOICES)}, all, or a comma-separated list)"
        )
    return tuple(dict.fromkeys(names))


def build_parser():
    p = _Parser(
        prog=PROG,
        allow_abbrev=False,
        description=(
            "Train the tutorial's two-layer ReLU net: side by side on its random problem (numpy "
            "oracle, torch by hand, autograd, the fused ops), on scikit-learn's digits, or "
            "data-parallel under torchrun (--ddp)."
        ),
    )
    a = p.add_argument
    a(
        "--data",
        choices=("random", "digits"),
        default="random",
        help="random: the tutorial's randn problem (default); digits: 8x8 handwritten digits",
    )
    a(
        "--recipe",
        "--backend",
        dest="backend",
        type=_recipe_list,
        default=None,
        metavar="NAMES",
        help=f"random data only: the training recipes, a comma list of {', '.join(CHOICES)}, or all (default: "
        f"{','.join(TUTORIAL)})",
    )
    a(
        "--N",
        type=_positive_int,
        metavar="N",
        help="batch size (random: the whole problem, 64; digits: the mini-batch, 32)",
    )
    a("--D-in", dest="D_in", type=_positive_int, metavar="D", help="input size (random: 1000)")
    a("--H", type=_positive_int, metavar="H", help="hidden size (100)")
    a("--D-out", dest="D_out", type=_positive_int, metavar="D", help="output size (random: 10)")
    a("--lr", type=_positive_float, help="SGD learning rate (random: 1e-6; digits: 5e-3)")
    a("--steps", type=_positive_int, help="random data: SGD steps (500)")
    a("--epochs", type=_positive_int, help="digits: passes over the training set (20)")
    a(
        "--bias",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="biases b1, b2 (random: off, as in the tutorial; digits: on)",
    )
    a(
        "--reduction",
        choices=("sum", "mean"),
        default="sum",
        help="L2 loss over the batch: sum (the tutorial's, default) or mean",
    )
    a("--dtype", choices=tuple(DTYPES), help="random: float64; digits: float32")
    a(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the torch recipes run (numpy always runs on the CPU)",
    )
    a(
        "--threads",
        type=_positive_int,
        default=1,
        help="CPU threads for torch and numpy's BLAS (default 1: these sizes gain little from "
        "threads, and one thread times steadily on a shared machine)",
    )
    a("--seed", type=_seed, default=0, help="seed of the data, the initial weights and the split")
    a(
        "--log-every",
        dest="log_every",
        type=_positive_int,
        metavar="K",
        help="a table row every K steps (random: 50) or epochs (digits: 1), and the last",
    )
    a("--plot", metavar="FILE.png", help="write the loss curves as a PNG")
    a("--json", metavar="FILE", help="write the numbers as JSON")
    a(
        "--save",
        metavar="FILE.pt",
        help="torch.save the trained weights {w1, w2[, b1, b2]} "
        "(random: sgd_step's, or the first recipe's run)",
    )
    a("--ddp", action="store_true", help="data-parallel: start with torchrun --nproc_per_node=K")
    return p


def parse_args(argv=None):
    """Parses and checks everything that can be checked before training; UsageError if bad."""
    args = build_parser().parse_args(argv)
    for opt in NOT_FOR[args.data]:
        if getattr(args, opt) is not None:
            raise UsageError(f"--{opt.replace('_', '-')} does not apply to --data {args.data}")
    if args.ddp and args.backend is not None:
        raise UsageError(
            "--backend does not apply to --ddp (DDP trains TwoLayerNet through "
            "the fused loss and autograd)"
        )
    for name, value in DEFAULTS[args.data].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.data == "digits":
        args.D_in, args.D_out = D.DIGITS_FEATURES, D.DIGITS_CLASSES
    elif args.backend is None:
        args.backend = TUTORIAL

    if args.device == "cuda":
        if "cuda" not in available_devices():
            raise UsageError(
                f"--device cuda: this twolayer_ext build has no CUDA kernels "
                f"(it has: {', '.join(available_devices())})"
            )
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: torch sees no CUDA device")
    if args.ddp:
        from . import distributed

        if not distributed.launched_by_torchrun():
            raise UsageError(
                "--ddp must be started by torchrun, e.g. torchrun "
                "--nproc_per_node=2 -m twolayer_ext.train --ddp"
            )
    needs = [
        (
            "scikit-learn",
            "sklearn",
            "--data digits",
            "'twolayer_ext[digits]'",
            args.data == "digits",
        ),
        ("matplotlib", "matplotlib", "--plot", "matplotlib", args.plot),
    ]
    for package, module, opt, install, wanted in needs:
        if wanted and importlib.util.find_spec(module) is None:
            raise UsageError(f"{opt} needs {package}: pip install {install}")
    for opt, path, suffix in (
        ("--plot", args.plot, ".png"),
        ("--json", args.json, None),
        ("--save", args.save, None),
    ):
        if path is not None:
            _check_writable(opt, path, suffix)
    return args


def _check_writable(opt, path, suffix):
    p = Path(path)
    if suffix and p.suffix.lower() != suffix:
        raise UsageError(f"{opt} {path}: the file name must end in {suffix}")
    if p.is_dir():
        raise UsageError(f"{opt} {path}: is a directory")
    if not p.parent.is_dir():
        raise UsageError(f"{opt} {path}: the folder {p.parent} does not exist")
    try:
        fd, probe = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{opt} {path}: cannot write in {p.parent} ({e.strerror})") from None


# ---- output helpers ----------------------------------------------------------------------------


class Progress:
    """A one-line bar on stderr, only when stderr is a terminal."""

    def __init__(self, total, enabled=True):
        self.total, self.done, self.last = total, 0, 0.0
        self.enabled = enabled and sys.stderr.isatty()

    def advance(self, label):
        self.done += 1
        now = time.monotonic()
        if self.enabled and (now - self.last > 0.1 or self.done == self.total):
            self.last = now
            filled = 30 * self.done // self.total
            sys.stderr.write(
                f"\r{label:<16} [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total}"
            )
            sys.stderr.flush()

    def close(self):
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _finite_or_none(v):
    return v if math.isfinite(v) else None


def _write_outputs(args, summary, plot, weights):
    if args.json:
        text = json.dumps(summary, indent=1, allow_nan=False).encode()
        write_atomic(args.json, lambda f: f.write(text))
    if args.save:
        write_atomic(args.save, lambda f: torch.save(weights, f))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = _figure(plt, **plot)
        write_atomic(args.plot, lambda f: fig.savefig(f, format="png", dpi=100))
        plt.close(fig)
    for opt in ("plot", "json", "save"):
        if getattr(args, opt):
            print(f"wrote {getattr(args, opt)}")


def _clean(obj):
    """JSON-safe copy: non-finite floats become null."""
    if isinstance(obj, float):
        return _finite_or_none(obj)
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _config(args):
    keys = (
        "data",
        "N",
        "D_in",
        "H",
        "D_out",
        "lr",
        "steps",
        "epochs",
        "bias",
        "reduction",
        "dtype",
        "device",
        "threads",
        "seed",
    )
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def _us(seconds):
    return f"{1e6 * seconds:.1f} us"


def _rel_diff(values):
    """(max - min) / max |v| over the recipes' values; 0 for one recipe."""
    v = np.asarray(values, dtype=np.float64)
    scale = np.abs(v).max()
    return float((v.max() - v.min()) / scale) if scale > 0 else 0.0


def _weights_rel_diff(a, b):
    diffs = [
        np.abs(a[k].astype(np.float64) - b[k]).max() / max(np.abs(b[k]).max(), 1e-300)
        for k in a
        if a[k] is not None
    ]
    return float(max(diffs))


# ---- the training loop and the plot, shared by every run ---------------------------------------


def _train(step, count, where, args, progress, label, after=None):
    """Calls step(i) for i in range(count), timing each call: (losses, seconds), both lists.

    step(i) does one training step and returns the loss before it; where(i) names step i in
    the message of Diverged, raised at the first non-finite loss; after(i, loss), when given,
    runs after each step, outside the timing (a table row)."""
    losses, times = [], []
    for i in range(count):
        t0 = time.perf_counter()
        loss = float(step(i))
        times.append(time.perf_counter() - t0)
        _check_finite(loss, where(i), args)
        losses.append(loss)
        progress.advance(label)
        if after is not None:
            after(i, loss)
    return losses, times


def _logged(i, count, every):
    """Whether row i of count gets a table row: every `every`-th, and the last."""
    return i % every == 0 or i == count - 1


def _figure(
    plt,
    curves,
    *,
    xlabel,
    ylabel,
    title=None,
    side=None,
    figsize=(6, 3.6),
    width_ratios=None,
    legend_size=None,
    suptitle=None,
):
    """The plot of every run: the loss curves on a log scale, and a second panel drawn by
    side(axes) when given. curves: (label, x, y, matplotlib style) tuples."""
    if side is None:
        fig, ax = plt.subplots(figsize=figsize)
    else:
        fig, (ax, bx) = plt.subplots(
            1,
            2,
            figsize=figsize,
            gridspec_kw=({"width_ratios": width_ratios} if width_ratios else None),
        )
    for label, x, y, style in curves:
        ax.semilogy(x, np.abs(y), label=label, **style)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=legend_size)
    ax.grid(True, which="major", alpha=0.3)
    if side is not None:
        side(bx)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


# ---- the tutorial's problem, recipe by recipe --------------------------------------------------

_STYLES = {
    "numpy": dict(lw=5, alpha=0.35),
    "manual": dict(lw=2.5, ls="--"),
    "autograd": dict(lw=1.8, ls="-."),
    "sgd_step": dict(lw=1.2, color="black"),
}


def run_compare(args):
    np_dtype, torch_dtype = DTYPES[args.dtype]
    x, y, params = D.tutorial_problem(
        args.N, args.D_in, args.H, args.D_out, seed=args.seed, bias=args.bias, dtype=np_dtype
    )
    problem = B.Problem(x, y, params, args.lr, args.reduction, args.device, torch_dtype)
    names = args.backend
    print(
        f"{PROG}: the tutorial's problem N={args.N} D_in={args.D_in} H={args.H} "
        f"D_out={args.D_out}{' with bias' if args.bias else ''}, SGD lr={args.lr:g} on the "
        f"{args.reduction} L2 loss, {args.steps} steps, {args.dtype} on {args.device}, "
        f"seed {args.seed}"
    )
    progress = Progress(args.steps * len(names))
    losses, times, weights = {}, {}, {}
    try:
        # Overflow is reported by the finiteness check, not by numpy warnings.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            for name in names:
                runner = B.build(name, problem)
                losses[name], times[name] = _train(
                    lambda i: runner.step(),
                    args.steps,
                    lambda i: f"step {i} of {name}",
                    args,
                    progress,
                    name,
                )
                weights[name] = runner.weights()
    finally:
        progress.close()

    rel = [_rel_diff([losses[n][t] for n in names]) for t in range(args.steps)]
    width = {n: max(14, len(n) + 2) for n in names}
    header = f"{'step':>5}" + "".join(f"{n:>{width[n]}}" for n in names)
    print(header + (f"{'max rel diff':>14}" if len(names) > 1 else ""))
    rows = [t for t in range(args.steps) if _logged(t, args.steps, args.log_every)]
    for t in rows:
        line = f"{t:>5}" + "".join(f"{losses[n][t]:>{width[n]}.6e}" for n in names)
        print(line + (f"{rel[t]:>14.1e}" if len(names) > 1 else ""))

    median = {n: statistics.median(times[n]) for n in names}
    speedup = {n: median["autograd"] / median[n] if "autograd" in median else None for n in names}
    label = {n: B.label(n) for n in names}
    lw = max(16, *(len(v) + 2 for v in label.values()))
    print(f"\n{'recipe':<{lw}}{'final loss':>14}{'median step':>14}{'vs autograd':>13}")
    for n in names:
        sp = f"{speedup[n]:.2f}x" if speedup[n] is not None else "n/a"
        print(f"{label[n]:<{lw}}{losses[n][-1]:>14.6e}{_us(median[n]):>14}{sp:>13}")
    ref = names[0]
    w_rel = max((_weights_rel_diff(weights[n], weights[ref]) for n in names[1:]), default=0.0)
    max_rel = max(rel)
    if len(names) > 1:
        print(
            f"recipes agree: losses within {max_rel:.1e} (max rel diff over {args.steps} "
            f"steps), final weights within {w_rel:.1e} of {ref}"
        )

    summary = {
        "mode": "compare",
        "config": _config(args),
        "backends": {
            n: {
                "losses": losses[n],
                "final_loss": losses[n][-1],
                "median_step_s": median[n],
                "speedup_vs_autograd": speedup[n],
            }
            for n in names
        },
        "max_rel_diff": {"loss": max_rel, "weights": w_rel},
        "log_steps": rows,
    }
    keep = "sgd_step" if "sgd_step" in names else ref

    def speed(bx):
        bars = bx.barh(
            [label[n] for n in names],
            [1e6 * median[n] for n in names],
            color=["0.75" if n != "sgd_step" else "tab:blue" for n in names],
        )
        for bar, n in zip(bars, names):
            if speedup[n] is not None:
                bx.text(
                    bar.get_width(),
                    bar.get_y() + bar.get_height() / 2,
                    f" {speedup[n]:.1f}x",
                    va="center",
                    fontsize=8,
                )
        bx.invert_yaxis()
        bx.set_xlabel("median time per step (us)")
        bx.set_title(
            f"speed on {args.device}" + (" (vs autograd)" if "autograd" in names else ""),
            fontsize=9,
        )
        bx.margins(x=0.25)

    steps = np.arange(args.steps)
    plot = dict(
        curves=[(label[n], steps, losses[n], _STYLES.get(n, {})) for n in names],
        xlabel="SGD step",
        ylabel=f"L2 loss ({args.reduction}, log scale)",
        title=(
            f"N={args.N}, D_in={args.D_in}, H={args.H}, D_out={args.D_out}, "
            f"{args.dtype}; max rel diff {max_rel:.0e}"
        ),
        side=speed,
        figsize=(9, 3.6),
        width_ratios=[2.2, 1],
        legend_size=8,
    )
    return summary, plot, {k: torch.tensor(v) for k, v in weights[keep].items() if v is not None}


# ---- TwoLayerNet runs: digits, and anything under DDP ----------------------------------------


def _tutorial_weights(model):
    """What --save writes: {w1, w2[, b1, b2]} in the tutorial's layout, as every path saves."""
    return {
        k: getattr(model, k).detach().contiguous()
        for k in ("w1", "w2", "b1", "b2")
        if getattr(model, k) is not None
    }


def _stepper(args, model, world):
    """step(x, y) -> the loss before the step (a float): the fused loss (gradients made in its
    forward) + backward + torch.optim.SGD, data-parallel under DDP."""
    if world is not None:
        from .distributed import DataParallelSGD

        return DataParallelSGD(model, world, lr=args.lr, reduction=args.reduction).step
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        loss = model.loss(x, y, args.reduction)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def _how(world):
    return (
        f"DDP over {world.size} ranks ({'gloo' if world.device.type == 'cpu' else 'nccl'})"
        if world
        else "fused loss + SGD"
    )


def run_digits(args, world, say):
    _, torch_dtype = DTYPES[args.dtype]
    device = world.device if world else torch.device(args.device)
    data = D.load_digits(seed=args.seed, dtype=torch_dtype, device=device)
    torch.manual_seed(args.seed)
    model = TwoLayerNet(
        args.D_in, args.H, args.D_out, bias=args.bias, dtype=torch_dtype, device=device
    )
    step = _stepper(args, model, world)
    n_train, n_test = len(data.x_train), len(data.x_test)
    per_sample = (
        (lambda loss, rows: loss)
        if args.reduction == "sum"
        else (lambda loss, rows: loss * rows * D.DIGITS_CLASSES)
    )
    say(
        f"{PROG}: scikit-learn digits, {n_train} train / {n_test} test images, "
        f"64 -> {args.H} -> 10{' with bias' if args.bias else ''}, one-hot targets, SGD "
        f"lr={args.lr:g} on the {args.reduction} L2 loss, batch {args.N}, {args.epochs} epochs, "
        f"{args.dtype} on {device.type}, seed {args.seed}, {_how(world)}"
    )
    say(f"{'epoch':>5}{'train loss':>12}{'test loss':>11}{'test acc':>10}")
    batches = [
        [idx.to(device) for idx in D.epoch_batches(n_train, args.N, seed=args.seed, epoch=e)]
        for e in range(args.epochs)
    ]
    progress = Progress(sum(len(b) for b in batches), enabled=world is None or world.is_main)
    history, times = [], []
    try:
        for epoch, idxs in enumerate(batches, start=1):
            first = len(times)
            losses, epoch_times = _train(
                lambda i: step(data.x_train[idxs[i]], data.y_train[idxs[i]]),
                len(idxs),
                lambda i: f"step {first + i} (epoch {epoch})",
                args,
                progress,
                f"epoch {epoch}",
            )
            times += epoch_times
            total = 0.0
            for loss, idx in zip(losses, idxs):
                total += per_sample(loss, len(idx))
            with torch.no_grad():
                pred = model(data.x_test)
                test_loss = l2_loss(pred, data.y_test).item() / n_test
                correct = int((pred.argmax(1) == data.labels_test).sum())
            history.append(
                {
                    "epoch": epoch,
                    "train_loss": total / n_train,
                    "test_loss": test_loss,
                    "test_accuracy": correct / n_test,
                }
            )
            if epoch % args.log_every == 0 or epoch == args.epochs:
                progress.close()
                say(
                    f"{epoch:>5}{total / n_train:>12.4f}{test_loss:>11.4f}"
                    f"{100 * correct / n_test:>9.1f}%"
                )
    finally:
        progress.close()
    med = statistics.median(times)
    say(
        f"test accuracy {100 * correct / n_test:.1f}% ({correct}/{n_test}) after "
        f"{args.epochs} epochs; median {_us(med)} per step of {args.N}"
    )
    summary = {
        "mode": "digits",
        "config": _config(args),
        "world_size": world.size if world else 1,
        "epochs": history,
        "final_test_accuracy": correct / n_test,
        "median_step_s": med,
    }

    def accuracy(bx):
        bx.plot(epochs, [100 * h["test_accuracy"] for h in history], color="tab:green")
        bx.set_xlabel("epoch")
        bx.set_ylabel("test accuracy (%)")
        bx.grid(True, alpha=0.3)

    epochs = [h["epoch"] for h in history]
    plot = dict(
        curves=[
            (part, epochs, [h[f"{part}_loss"] for h in history], {}) for part in ("train", "test")
        ],
        xlabel="epoch",
        ylabel="L2 loss per image (log scale)",
        side=accuracy,
        figsize=(9, 3.4),
        suptitle=f"digits, 64-{args.H}-10, {_how(world)}",
    )
    return summary, plot, _tutorial_weights(model)


def run_random_ddp(args, world, say):
    np_dtype, torch_dtype = DTYPES[args.dtype]
    x, y, params = D.tutorial_problem(
        args.N, args.D_in, args.H, args.D_out, seed=args.seed, bias=args.bias, dtype=np_dtype
    )
    model = TwoLayerNet(
        args.D_in, args.H, args.D_out, bias=args.bias, dtype=torch_dtype, device=world.device
    )
    with torch.no_grad():
        for name, value in params.items():
            if value is not None:
                getattr(model, name).copy_(torch.from_numpy(value))
    step = _stepper(args, model, world)
    xt, yt = torch.tensor(x, device=world.device), torch.tensor(y, device=world.device)
    say(
        f"{PROG}: the tutorial's problem N={args.N} D_in={args.D_in} H={args.H} "
        f"D_out={args.D_out}{' with bias' if args.bias else ''}, SGD lr={args.lr:g} on the "
        f"{args.reduction} L2 loss, {args.steps} steps, {args.dtype}, seed {args.seed}, "
        f"{_how(world)}, rows per rank: {[len(s) for s in torch.tensor_split(xt, world.size)]}"
    )
    say(f"{'step':>5}{'loss':>14}")
    progress = Progress(args.steps, enabled=world.is_main)

    def row(t, loss):
        if _logged(t, args.steps, args.log_every):
            progress.close()
            say(f"{t:>5}{loss:>14.6e}")

    try:
        losses, times = _train(
            lambda i: step(xt, yt),
            args.steps,
            lambda i: f"step {i}",
            args,
            progress,
            "ddp",
            after=row,
        )
    finally:
        progress.close()
    med = statistics.median(times)
    say(f"final loss {losses[-1]:.6e}; median {_us(med)} per step over {world.size} ranks")
    summary = {
        "mode": "ddp",
        "config": _config(args),
        "world_size": world.size,
        "losses": losses,
        "final_loss": losses[-1],
        "median_step_s": med,
    }
    plot = dict(
        curves=[(_how(world), np.arange(args.steps), losses, {})],
        xlabel="SGD step",
        ylabel=f"L2 loss ({args.reduction}, log scale)",
    )
    return summary, plot, _tutorial_weights(model)


# ---- entry point --------------------------------------------------------------------------------


def run(args):
    saved_threads = torch.get_num_threads()
    blas_limits = None  # numpy's BLAS (and OpenMP); restored on the way out, like torch's
    if importlib.util.find_spec("threadpoolctl"):
        from threadpoolctl import threadpool_limits

        blas_limits = threadpool_limits(limits=args.threads)
    torch.set_num_threads(args.threads)
    world, finished = None, False
    try:
        if args.ddp:
            from . import distributed

            world = distributed.init(args.device)
        say = print if world is None or world.is_main else (lambda *a, **k: None)
        if args.data == "digits":
            summary, plot, weights = run_digits(args, world, say)
        elif world is not None:
            summary, plot, weights = run_random_ddp(args, world, say)
        else:
            summary, plot, weights = run_compare(args)
        if world is None or world.is_main:
            weights = {k: v.detach().cpu() for k, v in weights.items()}
            _write_outputs(args, _clean(summary), plot, weights)
        finished = True
    except Diverged:
        if world is not None and not world.is_main:
            return 1  # every rank sees the same global loss; rank 0 says it
        raise
    finally:
        if world is not None:
            distributed.shutdown(sync=finished)
        if blas_limits is not None:
            blas_limits.restore_original_limits()
        torch.set_num_threads(saved_threads)
    return 0


def main(argv=None):
    try:
        args = parse_args(argv)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    try:
        return run(args)
    except Diverged as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _exit_after_ddp(code):
    """Ends a torchrun rank without running C++ static destructors: a gloo rank tearing down
    there could abort ("terminate called without an active exception", SIGABRT) after a
    clean run, 1 run in 6 here even with the ranks meeting at a barrier first; the process
    group is already destroyed and every output is written and flushed by then."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    code = main()
    if "--ddp" in sys.argv[1:]:
        _exit_after_ddp(code)
    sys.exit(code)
