"""Behaviour: what sgd_step's in-place update moves and what it leaves alone. requires_grad=False
freezes a weight (module and functional forms; the op's update mask), leaf parameters that
require grad are fine (like optimizer.step()), and no_grad does not matter. Per device ([cuda]
cases: tools/gpu_check.sh and tests/test_gpu_readiness.py rely on this file having them) and
per CPU kernel variant. Merged from test_sgd_step.py and test_cuda.py (frozen weights).
Elsewhere: sgd_step against autograd, tests/test_oracle_agreement.py; a strided weight updated
in place, tests/test_strides.py; bad arguments and aliasing, tests/test_hostile.py; compiled,
tests/test_compile.py; the 500-step replay, tests/test_seed_replay.py.
"""

import copy

import pytest
import torch

import twolayer_ext as tl
from twolayer_ext import reference as R

from conftest import UPDATE_MASKS, bits, cpu_and_device_args, cpu_reference, problem, to_torch

pytestmark = pytest.mark.usefixtures("cpu_kernel")  # every test, every CPU variant
OPS = torch.ops.twolayer_ext


def test_leaf_parameters_and_no_grad():
    net = tl.TwoLayerNet(5, 4, 2)
    x, y = torch.randn(3, 5), torch.randn(3, 2)
    net.sgd_step(x, y, lr=0.1)  # leaf params with requires_grad: fine, like optimizer.step()
    with torch.no_grad():
        net.sgd_step(x, y, lr=0.1)
    assert net.weight1.grad is None


@pytest.mark.parametrize(
    "frozen",
    [("weight1",), ("bias2",), ("weight1", "bias2"), ("weight1", "weight2", "bias1", "bias2")],
)
def test_frozen_weights_are_not_touched(frozen, device):
    """requires_grad=False freezes a parameter: sgd_step neither computes its gradient nor
    updates it, and the others move exactly as autograd + SGD on the unfrozen ones (on the CPU),
    and as the CPU reference kernel's sgd_step."""
    torch.manual_seed(0)
    net = tl.TwoLayerNet(12, 8, 3, dtype=torch.float64)
    ref = copy.deepcopy(net)
    cpu = copy.deepcopy(net)
    net = net.to(device)
    for m in (net, ref, cpu):
        for name in frozen:
            getattr(m, name).requires_grad_(False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = torch.randn(20, 12, dtype=torch.float64), torch.randn(20, 3, dtype=torch.float64)
    opt = torch.optim.SGD(
        [p for p in ref.parameters() if p.requires_grad] or [torch.zeros(1)], lr=1e-2
    )
    for _ in range(3):
        loss = net.sgd_step(x.to(device), y.to(device), lr=1e-2)
        with cpu_reference():
            cpu.sgd_step(x, y, lr=1e-2)
        ref_loss = tl.l2_loss(ref(x), y)
        if ref_loss.requires_grad:
            opt.zero_grad()
            ref_loss.backward()
            opt.step()
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    for name, p in net.named_parameters():
        if name in frozen:
            assert torch.equal(p, before[name]), f"{name} is frozen but moved"
        else:
            assert not torch.equal(p, before[name]), f"{name} did not move"
        torch.testing.assert_close(p.cpu(), getattr(ref, name), rtol=1e-12, atol=1e-12, msg=name)
        torch.testing.assert_close(p.cpu(), getattr(cpu, name), rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("update", UPDATE_MASKS, ids=bits)
def test_update_mask_freezes_weights_as_the_cpu_reference(update, reduction, device):
    cpu, dev = cpu_and_device_args(device, seed=1)
    before = {k: dev[k].clone() for k in R.PARAM_NAMES}
    with cpu_reference():
        want = OPS.sgd_step(
            cpu["x"],
            cpu["target"],
            cpu["w1"],
            cpu["w2"],
            cpu["b1"],
            cpu["b2"],
            0.05,
            reduction,
            update,
        )
    got = OPS.sgd_step(
        dev["x"], dev["target"], dev["w1"], dev["w2"], dev["b1"], dev["b2"], 0.05, reduction, update
    )
    torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=0)
    for name, updated in zip(R.PARAM_NAMES, update):
        if updated:
            assert not torch.equal(dev[name], before[name]), f"{name} did not move"
            torch.testing.assert_close(dev[name].cpu(), cpu[name], rtol=1e-12, atol=1e-12, msg=name)
        else:
            assert torch.equal(dev[name], before[name]), f"{name} is frozen but changed"


def test_functional_sgd_step_freezes_only_once_a_weight_requires_grad():
    x, y, params = problem(10, 6, 5, 2, bias=True)
    plain = to_torch(params, "cpu")
    start = {k: v.clone() for k, v in plain.items()}
    tl.sgd_step(
        torch.tensor(x),
        torch.tensor(y),
        plain["w1"],
        plain["w2"],
        plain["b1"],
        plain["b2"],
        lr=1e-2,
    )
    assert all(not torch.equal(plain[k], start[k]) for k in plain)  # the tutorial's style
    mixed = to_torch(params, "cpu")
    mixed["w2"].requires_grad_(True)
    tl.sgd_step(
        torch.tensor(x),
        torch.tensor(y),
        mixed["w1"],
        mixed["w2"],
        mixed["b1"],
        mixed["b2"],
        lr=1e-2,
    )
    assert not torch.equal(mixed["w2"], start["w2"])
    for k in ("w1", "b1", "b2"):
        assert torch.equal(mixed[k], start[k]), f"{k} does not require grad, so it is frozen"
