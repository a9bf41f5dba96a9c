"""PolynomialDecay / ConstantSparsity schedules and the PyTorch MagnitudePruner."""

from __future__ import annotations

import pytest
import torch

from tvmq.errors import TvmqError
from tvmq.pruning import ConstantSparsity, MagnitudePruner, PolynomialDecay, magnitude_mask


def test_polynomial_decay_matches_tf_mot_formula():
    s = PolynomialDecay(0.1, 0.8, begin_step=100, end_step=1100, power=3, frequency=50)
    assert s.sparsity(0) == 0.0
    assert s.sparsity(100) == pytest.approx(0.1)
    assert s.sparsity(600) == pytest.approx(0.8 + (0.1 - 0.8) * 0.5**3)
    assert s.sparsity(1100) == pytest.approx(0.8)
    assert s.sparsity(5000) == pytest.approx(0.8)
    assert [t for t in range(0, 1300) if s.should_prune(t)] == list(range(100, 1101, 50))
    assert s(150) == (True, pytest.approx(s.sparsity(150)))
    forever = PolynomialDecay(0.0, 0.5, 0, -1, frequency=10)
    assert forever.should_prune(10**6) and forever.sparsity(10**6) == 0.5


def test_constant_sparsity():
    s = ConstantSparsity(0.6, begin_step=5, frequency=5)
    assert s(4) == (False, 0.0) and s(5) == (True, 0.6) and s(7) == (False, 0.6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_sparsity": 0.5, "final_sparsity": 0.2, "begin_step": 0, "end_step": 10},
        {"initial_sparsity": 0.0, "final_sparsity": 1.0, "begin_step": 0, "end_step": 10},
        {"initial_sparsity": 0.0, "final_sparsity": 0.5, "begin_step": 10, "end_step": 5},
        {
            "initial_sparsity": 0.0,
            "final_sparsity": 0.5,
            "begin_step": 0,
            "end_step": 5,
            "frequency": 0,
        },
    ],
)
def test_bad_schedules(kwargs):
    with pytest.raises(TvmqError):
        PolynomialDecay(**kwargs)


def test_magnitude_mask_is_exact_and_deterministic():
    w = torch.tensor([[0.5, -0.5, 0.1], [0.1, 0.0, -0.3]])
    m = magnitude_mask(w, 0.5)
    assert m.tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


def test_pruner_reaches_final_sparsity_and_pruned_weights_stay_zero():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 5)
    )
    schedule = PolynomialDecay(0.0, 0.75, begin_step=2, end_step=20, frequency=3)
    pruner = MagnitudePruner(model, schedule)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 2, 6, 6), torch.randint(0, 5, (16,))
    previous = {n: torch.zeros_like(w, dtype=torch.bool) for n, w in pruner.weights.items()}
    for _ in range(25):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        pruner.step()
        for n, w in pruner.weights.items():
            zero = w == 0
            assert torch.all(zero[previous[n]])  # once pruned, always pruned
            previous[n] = zero
    for n, w in pruner.weights.items():
        assert int((w == 0).sum()) == int(0.75 * w.numel() + 0.5), n
    # the forward hook masks weights even if something writes into them
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model(x)
    assert pruner.sparsity()["0"] == pytest.approx(0.75, abs=1 / 144)
    pruner.remove()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model(x)
    assert pruner.sparsity()["0"] == 0.0  # hooks are gone
