"""Knowledge distillation: fine-tune a (pruned) student on a teacher's soft labels.

Loss (Hinton et al., 2015)::

    alpha * T**2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, y)

With ``keep_masks=True`` (the default) the student's zero ``nn.Linear`` / ``nn.Conv2d``
weights are taken as its pruning masks and re-applied after every optimizer step, so a
pruned model stays exactly as sparse as it came in.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from tvmq.errors import TvmqError
from tvmq.pruning.schedule import prunable_weights


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 4.0,
    alpha: float = 0.7,
) -> torch.Tensor:
    """``alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE``, batch mean."""
    t = temperature
    kl = F.kl_div(
        F.log_softmax(student_logits / t, dim=-1),
        F.log_softmax(teacher_logits / t, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    return alpha * t * t * kl + (1.0 - alpha) * F.cross_entropy(student_logits, labels)


def _batches(data, batch_size: int, gen: torch.Generator):
    """A fresh iterable of (x, y) batches for one epoch."""
    if hasattr(data, "x_train") and hasattr(data, "y_train"):  # tvmq.demo.MnistSplit
        data = (data.x_train, data.y_train)
    if isinstance(data, tuple | list) and len(data) == 2 and not isinstance(data[0], tuple):
        x = torch.as_tensor(np.asarray(data[0]))
        y = torch.as_tensor(np.asarray(data[1]))
        if len(x) != len(y):
            raise TvmqError(f"distill: {len(x)} inputs but {len(y)} labels")
        perm = torch.randperm(len(x), generator=gen)
        return (
            (x[perm[i : i + batch_size]], y[perm[i : i + batch_size]])
            for i in range(0, len(x), batch_size)
        )
    if isinstance(data, Iterable):
        return iter(data)
    raise TvmqError(
        "distill: data must be a DataLoader (or iterable) of (x, y) batches, an (x, y) "
        f"pair of arrays, or an object with x_train/y_train; got {type(data).__name__}"
    )


def distill(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    data,
    epochs: int = 3,
    temperature: float = 4.0,
    alpha: float = 0.7,
    lr: float = 1e-3,
    keep_masks: bool = True,
    batch_size: int = 64,
    seed: int = 0,
) -> torch.nn.Module:
    """Train `student` to match `teacher` (frozen) and the labels; returns it in eval mode.

    Parameters
    ----------
    student, teacher : torch.nn.Module
        Same input and output shapes; the teacher is not changed.
    data
        A ``DataLoader``/iterable of ``(x, y)`` batches (re-iterated each epoch), a pair of
        arrays ``(x, y)`` (shuffled into `batch_size` batches), or a ``tvmq.demo.MnistSplit``.
    epochs : int
        Passes over the data.
    temperature, alpha : float
        Softening temperature ``T > 0`` and the weight ``alpha`` in [0, 1] of the soft loss.
    lr : float
        Adam learning rate.
    keep_masks : bool
        Keep the student's zero Linear/Conv2d weights at zero (pruned stays pruned).
    """
    if temperature <= 0:
        raise TvmqError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise TvmqError(f"alpha must be in [0, 1], got {alpha}")
    if epochs < 0:
        raise TvmqError(f"epochs must be >= 0, got {epochs}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    if keep_masks:
        masks = {n: (w != 0).to(w.dtype) for n, w in prunable_weights(student).items()}
    weights = prunable_weights(student)
    teacher.eval()
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    student.train()
    for _ in range(epochs):
        for x, y in _batches(data, batch_size, gen):
            with torch.no_grad():
                t_logits = teacher(x)
            loss = distillation_loss(student(x), t_logits, y, temperature, alpha)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if masks:
                with torch.no_grad():
                    for n, m in masks.items():
                        weights[n].mul_(m)
    return student.eval()
