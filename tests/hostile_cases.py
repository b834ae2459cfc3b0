"""Hostile inputs: a table of bad calls to every public function and op, each expecting one
exception type and a message that names the argument at fault.

Run by tests/test_hostile.py in a subprocess, so a crash (segfault, abort, sanitizer report) is
reported as a failing case instead of killing the test run. Standalone:

    python tests/hostile_cases.py            # every case, one JSON line per case on stdout
    python tests/hostile_cases.py --start 40 # from case 40 on (used to go on after a crash)
    python tests/hostile_cases.py --list     # ids only

Before each case the runner prints {"i", "id", "phase": "begin"}; after it {"i", "id", "status",
...} with status "pass", "no_error", "wrong_type", "wrong_msg" or "skipped" (a case for a device
that is not here). A "begin" without its result is a crash in that case.

A case may carry `bug="..."`: a known defect (see docs/hardening.md) that the case exposes; the
test reports it as an expected failure, and fails once it passes, so the mark gets removed.
"""

import json
import re
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

import twolayer_ext as tl

ops = torch.ops.twolayer_ext
HAS_CUDA = torch.cuda.is_available() and "cuda" in tl.available_devices()


@dataclass
class Case:
    id: str
    call: Callable[[], object]  # builds its tensors and makes the bad call
    exc: type
    msg: str  # regex searched in str(exception)
    requires: Optional[str] = None  # "cuda": runs only when a GPU and the CUDA build exist
    bug: Optional[str] = None  # known defect: expected to fail until fixed


CASES = []


def case(id, call, exc, msg, **kw):
    CASES.append(Case(id, call, exc, msg, **kw))


# ---- building blocks --------------------------------------------------------------------------
N, D_IN, H, D_OUT = 4, 3, 5, 2


def t(*shape, dtype=torch.float64, device="cpu"):
    return (
        torch.randn(*shape, dtype=dtype, device=device)
        if shape
        else torch.tensor(1.5, dtype=dtype, device=device)
    )


def good_two_layer(dtype=torch.float64):
    return dict(
        x=t(N, D_IN, dtype=dtype),
        w1=t(D_IN, H, dtype=dtype),
        w2=t(H, D_OUT, dtype=dtype),
        b1=t(H, dtype=dtype),
        b2=t(D_OUT, dtype=dtype),
    )


def good_sgd(dtype=torch.float64):
    return dict(good_two_layer(dtype), target=t(N, D_OUT, dtype=dtype))


SHAPES = {
    "x": (N, D_IN),
    "w1": (D_IN, H),
    "w2": (H, D_OUT),
    "b1": (H,),
    "b2": (D_OUT,),
    "target": (N, D_OUT),
}
# what the message says for a wrong size: the argument named by the check
WRONG_SIZE = {
    "x": ((N, D_IN + 1), r"w1 must have shape \[D_in, H\] with D_in = 4 \(x\.size\(1\)\)"),
    "w1": ((D_IN + 1, H), r"w1 must have shape \[D_in, H\] with D_in = 3"),
    "w2": ((H + 1, D_OUT), r"w2 must have shape \[H, D_out\] with H = 5"),
    "b1": ((H + 1,), r"b1 must have shape \[H\] = \[5\], got \[6\]"),
    "b2": ((D_OUT + 1,), r"b2 must have shape \[D_out\] = \[2\], got \[3\]"),
    "target": ((N, D_OUT + 1), r"target must have shape \[N, D_out\] = \[4, 2\], got \[4, 3\]"),
}


def wrong_ranks(name):
    shape = SHAPES[name]
    if len(shape) == 2:
        return [(), (shape[0],), shape + (1,), (1,) + shape]
    return [(), (1,) + shape, shape + (1,)]


def public_wrong_ranks(name):
    """The public functions take x [*, D_in] and target [*, D_out] (as nn.Linear): only a
    0-dim x, and a target whose leading dimensions are not x's, are wrong ranks there."""
    return [()] if name == "x" else wrong_ranks(name)


def public_rank_msg(fn, name):
    if name == "x":
        return rf"{fn}: x must have at least one dimension \[\*, D_in\]"
    if name == "target":
        return rf"{fn}: target must have shape \[\*, D_out\] = \[{N}, {D_OUT}\] \(x's leading dimensions"
    return rank_msg(fn, name)


def rank_msg(fn, name):
    if name in ("x", "w1", "w2"):
        return rf"{fn}: {name} must be a 2-D tensor"
    if name == "target":
        return rf"{fn}: target must have shape \[N, D_out\]"
    return rf"{fn}: {name} must have shape \[(H|D_out)\]"


# float16 and bfloat16 are served on every device (the composite step, csrc/composite/, on the CPU).
BAD_DTYPES = [torch.int64, torch.int32, torch.uint8, torch.bool, torch.int16, torch.complex64]
NON_TENSORS = [
    ("list", [[1.0, 2.0, 3.0]]),
    ("ndarray", np.ones((N, D_IN))),
    ("float", 1.0),
    ("str", "x"),
    ("dict", {}),
]


def with_(base, **kw):
    d = dict(base)
    d.update(kw)
    return d


# ---- two_layer (public) and two_layer_fwd (op) --------------------------------------------------


def two_layer_call(kind, **kw):
    def call():
        a = good_two_layer()
        a.update({k: (v() if callable(v) else v) for k, v in kw.items()})
        if kind == "public":
            return tl.two_layer(**a)
        return ops.two_layer_fwd(a["x"], a["w1"], a["w2"], a["b1"], a["b2"])

    return call


for kind, fn in (("public", "two_layer"), ("op", "two_layer")):
    pre = "two_layer" if kind == "public" else "op.two_layer_fwd"
    for name in ("x", "w1", "w2", "b1", "b2"):
        public = kind == "public"
        for shape in (public_wrong_ranks if public else wrong_ranks)(name):
            case(
                f"{pre}/{name}/rank{len(shape)}{list(shape)}",
                two_layer_call(kind, **{name: (lambda s=shape: t(*s))}),
                ValueError,
                (public_rank_msg if public else rank_msg)(fn, name),
            )
        shape, msg = WRONG_SIZE[name]
        case(
            f"{pre}/{name}/size{list(shape)}",
            two_layer_call(kind, **{name: (lambda s=shape: t(*s))}),
            ValueError,
            msg,
        )
        case(
            f"{pre}/{name}/float32-vs-float64",
            two_layer_call(kind, **{name: (lambda n=name: t(*SHAPES[n], dtype=torch.float32))}),
            TypeError,
            rf"{fn}: x must have the same dtype as w1 \(Double\), got Float"
            if name == "x"
            else rf"{fn}: x must have the same dtype as w1 \(Float\), got Double"
            if name == "w1"
            else rf"{fn}: {name} must have the same dtype as x \(Double\), got Float",
        )
        case(
            f"{pre}/{name}/meta-device",
            two_layer_call(kind, **{name: (lambda n=name: t(*SHAPES[n], device="meta"))}),
            RuntimeError,
            rf"{fn}: w1 must be on the same device as x \(meta\)"
            if name == "x"
            else rf"{fn}: {name} must be on the same device as x \(cpu\), got meta",
        )
        case(
            f"{pre}/{name}/cuda-device",
            two_layer_call(kind, **{name: (lambda n=name: t(*SHAPES[n], device="cuda"))}),
            RuntimeError,
            rf"{fn}: (w1|{name}) must be on the same device as x",
            requires="cuda",
        )
    for dt in BAD_DTYPES:
        # every argument in the bad dtype: the first check names x
        case(
            f"{pre}/all/{dt}",
            two_layer_call(
                kind,
                **{n: (lambda n=n, dt=dt: t(*SHAPES[n]).to(dt)) for n in SHAPES if n != "target"},
            ),
            TypeError,
            rf"{fn}: x must be float32, float64, float16 or bfloat16 on cpu, got",
        )
    for name in ("w1", "b2"):
        case(
            f"{pre}/{name}/int64-with-float-x",
            two_layer_call(kind, **{name: (lambda n=name: t(*SHAPES[n]).long())}),
            TypeError,
            rf"{fn}: x must have the same dtype as w1 \(Long\), got Double"
            if name == "w1"
            else rf"{fn}: {name} must have the same dtype as x",
        )

for name in ("x", "w1", "w2", "b1", "b2"):
    for what, value in NON_TENSORS:
        case(
            f"two_layer/{name}/non-tensor-{what}",
            two_layer_call("public", **{name: value}),
            TypeError,
            rf"two_layer: {name} must be a torch\.Tensor",
        )
        case(
            f"op.two_layer_fwd/{name}/non-tensor-{what}",
            two_layer_call("op", **{name: value}),
            RuntimeError,
            rf"argument '{name}'",
        )
for name in ("x", "w1", "w2"):
    case(
        f"two_layer/{name}/None",
        two_layer_call("public", **{name: None}),
        TypeError,
        rf"two_layer: {name} must be a torch\.Tensor, got NoneType",
    )
case(
    "two_layer/x/sparse",
    two_layer_call("public", x=lambda: t(N, D_IN).to_sparse()),
    NotImplementedError,
    r"twolayer_ext::two_layer_fwd.*SparseCPU",
)
case(
    "two_layer/all-meta/w1-size",
    lambda: tl.two_layer(
        t(N, D_IN, device="meta"), t(D_IN + 1, H, device="meta"), t(H, D_OUT, device="meta")
    ),
    ValueError,
    r"two_layer: w1 must have shape \[D_in, H\]",
)
case(
    "two_layer/all-meta/b1-size",
    lambda: tl.two_layer(
        t(N, D_IN, device="meta"),
        t(D_IN, H, device="meta"),
        t(H, D_OUT, device="meta"),
        t(H + 1, device="meta"),
    ),
    ValueError,
    r"two_layer: b1 must have shape \[H\]",
)
case(
    "two_layer/all-meta/int64",
    lambda: tl.two_layer(*(t(*SHAPES[n], device="meta").long() for n in ("x", "w1", "w2"))),
    TypeError,
    r"two_layer: x must be float32, float64, float16 or bfloat16 on meta, got Long",
)

# ---- l2_loss (public) and l2_loss_fwd (op) ------------------------------------------------------


def loss_call(kind, pred=None, target=None, reduction="sum", need_grad=False):
    def call():
        p = pred() if callable(pred) else (t(N, D_OUT) if pred is None else pred)
        q = target() if callable(target) else (t(N, D_OUT) if target is None else target)
        if kind == "public":
            return tl.l2_loss(p, q, reduction)
        return ops.l2_loss_fwd(p, q, reduction, need_grad)

    return call


for kind in ("public", "op"):
    pre = "l2_loss" if kind == "public" else "op.l2_loss_fwd"
    for shape in [(N, D_OUT + 1), (D_OUT, N), (N,), (N, D_OUT, 1), (), (1, D_OUT)]:
        case(
            f"{pre}/target/shape{list(shape)}",
            loss_call(kind, target=lambda s=shape: t(*s)),
            ValueError,
            r"l2_loss: target must have the same shape as pred \[4, 2\].*no broadcasting",
        )
    case(
        f"{pre}/target/float32",
        loss_call(kind, target=lambda: t(N, D_OUT, dtype=torch.float32)),
        TypeError,
        r"l2_loss: target must have the same dtype as pred \(Double\), got Float",
    )
    case(
        f"{pre}/target/meta",
        loss_call(kind, target=lambda: t(N, D_OUT, device="meta")),
        RuntimeError,
        r"l2_loss: target must be on the same device as pred \(cpu\), got meta",
    )
    case(
        f"{pre}/pred/meta",
        loss_call(kind, pred=lambda: t(N, D_OUT, device="meta")),
        RuntimeError,
        r"l2_loss: target must be on the same device as pred \(meta\), got cpu",
    )
    case(
        f"{pre}/target/cuda",
        loss_call(kind, target=lambda: t(N, D_OUT, device="cuda")),
        RuntimeError,
        r"l2_loss: target must be on the same device as pred",
        requires="cuda",
    )
    for dt in (torch.int64, torch.bool, torch.uint8, torch.complex128):
        case(
            f"{pre}/pred+target/{dt}",
            loss_call(
                kind, pred=lambda dt=dt: t(N, D_OUT).to(dt), target=lambda dt=dt: t(N, D_OUT).to(dt)
            ),
            TypeError,
            r"l2_loss: pred must be float32, float64, float16 or bfloat16 on cpu, got",
        )
    case(
        f"{pre}/target/int64",
        loss_call(kind, target=lambda: t(N, D_OUT).long()),
        TypeError,
        r"l2_loss: target must have the same dtype as pred",
    )
    for red in ("avg", "SUM", "none", "", "sum "):
        case(
            f"{pre}/reduction/{red!r}",
            loss_call(kind, reduction=red),
            ValueError,
            r'l2_loss: reduction must be "sum" or "mean", got '
            + (re.escape(repr(red)) if kind == "public" else re.escape(f'"{red}"')),
        )
for red in (None, 1, b"sum"):
    case(
        f"l2_loss/reduction/{red!r}",
        loss_call("public", reduction=red),
        ValueError,
        r'l2_loss: reduction must be "sum" or "mean"',
    )
for red in (None, 1, 0.5):  # (bytes are accepted as str by the dispatcher)
    case(
        f"op.l2_loss_fwd/reduction/{red!r}",
        loss_call("op", reduction=red),
        RuntimeError,
        r"argument 'reduction'",
    )
case(
    "op.l2_loss_fwd/need_grad/str",
    loss_call("op", need_grad="yes"),
    RuntimeError,
    r"argument 'need_grad'",
)
for name in ("pred", "target"):
    for what, value in NON_TENSORS:
        case(
            f"l2_loss/{name}/non-tensor-{what}",
            loss_call("public", **{name: value}),
            TypeError,
            rf"l2_loss: {name} must be a torch\.Tensor",
        )
        case(
            f"op.l2_loss_fwd/{name}/non-tensor-{what}",
            loss_call("op", **{name: value}),
            RuntimeError,
            rf"argument '{name}'",
        )
    case(
        f"l2_loss/{name}/None",
        loss_call("public", **{name: lambda: None}),
        TypeError,
        rf"l2_loss: {name} must be a torch\.Tensor, got NoneType",
    )
case(
    "l2_loss/pred/sparse",
    loss_call("public", pred=lambda: t(N, D_OUT).to_sparse()),
    NotImplementedError,
    r"twolayer_ext::l2_loss_fwd.*SparseCPU",
)
case(
    "op.l2_loss_fwd/all-meta/reduction",
    loss_call(
        "op",
        pred=lambda: t(N, D_OUT, device="meta"),
        target=lambda: t(N, D_OUT, device="meta"),
        reduction="avg",
    ),
    ValueError,
    r'l2_loss: reduction must be "sum" or "mean"',
)
case(
    "l2_loss/all-meta/shape",
    loss_call(
        "public", pred=lambda: t(N, D_OUT, device="meta"), target=lambda: t(D_OUT, N, device="meta")
    ),
    ValueError,
    r"l2_loss: target must have the same shape as pred",
)

# ---- l2_loss_bwd (op) ---------------------------------------------------------------------------
case(
    "op.l2_loss_bwd/grad_loss/2-elements",
    lambda: ops.l2_loss_bwd(t(2), t(N, D_OUT)),
    ValueError,
    r"l2_loss \(backward\): grad_loss must have one element, got shape \[2\]",
)
case(
    "op.l2_loss_bwd/grad_loss/empty",
    lambda: ops.l2_loss_bwd(t(0), t(N, D_OUT)),
    ValueError,
    r"grad_loss must have one element",
)
case(
    "op.l2_loss_bwd/grad_loss/float32",
    lambda: ops.l2_loss_bwd(t(dtype=torch.float32), t(N, D_OUT)),
    TypeError,
    r"l2_loss \(backward\): grad_loss must have the same dtype as grad",
)
case(
    "op.l2_loss_bwd/grad_loss/meta",
    lambda: ops.l2_loss_bwd(t(device="meta"), t(N, D_OUT)),
    RuntimeError,
    r"grad_loss must be on the same device as grad",
)
case(
    "op.l2_loss_bwd/grad/meta",
    lambda: ops.l2_loss_bwd(t(), t(N, D_OUT, device="meta")),
    RuntimeError,
    r"grad_loss must be on the same device as grad",
)
case(
    "op.l2_loss_bwd/grad/non-tensor",
    lambda: ops.l2_loss_bwd(t(), [1.0]),
    RuntimeError,
    r"argument 'grad'",
)
case(
    "op.l2_loss_bwd/grad_loss/non-tensor",
    lambda: ops.l2_loss_bwd(1.0, t(N, D_OUT)),
    RuntimeError,
    r"argument 'grad_loss'",
)

# ---- two_layer_bwd (op) -------------------------------------------------------------------------


def bwd_call(**kw):
    def call():
        a = dict(
            grad_y=t(N, D_OUT),
            x=t(N, D_IN),
            w1=t(D_IN, H),
            w2=t(H, D_OUT),
            act=t(N, H).abs(),
            output_mask=[True] * 5,
        )
        a.update({k: (v() if callable(v) else v) for k, v in kw.items()})
        return ops.two_layer_bwd(a["grad_y"], a["x"], a["w1"], a["w2"], a["act"], a["output_mask"])

    return call


BWD = "two_layer \\(backward\\)"
case(
    "op.two_layer_bwd/grad_y/size",
    bwd_call(grad_y=lambda: t(N, D_OUT + 1)),
    ValueError,
    rf"{BWD}: grad_y must have shape \[N, D_out\] = \[4, 2\], got \[4, 3\]",
)
case(
    "op.two_layer_bwd/grad_y/rank1",
    bwd_call(grad_y=lambda: t(N * D_OUT)),
    ValueError,
    rf"{BWD}: grad_y must (be 2-D|have shape) \[N, D_out\]",
)
case(
    "op.two_layer_bwd/grad_y/float32",
    bwd_call(grad_y=lambda: t(N, D_OUT, dtype=torch.float32)),
    TypeError,
    rf"{BWD}: grad_y must have the same dtype as act",
)
case(
    "op.two_layer_bwd/grad_y/meta",
    bwd_call(grad_y=lambda: t(N, D_OUT, device="meta")),
    RuntimeError,
    rf"{BWD}: grad_y must be on the same device as act",
)
case(
    "op.two_layer_bwd/act/rank1",
    bwd_call(act=lambda: t(N * H)),
    ValueError,
    rf"{BWD}: act must be 2-D \[N, H\], got 1-D",
)
case(
    "op.two_layer_bwd/act/int64",
    bwd_call(act=lambda: t(N, H).long()),
    TypeError,
    rf"{BWD}: act must be float32, float64, float16 or bfloat16 on cpu, got Long",
)
case(
    "op.two_layer_bwd/act/size",
    bwd_call(act=lambda: t(N, H + 1)),
    ValueError,
    rf"{BWD}: w2 must have shape \[H, D_out\] with H = 6",
)
case(
    "op.two_layer_bwd/w2/size",
    bwd_call(w2=lambda: t(H + 1, D_OUT)),
    ValueError,
    rf"{BWD}: w2 must have shape \[H, D_out\] with H = 5",
)
case(
    "op.two_layer_bwd/w2/float32",
    bwd_call(w2=lambda: t(H, D_OUT, dtype=torch.float32)),
    TypeError,
    rf"{BWD}: w2 must have the same dtype as act",
)
case(
    "op.two_layer_bwd/x/None-but-grad_w1",
    bwd_call(x=None),
    ValueError,
    rf"{BWD}: x( \[N, D_in\])? is needed for grad_w1",
)
case(
    "op.two_layer_bwd/w1/None-but-grad_x",
    bwd_call(w1=None),
    ValueError,
    rf"{BWD}: w1( \[D_in, H\])? is needed for grad_x",
)
case(
    "op.two_layer_bwd/x/batch-size",
    bwd_call(x=lambda: t(N + 1, D_IN)),
    ValueError,
    rf"{BWD}: x must have shape \[N, D_in\]",
)
case(
    "op.two_layer_bwd/x/float32",
    bwd_call(x=lambda: t(N, D_IN, dtype=torch.float32)),
    TypeError,
    rf"{BWD}: x must have the same dtype as act",
)
case(
    "op.two_layer_bwd/w1/H",
    bwd_call(w1=lambda: t(D_IN, H + 1)),
    ValueError,
    rf"{BWD}: w1 must have shape \[D_in, H\]",
)
case(
    "op.two_layer_bwd/w1/float32",
    bwd_call(w1=lambda: t(D_IN, H, dtype=torch.float32)),
    TypeError,
    rf"{BWD}: w1 must have the same dtype as act",
)
case("op.two_layer_bwd/x/0-d", bwd_call(x=lambda: t()), ValueError, rf"{BWD}: x\b")
case("op.two_layer_bwd/w1/0-d", bwd_call(w1=lambda: t()), ValueError, rf"{BWD}: w1\b")
case("op.two_layer_bwd/x/3-d", bwd_call(x=lambda: t(N, D_IN, 1)), ValueError, rf"{BWD}: x\b")
# torch's own message (the dispatcher converts the list before any of our code runs)
case(
    "op.two_layer_bwd/output_mask/4-long",
    bwd_call(output_mask=[True] * 4),
    RuntimeError,
    r"List with 4 elements to a fixed-size array of size 5",
)
case(
    "op.two_layer_bwd/output_mask/str",
    bwd_call(output_mask="11111"),
    RuntimeError,
    r"argument 'output_mask'",
)
for name in ("grad_y", "w2", "act"):
    case(
        f"op.two_layer_bwd/{name}/non-tensor",
        bwd_call(**{name: [1.0]}),
        RuntimeError,
        rf"argument '{name}'",
    )
    # None for a required Tensor reaches the kernel as an undefined tensor: its checks name it
    case(
        f"op.two_layer_bwd/{name}/None",
        bwd_call(**{name: None}),
        ValueError,
        rf"{BWD}: {name} must",
    )

# ---- sgd_step (public and op) -------------------------------------------------------------------


def sgd_call(kind, lr=0.1, reduction="sum", dtype=torch.float64, build=None, **kw):
    """build(a) may rewrite the argument dict (for aliasing); kw replaces arguments."""

    def call():
        a = good_sgd(dtype)
        a.update({k: (v() if callable(v) else v) for k, v in kw.items()})
        if build is not None:
            build(a)
        if kind == "public":
            return tl.sgd_step(
                a["x"], a["target"], a["w1"], a["w2"], a["b1"], a["b2"], lr=lr, reduction=reduction
            )
        return ops.sgd_step(
            a["x"], a["target"], a["w1"], a["w2"], a["b1"], a["b2"], lr, reduction, [True] * 4
        )

    return call


for kind in ("public", "op"):
    pre = "sgd_step" if kind == "public" else "op.sgd_step"
    for name in ("x", "target", "w1", "w2", "b1", "b2"):
        public = kind == "public"
        for shape in (public_wrong_ranks if public else wrong_ranks)(name)[:2]:
            case(
                f"{pre}/{name}/rank{len(shape)}{list(shape)}",
                sgd_call(kind, **{name: (lambda s=shape: t(*s))}),
                ValueError,
                (public_rank_msg if public else rank_msg)("sgd_step", name),
            )
        shape, msg = WRONG_SIZE[name]
        case(
            f"{pre}/{name}/size{list(shape)}",
            sgd_call(kind, **{name: (lambda s=shape: t(*s))}),
            ValueError,
            msg,
        )
        case(
            f"{pre}/{name}/float32-vs-float64",
            sgd_call(kind, **{name: (lambda n=name: t(*SHAPES[n], dtype=torch.float32))}),
            TypeError,
            r"sgd_step: x must have the same dtype as w1 \(Double\)"
            if name == "x"
            else r"sgd_step: x must have the same dtype as w1 \(Float\)"
            if name == "w1"
            else rf"sgd_step: {name} must have the same dtype as x",
        )
        case(
            f"{pre}/{name}/meta-device",
            sgd_call(kind, **{name: (lambda n=name: t(*SHAPES[n], device="meta"))}),
            RuntimeError,
            r"sgd_step: \w+ must be on the same device as \w+",
        )
        case(
            f"{pre}/{name}/cuda-device",
            sgd_call(kind, **{name: (lambda n=name: t(*SHAPES[n], device="cuda"))}),
            RuntimeError,
            r"sgd_step: \w+ must be on the same device as \w+",
            requires="cuda",
        )
    case(
        f"{pre}/all/int32",
        sgd_call(kind, **{n: (lambda n=n: t(*SHAPES[n]).int()) for n in SHAPES}),
        TypeError,
        r"sgd_step: x must be float32, float64, float16 or bfloat16 on cpu, got Int",
    )
    case(
        f"{pre}/all/int64",
        sgd_call(kind, **{n: (lambda n=n: t(*SHAPES[n]).long()) for n in SHAPES}),
        TypeError,
        r"sgd_step: x must be float32, float64, float16 or bfloat16 on cpu, got Long",
    )
    for lr in (-1.0, -1e-300, float("nan"), float("inf"), float("-inf")):
        case(
            f"{pre}/lr/{lr!r}",
            sgd_call(kind, lr=lr),
            ValueError,
            r"sgd_step: lr must be a finite number >= 0, got",
        )
    for red in ("avg", "none", "Mean"):
        case(
            f"{pre}/reduction/{red!r}",
            sgd_call(kind, reduction=red),
            ValueError,
            r'sgd_step: reduction must be "sum" or "mean", got',
        )

    # ---- in-place updates: weights that alias each other, x or target, or themselves ----
    def sq(a):  # square sizes, so that any two arguments could be the same tensor
        for k in ("x", "target", "w1", "w2"):
            a[k] = t(4, 4)
        a["b1"], a["b2"] = t(4), t(4)

    def alias(fn):
        def build(a):
            sq(a)
            fn(a)

        return build

    ALIASES = [
        (
            "w1-is-w2",
            lambda a: a.update(w2=a["w1"]),
            r"w1 is updated in place and must not share memory with w2",
        ),
        (
            "w2-is-w1.T",
            lambda a: a.update(w2=a["w1"].t()),
            r"w1 is updated in place and must not share memory with w2",
        ),
        (
            "w1-w2-overlapping-views",
            lambda a: (lambda big: a.update(w1=big[:4, :4], w2=big[2:6, 2:6]))(t(8, 8)),
            r"w1 is updated in place and must not share memory with w2",
        ),
        (
            "w1-is-x",
            lambda a: a.update(w1=a["x"]),
            r"w1 is updated in place and must not share memory with x",
        ),
        (
            "w2-view-of-x",
            lambda a: (lambda big: a.update(x=big[:, :4], w2=big[:, 2:6]))(t(4, 8)),
            r"w2 is updated in place and must not share memory with x",
        ),
        (
            "w1-is-target",
            lambda a: a.update(w1=a["target"]),
            r"w1 is updated in place and must not share memory with target",
        ),
        (
            "w2-is-target",
            lambda a: a.update(w2=a["target"]),
            r"w2 is updated in place and must not share memory with target",
        ),
        (
            "b1-is-b2",
            lambda a: a.update(b2=a["b1"]),
            r"b1 is updated in place and must not share memory with b2",
        ),
        (
            "b1-row-of-w1",
            lambda a: a.update(b1=a["w1"][0]),
            r"w1 is updated in place and must not share memory with b1",
        ),
        (
            "b2-column-of-w2",
            lambda a: a.update(b2=a["w2"][:, 0]),
            r"w2 is updated in place and must not share memory with b2",
        ),
        (
            "b1-column-of-w2",
            lambda a: a.update(b1=a["w2"][:, 1]),
            r"w2 is updated in place and must not share memory with b1",
        ),
        (
            "b1-row-of-x",
            lambda a: a.update(b1=a["x"][2]),
            r"b1 is updated in place and must not share memory with x",
        ),
        (
            "b2-row-of-target",
            lambda a: a.update(b2=a["target"][3]),
            r"b2 is updated in place and must not share memory with target",
        ),
        (
            "w1-expanded",
            lambda a: a.update(w1=t(1, 4).expand(4, 4)),
            r"w1 is updated in place, so its elements must not share memory",
        ),
        (
            "w2-expanded",
            lambda a: a.update(w2=t(4, 1).expand(4, 4)),
            r"w2 is updated in place, so its elements must not share memory",
        ),
        (
            "b1-expanded",
            lambda a: a.update(b1=t(1).expand(4)),
            r"b1 is updated in place, so its elements must not share memory",
        ),
        (
            "b2-expanded",
            lambda a: a.update(b2=t(1).expand(4)),
            r"b2 is updated in place, so its elements must not share memory",
        ),
        (
            "w1-self-overlapping",
            lambda a: a.update(w1=t(16).as_strided((4, 4), (2, 1))),
            r"w1 is updated in place, so its elements must not share memory",
        ),
    ]
    for aid, fn, msg in ALIASES:
        case(f"{pre}/alias/{aid}", sgd_call(kind, build=alias(fn)), ValueError, rf"sgd_step: {msg}")

# public-only: Python-level argument types
for name in ("x", "target", "w1", "w2", "b1", "b2"):
    for what, value in NON_TENSORS[:3]:
        case(
            f"sgd_step/{name}/non-tensor-{what}",
            sgd_call("public", **{name: value}),
            TypeError,
            rf"sgd_step: {name} must be a torch\.Tensor",
        )
        case(
            f"op.sgd_step/{name}/non-tensor-{what}",
            sgd_call("op", **{name: value}),
            RuntimeError,
            rf"argument '{name}'",
        )
for what, lr in (
    ("str", "0.1"),
    ("None", None),
    ("tensor", torch.tensor(0.1)),
    ("bool", True),
    ("complex", 0.1j),
    ("list", [0.1]),
    ("np.float32", np.float32(0.1)),
):
    case(
        f"sgd_step/lr/{what}", sgd_call("public", lr=lr), TypeError, r"sgd_step: lr must be a float"
    )
case("op.sgd_step/lr/str", sgd_call("op", lr="0.1"), RuntimeError, r"argument 'lr'")
case(
    "sgd_step/reduction/None",
    sgd_call("public", reduction=None),
    ValueError,
    r'sgd_step: reduction must be "sum" or "mean", got None',
)
case(
    "op.sgd_step/reduction/None",
    sgd_call("op", reduction=None),
    RuntimeError,
    r"argument 'reduction'",
)


def _non_leaf(name):
    def build(a):
        base = a[name].clone().requires_grad_(True)
        a[name] = base * 1.0

    return build


for name in ("w1", "w2", "b1", "b2"):
    case(
        f"sgd_step/{name}/non-leaf-in-graph",
        sgd_call("public", build=_non_leaf(name)),
        RuntimeError,
        rf"sgd_step: {name} is a non-leaf tensor inside an autograd graph",
    )

# ---- TwoLayerNet --------------------------------------------------------------------------------
for arg in ("D_in", "H", "D_out"):
    for bad in (0, -1, 2.5, True, "3", None):

        def call(arg=arg, bad=bad):
            kw = dict(D_in=3, H=5, D_out=2)
            kw[arg] = bad
            return tl.TwoLayerNet(**kw)

        case(
            f"TwoLayerNet/{arg}/{bad!r}",
            call,
            ValueError,
            rf"TwoLayerNet: {arg} must be a positive int, got {re.escape(repr(bad))}",
        )
case(
    "TwoLayerNet.forward/x/size",
    lambda: tl.TwoLayerNet(3, 5, 2)(torch.randn(4, 7)),
    ValueError,
    r"two_layer: w1 must have shape \[D_in, H\] with D_in = 7 \(x\.size\(1\)\)",
)
case(
    "TwoLayerNet.forward/x/float64",
    lambda: tl.TwoLayerNet(3, 5, 2)(t(4, 3)),
    TypeError,
    r"two_layer: x must have the same dtype as w1 \(Float\), got Double",
)
case(
    "TwoLayerNet.forward/x/list",
    lambda: tl.TwoLayerNet(3, 5, 2)([[1.0, 2.0, 3.0]]),
    TypeError,
    r"two_layer: x must be a torch\.Tensor, got list",
)
case(
    "TwoLayerNet.forward/x/meta",
    lambda: tl.TwoLayerNet(3, 5, 2)(torch.randn(4, 3, device="meta")),
    RuntimeError,
    r"two_layer: w1 must be on the same device as x \(meta\), got cpu",
)
case(
    "TwoLayerNet.sgd_step/lr/-1",
    lambda: tl.TwoLayerNet(3, 5, 2).sgd_step(torch.randn(4, 3), torch.randn(4, 2), lr=-1),
    ValueError,
    r"sgd_step: lr must be a finite number",
)
case(
    "TwoLayerNet.sgd_step/target/size",
    lambda: tl.TwoLayerNet(3, 5, 2).sgd_step(torch.randn(4, 3), torch.randn(4, 3), lr=0.1),
    ValueError,
    r"sgd_step: target must have shape",
)
case(
    "TwoLayerNet.sgd_step/x/is-a-weight",
    lambda: (lambda net: net.sgd_step(net.w1.detach(), torch.randn(3, 5), lr=0.1))(
        tl.TwoLayerNet(3, 3, 5)
    ),
    ValueError,
    r"sgd_step: w1 is updated in place and must not share memory with x",
)
case(
    "TwoLayerNet.from_sequential/seq/Linear",
    lambda: tl.TwoLayerNet.from_sequential(nn.Linear(3, 5)),
    TypeError,
    r"from_sequential: seq must be nn\.Sequential\(nn\.Linear, nn\.ReLU, nn\.Linear\)",
)
case(
    "TwoLayerNet.from_sequential/seq/None",
    lambda: tl.TwoLayerNet.from_sequential(None),
    TypeError,
    r"from_sequential: seq must be",
)
case(
    "TwoLayerNet.from_sequential/seq/Tanh",
    lambda: tl.TwoLayerNet.from_sequential(
        nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    ),
    TypeError,
    r"from_sequential: seq must be",
)
case(
    "TwoLayerNet.from_sequential/seq/in_features",
    lambda: tl.TwoLayerNet.from_sequential(
        nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(4, 2))
    ),
    ValueError,
    r"from_sequential: the second Linear must take 5 inputs, got 4",
)
case(
    "TwoLayerNet.from_sequential/seq/bias-mix",
    lambda: tl.TwoLayerNet.from_sequential(
        nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2, bias=False))
    ),
    ValueError,
    r"from_sequential: both Linear layers must have a bias",
)


# ---- runner -------------------------------------------------------------------------------------


def run_case(c):
    if c.requires == "cuda" and not HAS_CUDA:
        return {"status": "skipped"}
    try:
        c.call()
    except Exception as e:  # noqa: BLE001  (the point is to see what comes out)
        text = str(e)
        out = {"exc_type": type(e).__name__, "msg": text[:400]}
        if type(e) is not c.exc:
            out["status"] = "wrong_type"
        elif not re.search(c.msg, text):
            out["status"] = "wrong_msg"
        else:
            out["status"] = "pass"
        return out
    return {"status": "no_error"}


def main(argv):
    ids = [c.id for c in CASES]
    assert len(set(ids)) == len(ids), "duplicate case ids"
    if "--list" in argv:
        print("\n".join(ids))
        return 0
    start = int(argv[argv.index("--start") + 1]) if "--start" in argv else 0
    for i in range(start, len(CASES)):
        c = CASES[i]
        print(json.dumps({"i": i, "id": c.id, "phase": "begin"}), flush=True)
        res = run_case(c)
        res.update(i=i, id=c.id, expected=c.exc.__name__, pattern=c.msg, bug=c.bug)
        print(json.dumps(res), flush=True)
    print(json.dumps({"done": True, "total": len(CASES)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
