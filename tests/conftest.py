"""Shared fixtures: small seeded models and one compiled host build reused across tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch


class TwoLayer(torch.nn.Module):
    """A small MLP with two outputs' worth of structure: linear-relu-linear."""

    def __init__(self, d_in: int = 32, d_hidden: int = 16, d_out: int = 10):
        super().__init__()
        self.fc1 = torch.nn.Linear(d_in, d_hidden)
        self.fc2 = torch.nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def small_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return TwoLayer().eval()


@pytest.fixture(scope="session")
def compiled_mlp_dir(tmp_path_factory, small_mlp):
    """A host build of ``small_mlp`` for batch 2, compiled once per test session."""
    import tvmq

    out = tmp_path_factory.mktemp("build") / "mlp"
    tvmq.compile(small_mlp, "host", example_inputs=(torch.zeros(2, 32),), output_dir=out)
    return out
