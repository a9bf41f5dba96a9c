"""Gradual magnitude pruning during PyTorch training (before export to Relax).

``PolynomialDecay`` follows TF-MOT's ``prune_low_magnitude`` schedule (Zhu & Gupta, 2017):
sparsity rises from ``initial_sparsity`` at ``begin_step`` to ``final_sparsity`` at
``end_step`` along ``final + (initial - final) * (1 - progress) ** power``, and masks are
updated every ``frequency`` steps in between. ``MagnitudePruner`` keeps one 0/1 mask per
``nn.Linear`` / ``nn.Conv2d`` weight, re-computed from the masked weights' magnitudes at
those steps (so pruned weights stay pruned while sparsity grows) and applied before every
forward through a hook and after every optimizer step by :meth:`MagnitudePruner.step`.

Typical loop::

    pruner = MagnitudePruner(model, PolynomialDecay(0.0, 0.8, 0, 2000, frequency=100))
    for x, y in batches:
        loss(model(x), y).backward(); opt.step(); opt.zero_grad()
        pruner.step()
    pruner.remove()  # masks are baked into the weights

The exported model then carries the zeros; the Relax passes (``PruneMagnitude`` with the
same sparsity is a no-op on it) and ``sparsity_report`` see them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tvmq.errors import TvmqError


@dataclass(frozen=True)
class PolynomialDecay:
    """Sparsity schedule ``final + (initial - final) * (1 - p) ** power``, p in [0, 1].

    Parameters
    ----------
    initial_sparsity, final_sparsity : float
        In [0, 1), ``initial <= final``.
    begin_step, end_step : int
        Pruning starts at `begin_step` and reaches `final_sparsity` at `end_step`
        (``end_step=-1``: keep pruning at `final_sparsity` forever after).
    power : float
        3 in TF-MOT and in Zhu & Gupta: prune fast early, slowly near the end.
    frequency : int
        Masks are updated every `frequency` steps from `begin_step`.
    """

    initial_sparsity: float
    final_sparsity: float
    begin_step: int
    end_step: int
    power: float = 3.0
    frequency: int = 100

    def __post_init__(self) -> None:
        for name in ("initial_sparsity", "final_sparsity"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise TvmqError(f"{name} must be in [0, 1), got {value}")
        if self.initial_sparsity > self.final_sparsity:
            raise TvmqError("initial_sparsity must not exceed final_sparsity")
        if self.begin_step < 0 or (self.end_step != -1 and self.end_step < self.begin_step):
            raise TvmqError(
                f"need 0 <= begin_step <= end_step (or end_step=-1), got {self.begin_step}, {self.end_step}"
            )
        if self.frequency < 1:
            raise TvmqError(f"frequency must be >= 1, got {self.frequency}")
        if self.power <= 0:
            raise TvmqError(f"power must be > 0, got {self.power}")

    def sparsity(self, step: int) -> float:
        """Target sparsity at `step` (0 before `begin_step`)."""
        if step < self.begin_step:
            return 0.0
        if self.end_step == -1 or self.end_step == self.begin_step:
            progress = 1.0
        else:
            progress = min(1.0, (step - self.begin_step) / (self.end_step - self.begin_step))
        return (
            self.final_sparsity
            + (self.initial_sparsity - self.final_sparsity) * (1.0 - progress) ** self.power
        )

    def should_prune(self, step: int) -> bool:
        """Whether masks are updated at `step`."""
        in_range = step >= self.begin_step and (self.end_step == -1 or step <= self.end_step)
        return in_range and (step - self.begin_step) % self.frequency == 0

    def __call__(self, step: int) -> tuple[bool, float]:
        """``(should_prune, sparsity)`` as TF-MOT's schedules return."""
        return self.should_prune(step), self.sparsity(step)


@dataclass(frozen=True)
class ConstantSparsity:
    """Prune to `target_sparsity` every `frequency` steps from `begin_step` to `end_step`."""

    target_sparsity: float
    begin_step: int = 0
    end_step: int = -1
    frequency: int = 100

    def __post_init__(self) -> None:
        if not 0.0 <= self.target_sparsity < 1.0:
            raise TvmqError(f"target_sparsity must be in [0, 1), got {self.target_sparsity}")
        if self.frequency < 1:
            raise TvmqError(f"frequency must be >= 1, got {self.frequency}")

    def sparsity(self, step: int) -> float:
        return self.target_sparsity if step >= self.begin_step else 0.0

    def should_prune(self, step: int) -> bool:
        in_range = step >= self.begin_step and (self.end_step == -1 or step <= self.end_step)
        return in_range and (step - self.begin_step) % self.frequency == 0

    def __call__(self, step: int) -> tuple[bool, float]:
        return self.should_prune(step), self.sparsity(step)


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """0/1 mask zeroing the ``round(sparsity * numel)`` smallest |w|, ties to the lower index."""
    flat = weight.detach().abs().flatten()
    k = int(sparsity * flat.numel() + 0.5)
    mask = torch.ones_like(flat)
    if k > 0:
        order = torch.sort(flat, stable=True).indices
        mask[order[:k]] = 0.0
    return mask.view_as(weight)


def prunable_weights(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The weights of every ``nn.Linear`` and ``nn.Conv2d`` in `model`, by module name."""
    return {
        name: m.weight
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
    }


class MagnitudePruner:
    """Keeps ``nn.Linear`` / ``nn.Conv2d`` weights masked on a sparsity schedule.

    Parameters
    ----------
    model : torch.nn.Module
        Pruned in place.
    schedule : PolynomialDecay or ConstantSparsity
        When and how far to prune; steps are counted by :meth:`step`.
    min_size : int
        Weights with fewer elements stay dense.
    """

    def __init__(self, model: torch.nn.Module, schedule, min_size: int = 0) -> None:
        self.model = model
        self.schedule = schedule
        self.step_count = 0
        self.weights = {n: w for n, w in prunable_weights(model).items() if w.numel() >= min_size}
        self.masks = {n: torch.ones_like(w) for n, w in self.weights.items()}
        modules = dict(model.named_modules())
        self._hooks = [
            modules[n].register_forward_pre_hook(self._make_hook(n)) for n in self.weights
        ]
        self._update(self.step_count)

    def _make_hook(self, name: str):
        def hook(_module, _inputs):
            with torch.no_grad():
                self.weights[name].mul_(self.masks[name])

        return hook

    def _update(self, step: int) -> None:
        prune, sparsity = self.schedule(step)
        with torch.no_grad():
            if prune:
                for n, w in self.weights.items():
                    self.masks[n] = magnitude_mask(w * self.masks[n], sparsity)
            self.apply_masks()

    def apply_masks(self) -> None:
        """Zero the pruned weights now."""
        with torch.no_grad():
            for n, w in self.weights.items():
                w.mul_(self.masks[n])

    def step(self) -> None:
        """Call after each optimizer step: advance the schedule, update and apply masks."""
        self.step_count += 1
        self._update(self.step_count)

    def sparsity(self) -> dict[str, float]:
        """Fraction of zero weights per pruned module."""
        return {n: float((w == 0).float().mean()) for n, w in self.weights.items()}

    def remove(self) -> torch.nn.Module:
        """Apply the masks a last time, remove the hooks, and return the model."""
        self.apply_masks()
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return self.model
