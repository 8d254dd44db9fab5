"""Each optimizer's first update and each schedule's curve, against their definitions."""

import math

import pytest
import torch

from lmtune.config.schema import TrainingArgs
from lmtune.engine.optim import build_optimizer, lr_factor

W0 = torch.tensor([[0.5, -1.0], [2.0, 0.25]])
GRAD = torch.tensor([[0.1, -0.2], [0.3, -0.4]])


def one_step(**settings) -> torch.Tensor:
    layer = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(W0)
    layer.weight.grad = GRAD.clone()
    optimizer = build_optimizer(layer, TrainingArgs(**settings))
    optimizer.step()
    return layer.weight.detach().clone()


LR, WD, EPS = 0.01, 0.1, 1e-8


def adam_direction(g):
    # first step with bias correction: m_hat = g, v_hat = g^2
    return g / (g.abs() + EPS)


@pytest.mark.parametrize(
    "name,expected",
    [
        ("adamw_torch", W0 * (1 - LR * WD) - LR * adam_direction(GRAD)),
        ("adamw_torch_fused", W0 * (1 - LR * WD) - LR * adam_direction(GRAD)),
        ("adam", W0 - LR * adam_direction(GRAD + WD * W0)),  # Adam's weight decay is L2 in the gradient
        ("sgd", W0 - LR * (GRAD + WD * W0)),
        ("rmsprop", W0 - LR * (GRAD + WD * W0) / ((0.01 * (GRAD + WD * W0) ** 2).sqrt() + EPS)),
        ("adamw_8bit", W0 * (1 - LR * WD) - LR * adam_direction(GRAD)),
    ],
)
def test_first_update_matches_the_definition(name, expected):
    updated = one_step(optimizer=name, learning_rate=LR, weight_decay=WD, adam_epsilon=EPS)
    assert torch.allclose(updated, expected, atol=1e-6), (updated, expected)


def test_adafactor_first_update_follows_the_factored_second_moment():
    """Shazeer & Stern (2018): v ~ row x col / mean(row); update g / sqrt(v), clipped to RMS 1, times lr."""
    updated = one_step(optimizer="adafactor", learning_rate=LR, weight_decay=0.0)
    squared = GRAD**2 + 1e-30
    row, col = squared.mean(dim=1), squared.mean(dim=0)
    update = GRAD / torch.sqrt(torch.outer(row, col) / row.mean())
    update = update / max(1.0, float(update.pow(2).mean().sqrt()))
    assert torch.allclose(updated, W0 - LR * update, atol=1e-6)


def test_sgd_momentum_and_nesterov():
    layer = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(W0)
    optimizer = build_optimizer(layer, TrainingArgs(optimizer="sgd", learning_rate=LR, momentum=0.9, nesterov=True))
    for _ in range(2):
        layer.weight.grad = GRAD.clone()
        optimizer.step()
    # buffer b1 = g, b2 = 0.9 g + g; nesterov step uses g + 0.9 b
    expected = W0 - LR * (GRAD + 0.9 * GRAD) - LR * (GRAD + 0.9 * 1.9 * GRAD)
    assert torch.allclose(layer.weight, expected, atol=1e-6)


def test_betas_reach_adam():
    layer = torch.nn.Linear(2, 2, bias=False)
    optimizer = build_optimizer(layer, TrainingArgs(adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6))
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.95) and optimizer.param_groups[0]["eps"] == 1e-6


def test_norms_and_biases_are_not_decayed():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    groups = build_optimizer(model, TrainingArgs(weight_decay=0.1)).param_groups
    assert [len(g["params"]) for g in groups] == [1, 3] and [g["weight_decay"] for g in groups] == [0.1, 0.0]


def factors(total=110, **settings):
    f = lr_factor(TrainingArgs(**settings), total)
    return [f(step) for step in range(total)]


def test_warmup_is_linear_from_zero():
    curve = factors(lr_scheduler="linear", warmup_steps=10)
    assert curve[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])


def test_cosine_at_mid_point_is_half_of_peak():
    curve = factors(lr_scheduler="cosine", warmup_steps=10)
    assert curve[10] == 1.0 and curve[60] == pytest.approx(0.5) and curve[109] == pytest.approx(0.0, abs=1e-3)


def test_cosine_floor_from_min_lr_ratio():
    curve = factors(lr_scheduler="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert curve[60] == pytest.approx(0.55) and min(curve[10:]) >= 0.1


def test_linear_at_mid_point_is_half():
    assert factors(lr_scheduler="linear", warmup_steps=10)[60] == pytest.approx(0.5)


def test_polynomial_power_two_at_mid_point_is_a_quarter():
    assert factors(lr_scheduler="polynomial", warmup_steps=10, lr_power=2.0)[60] == pytest.approx(0.25)


def test_constant_ignores_warmup_and_constant_with_warmup_does_not():
    assert set(factors(lr_scheduler="constant", warmup_steps=10)) == {1.0}
    curve = factors(lr_scheduler="constant_with_warmup", warmup_steps=10)
    assert curve[4] == pytest.approx(0.5) and set(curve[10:]) == {1.0}


def test_cosine_with_restarts_restarts():
    curve = factors(lr_scheduler="cosine_with_restarts", warmup_steps=10, lr_cycles=2)
    # two cycles of 50 steps: half-way through the first (step 35) is 0.5, and step 60 starts again at 1
    assert curve[35] == pytest.approx(0.5) and curve[60] == pytest.approx(1.0) and curve[59] < 0.01


def test_warmup_ratio_counts_steps():
    curve = factors(total=100, lr_scheduler="linear", warmup_ratio=0.1)
    assert curve[9] == pytest.approx(1.0) and curve[8] == pytest.approx(0.9)


def test_scheduler_drives_the_optimizer():
    from lmtune.engine.optim import build_scheduler

    layer = torch.nn.Linear(2, 2)
    t = TrainingArgs(learning_rate=0.1, lr_scheduler="cosine", warmup_steps=2)
    optimizer = build_optimizer(layer, t)
    scheduler = build_scheduler(optimizer, t, 12)
    seen = []
    for _ in range(12):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[0] == pytest.approx(0.05) and seen[1] == pytest.approx(0.1)
    assert seen[7] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))
