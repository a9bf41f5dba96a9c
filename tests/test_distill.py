"""Distillation: a pruned demo MLP gets its accuracy back and stays pruned."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tvmq import demo
from tvmq.distillation import distill, distillation_loss
from tvmq.errors import TvmqError
from tvmq.pruning import magnitude_mask, prunable_weights


def test_loss_is_alpha_t2_kl_plus_ce():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    T, a = 3.0, 0.6
    p_t = torch.softmax(t / T, -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(s / T, -1))).sum(-1).mean()
    expected = a * T * T * kl + (1 - a) * torch.nn.functional.cross_entropy(s, y)
    assert distillation_loss(s, t, y, T, a).item() == pytest.approx(expected.item(), rel=1e-5)
    assert distillation_loss(t, t, y, T, 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_distillation_recovers_accuracy_of_80_percent_pruned_mlp():
    data = demo.load_mnist()
    teacher = demo.train(demo.make_mlp(), data, epochs=3)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for w in prunable_weights(student).values():
            w.mul_(magnitude_mask(w, 0.8))
    zeros = {n: (w == 0).clone() for n, w in prunable_weights(student).items()}
    before = demo.torch_accuracy(student, data.x_test, data.y_test)
    distill(student, teacher, data, epochs=2, seed=0)
    after = demo.torch_accuracy(student, data.x_test, data.y_test)
    assert after > before + 0.01, (before, after)
    for n, w in prunable_weights(student).items():
        assert torch.all((w == 0)[zeros[n]]), n  # pruned stays pruned
        assert int((w == 0).sum()) >= int(0.8 * w.numel() + 0.5)
    assert teacher.training is False


def test_data_forms_and_bad_arguments():
    torch.manual_seed(0)
    x = np.random.default_rng(0).random((32, 6), dtype=np.float32)
    y = np.arange(32) % 3
    teacher = torch.nn.Linear(6, 3).eval()
    student = torch.nn.Linear(6, 3)
    distill(student, teacher, (x, y), epochs=1, batch_size=8)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=8
    )
    distill(student, teacher, loader, epochs=1)
    with pytest.raises(TvmqError):
        distill(student, teacher, (x, y), temperature=0.0)
    with pytest.raises(TvmqError):
        distill(student, teacher, (x, y), alpha=1.5)
    with pytest.raises(TvmqError):
        distill(student, teacher, 42)
