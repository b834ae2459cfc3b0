"""Train the tutorial's network through the fused ops beside the numpy oracle.

python -m twolayer_ext.train   (N, D_in, H, D_out = 64, 1000, 100, 10; lr 1e-6; 500 steps)
"""
import time

import torch

from . import reference as R
from .ops import l2_loss, two_layer


def main():
    x, y, params = R.tutorial_data(seed=0)
    np_params = {k: None if v is None else v.copy() for k, v in params.items()}
    xt, yt = torch.tensor(x), torch.tensor(y)
    w1 = torch.tensor(params["w1"], requires_grad=True)
    w2 = torch.tensor(params["w2"], requires_grad=True)
    lr, steps = 1e-6, 500
    print(f"{'step':>5} {'numpy loss':>16} {'twolayer_ext loss':>18} {'rel diff':>9}")
    t_np = t_ext = 0.0
    for t in range(steps):
        t0 = time.perf_counter()
        loss_np = R.numpy_sgd_step(x, y, np_params, lr)
        t1 = time.perf_counter()
        loss = l2_loss(two_layer(xt, w1, w2), yt)
        loss.backward()
        with torch.no_grad():
            for w in (w1, w2):
                w -= lr * w.grad
                w.grad.zero_()
        t_ext += time.perf_counter() - t1
        t_np += t1 - t0
        if t % 50 == 0 or t == steps - 1:
            rel = abs(loss.item() - loss_np) / abs(loss_np)
            print(f"{t:>5} {loss_np:>16.6g} {loss.item():>18.6g} {rel:>9.1e}")
    print(f"mean time per step: numpy {1e6 * t_np / steps:.0f} us, "
          f"twolayer_ext {1e6 * t_ext / steps:.0f} us")


if __name__ == "__main__":
    main()
