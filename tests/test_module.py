"""Behaviour: TwoLayerNet is a drop-in nn.Module: its parameters and repr, an exact round trip
with nn.Sequential(Linear, ReLU, Linear), and checkpoints of either kind. (Bad sizes and models:
tests/test_hostile.py; sgd_step on the module: tests/test_sgd_step.py.)"""

import pytest
import torch
from torch import nn

import twolayer_ext as tl


@pytest.mark.parametrize("bias", [False, True])
def test_sequential_round_trip(bias):
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(7, 5, bias=bias), nn.ReLU(), nn.Linear(5, 3, bias=bias)).double()
    net = tl.TwoLayerNet.from_sequential(seq)
    x = torch.randn(9, 7, dtype=torch.float64)
    torch.testing.assert_close(net(x), seq(x), rtol=1e-12, atol=1e-12)

    net(x).pow(2).sum().backward()
    seq(x).pow(2).sum().backward()
    torch.testing.assert_close(net.weight1.grad, seq[0].weight.grad)
    torch.testing.assert_close(net.weight2.grad, seq[2].weight.grad)
    if bias:
        torch.testing.assert_close(net.b1.grad, seq[0].bias.grad)
        torch.testing.assert_close(net.b2.grad, seq[2].bias.grad)

    back = net.to_sequential()
    for a, b in zip(back.state_dict().values(), seq.state_dict().values()):
        assert torch.equal(a, b)  # exact both ways
    # A checkpoint of either kind loads into the other.
    restored = tl.TwoLayerNet(7, 5, 3, bias=bias, dtype=torch.float64)
    restored.load_state_dict(tl.TwoLayerNet.from_sequential(back).state_dict())
    assert torch.equal(restored(x), net(x))


def test_module_basics():
    net = tl.TwoLayerNet(4, 6, 2)
    # nn.Sequential(Linear, ReLU, Linear)'s order and layout; w1, w2 the tutorial's views
    assert [(n, tuple(p.shape)) for n, p in net.named_parameters()] == [
        ("weight1", (6, 4)),
        ("bias1", (6,)),
        ("weight2", (2, 6)),
        ("bias2", (2,)),
    ]
    assert net.w1.shape == (4, 6) and net.w2.shape == (6, 2)
    assert net.w1.data_ptr() == net.weight1.data_ptr() and net.b1 is net.bias1
    assert "D_in=4, H=6, D_out=2, bias=True" in repr(net)
    assert net(torch.randn(3, 4)).shape == (3, 2)
    assert [n for n, _ in tl.TwoLayerNet(4, 6, 2, bias=False).named_parameters()] == [
        "weight1",
        "weight2",
    ]


@pytest.mark.parametrize("bias", [False, True])
def test_load_state_dict_takes_a_sequential_checkpoint(bias):
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(6, 5, bias=bias), nn.ReLU(), nn.Linear(5, 2, bias=bias))
    net = tl.TwoLayerNet(6, 5, 2, bias=bias)
    result = net.load_state_dict(seq.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(3, 6)
    torch.testing.assert_close(net(x), seq(x))
    # and back: to_sequential's state dict loads into nn.Sequential as it is
    seq2 = nn.Sequential(nn.Linear(6, 5, bias=bias), nn.ReLU(), nn.Linear(5, 2, bias=bias))
    seq2.load_state_dict(net.to_sequential().state_dict())
    torch.testing.assert_close(seq2(x), seq(x))
    # our own state dict still loads, and a wrong width names the parameter
    tl.TwoLayerNet(6, 5, 2, bias=bias).load_state_dict(net.state_dict())
    with pytest.raises(RuntimeError, match="size mismatch for weight2"):
        tl.TwoLayerNet(6, 5, 3, bias=bias).load_state_dict(seq.state_dict())
