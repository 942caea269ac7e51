import pytest
import torch

from seg.schedulers import cosine, poly


def learning_rates(scheduler, optimizer, steps):
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def make_optimizer():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)


def test_poly_with_warmup():
    optimizer = make_optimizer()
    scheduler = poly(optimizer, max_iters=100, power=1.0, warmup_iters=10, warmup_ratio=0.1)
    rates = learning_rates(scheduler, optimizer, 120)
    assert rates[0] == pytest.approx(0.01)  # warmup starts at warmup_ratio * lr
    assert rates[5] == pytest.approx(0.1 * (0.1 + 0.9 * 0.5))
    assert rates[50] == pytest.approx(0.1 * 0.5)  # linear decay with power 1
    assert rates[100] == rates[119] == 0.0  # stays at the floor past max_iters, never negative


def test_poly_min_lr_and_cosine():
    optimizer = make_optimizer()
    rates = learning_rates(poly(optimizer, max_iters=10, min_lr_ratio=0.01), optimizer, 12)
    assert rates[0] == pytest.approx(0.1) and rates[11] == pytest.approx(0.001)
    optimizer = make_optimizer()
    rates = learning_rates(cosine(optimizer, max_iters=20, warmup_iters=0), optimizer, 21)
    assert rates[0] == pytest.approx(0.1)
    assert rates[10] == pytest.approx(0.05)
    assert rates[20] == pytest.approx(0.0)
