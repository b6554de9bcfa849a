"""Weight averaging (WeightEMA) and its wiring into the bundles' training, evaluation and resume."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine

from medseg.handlers import WeightEMA


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))


def _run(handler: WeightEMA, net: torch.nn.Module, iterations: int) -> Engine:
    def step(engine, batch):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1.0)
            net[1].running_mean.add_(1.0)

    engine = Engine(step)
    handler.attach(engine)
    engine.run([0] * iterations, max_epochs=1)
    return engine


def test_ema_follows_the_known_recurrence():
    net = _net()
    start = net[0].weight.detach().clone()
    ema = WeightEMA(net, momentum=0.1, warmup_momentum=0.1, warmup_iters=1)
    _run(ema, net, 5)
    # each step adds 1 to the weights; with a constant momentum m the average lags by
    # sum_k (1 - m)^k over the steps: after n steps, w_ema = w0 + sum_{i=1..n} m (1-m)^(n-i) i
    m, n = 0.1, 5
    expected_shift = sum(m * (1 - m) ** (n - i) * i for i in range(1, n + 1))
    assert torch.allclose(ema.ema_model[0].weight, start + expected_shift, atol=1e-5)
    assert torch.allclose(net[0].weight, start + n)
    # BatchNorm statistics are averaged too, not copied from the online network
    assert torch.allclose(ema.ema_model[1].running_mean, torch.full((2,), expected_shift), atol=1e-5)
    assert not ema.ema_model.training


def test_ema_warmup_reaches_the_final_momentum():
    net = _net()
    ema = WeightEMA(net, momentum=0.01, warmup_momentum=0.5, warmup_iters=10)
    engine = _run(ema, net, 20)
    assert engine.state.ema_momentum == pytest.approx(0.01)


def test_no_momentum_means_no_averaging():
    net = _net()
    ema = WeightEMA(net, momentum=None)
    assert ema.ema_model is net
    engine = _run(ema, net, 3)
    assert not hasattr(engine.state, "ema_momentum")


def test_bad_momentum_is_refused():
    with pytest.raises(ValueError, match="ema_momentum"):
        WeightEMA(_net(), momentum=1.5)
