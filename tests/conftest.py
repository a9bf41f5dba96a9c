"""Shared fixtures: small seeded models and one compiled host build reused across tests."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch


def host_has_vnni() -> bool:
    """Whether this CPU executes AVX-512 VNNI (``vpdpbusd``), from /proc/cpuinfo's flags.

    Read from the kernel, not from TVM's target detection: a test that runs VNNI code on a
    CPU without it dies with SIGILL, taking the whole pytest run with it.
    """
    from tvmq.machine import cpu_flags

    return bool(cpu_flags() & {"avx512_vnni", "avx512vnni"})


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "vnni: runs AVX-512 VNNI code on this CPU (skipped where it has none)"
    )
    config.addinivalue_line(
        "markers", "amx: runs AMX int8 tile code on this CPU (skipped where it or the OS lacks it)"
    )
    config.addinivalue_line(
        "markers", "nvcc: compiles CUDA code with nvcc / ptxas (skipped where they are missing)"
    )


def pytest_collection_modifyitems(config, items):
    from tvmq.machine import amx_granted

    skips = {}
    if not host_has_vnni():
        skips["vnni"] = "this CPU has no AVX-512 VNNI (avx512_vnni in /proc/cpuinfo)"
    if not amx_granted():
        skips["amx"] = "no AMX int8 here (amx_int8 in /proc/cpuinfo, granted by arch_prctl)"
    if shutil.which("nvcc") is None or shutil.which("ptxas") is None:
        skips["nvcc"] = "nvcc / ptxas (the CUDA toolkit) are not installed"
    for item in items:
        for marker, reason in skips.items():
            if marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


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
