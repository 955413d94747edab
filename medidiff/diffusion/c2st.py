"""Classifier two-sample test (C2ST) of real against synthetic volumes, with a tiny CNN (issue 15).

Lopez-Paz & Oquab (ICLR 2017): if a classifier trained to tell two sets apart does no better than
chance on volumes it did not train on, the sets are indistinguishable to it. Here the classifier is
three stride-2 convolutions, global average pooling and a linear layer (4,473 parameters in 3D), the
score is the AUC of its logits on the test split (synthetic = positive class) by the Mann-Whitney
statistic, and :func:`hanley_mcneil_se` gives its standard error so a reader sees the spread. Used by
:func:`medidiff.diffusion.realism.realism_report`, which also holds the acceptance threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "C2STResult",
    "as_stack",
    "auc_mann_whitney",
    "c2st",
    "check_same_grid",
    "hanley_mcneil_se",
]

C2ST_TEST_FRACTION = 0.5  # of each class, stratified
C2ST_EPOCHS = 20
C2ST_BATCH = 8
C2ST_LR = 3e-3
C2ST_CHANNELS = (4, 8, 16)  # three stride-2 3x3(x3) convolutions: 4,473 parameters in 3D, 1,521 in 2D


def as_stack(x: Tensor | np.ndarray, name: str, *, min_n: int = 1) -> Tensor:
    """``x`` as a float32 CPU stack ``(N, H, W)`` or ``(N, D, H, W)`` of finite values, at least ``min_n``."""
    t = torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float32)
    if t.ndim not in (3, 4):
        raise ValueError(
            f"{name} must be a stack of images (N, H, W) or volumes (N, D, H, W); got {tuple(t.shape)}"
        )
    if t.shape[0] < min_n:
        raise ValueError(f"{name} needs at least {min_n} volumes, got {t.shape[0]}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} has NaN or infinite voxels; fix or drop those volumes first")
    return t


def check_same_grid(*named: tuple[str, Tensor]) -> None:
    """Refuse stacks on different grids, naming each one's shape."""
    shapes = {name: tuple(t.shape[1:]) for name, t in named}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"all sets must be on one grid; got {shapes}. Resample / pad them to one grid first")


# ---------------------------------------------------------------------------------- rank statistics


def _midranks(x: Tensor) -> Tensor:
    """Ranks 1..n of ``x`` (float64), tied values sharing the mean of their ranks."""
    order = torch.argsort(x, stable=True)
    _, inverse, counts = torch.unique_consecutive(x[order], return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    mid = ends - (counts.to(torch.float64) - 1) / 2
    ranks = torch.empty(x.shape[0], dtype=torch.float64)
    ranks[order] = mid[inverse]
    return ranks


def auc_mann_whitney(pos: Tensor | np.ndarray, neg: Tensor | np.ndarray) -> float:
    """``P(s_pos > s_neg) + P(s_pos = s_neg) / 2`` from the Mann-Whitney U statistic with midranks.

    Args:
        pos: scores of the positive class (here: synthetic), at least one.
        neg: scores of the negative class (real), at least one.
    """
    p = torch.as_tensor(pos).detach().to(torch.float64).reshape(-1)
    n = torch.as_tensor(neg).detach().to(torch.float64).reshape(-1)
    if p.numel() == 0 or n.numel() == 0:
        raise ValueError("the AUC needs at least one score of each class")
    if not (bool(torch.isfinite(p).all()) and bool(torch.isfinite(n).all())):
        raise ValueError("scores must be finite")
    n1, n0 = p.numel(), n.numel()
    u = float(_midranks(torch.cat([p, n]))[:n1].sum()) - n1 * (n1 + 1) / 2
    return u / (n1 * n0)


def hanley_mcneil_se(auc: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an AUC, eq. 2 of Hanley & McNeil (Radiology 1982)."""
    if not 0.0 <= auc <= 1.0 or n_pos < 1 or n_neg < 1:
        raise ValueError(f"need 0 <= auc <= 1 and class sizes >= 1; got {auc}, {n_pos}, {n_neg}")
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)) / (n_pos * n_neg)
    return math.sqrt(max(var, 0.0))


@dataclass(frozen=True)
class C2STResult:
    """A classifier two-sample test (real = 0, synthetic = 1); ``auc`` on the test split."""

    auc: float
    auc_se: float  # Hanley-McNeil
    accuracy: float  # logit > 0 counts as "synthetic"
    balanced_accuracy: float
    n_train_real: int
    n_train_synthetic: int
    n_test_real: int
    n_test_synthetic: int
    test_fraction: float
    epochs: int
    n_parameters: int
    final_train_loss: float


def _c2st_net(spatial_dims: int, generator: torch.Generator) -> nn.Sequential:
    conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
    pool = nn.AdaptiveAvgPool3d if spatial_dims == 3 else nn.AdaptiveAvgPool2d
    # Module constructors draw their default init from the global RNG: keep the caller's state intact.
    with torch.random.fork_rng(devices=[]):
        layers: list[nn.Module] = []
        c_in = 1
        for c in C2ST_CHANNELS:
            layers += [conv(c_in, c, 3, stride=2, padding=1), nn.SiLU()]
            c_in = c
        net = nn.Sequential(*layers, pool(1), nn.Flatten(), nn.Linear(c_in, 1))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, conv | nn.Linear):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu", generator=generator)
                nn.init.zeros_(m.bias)
    return net


def _stratified_split(n: int, test_fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=generator)
    n_test = min(max(round(test_fraction * n), 1), n - 1)
    return perm[n_test:], perm[:n_test]


def c2st(
    real: Tensor | np.ndarray,
    synthetic: Tensor | np.ndarray,
    *,
    generator: torch.Generator,
    test_fraction: float = C2ST_TEST_FRACTION,
    epochs: int = C2ST_EPOCHS,
    batch_size: int = C2ST_BATCH,
    lr: float = C2ST_LR,
) -> C2STResult:
    """Classifier two-sample test (Lopez-Paz & Oquab, ICLR 2017) with a tiny CNN, in float32.

    Each class is split at random into train and test (``round(test_fraction * n)`` test volumes,
    Python's rounding, halves to even; at least one in each part). Three stride-2 3x3x3 convolutions (SiLU), global average pooling and a
    linear layer are trained with Adam on a class-balanced logistic loss (each class weighs half).
    The test volumes' logits give the AUC (synthetic as the positive class), its Hanley-McNeil
    standard error and the accuracy at logit 0. The same inputs, generator state and thread count give
    the same result; the global RNG is left as it was.

    Args:
        real, synthetic: ``(N, D, H, W)`` or ``(N, H, W)`` stacks on one grid, at least 2 of each.
        generator: the split, the initial weights and the batch order, in that order.
        test_fraction: share of each class held out for the AUC, in (0, 1).
        epochs, batch_size, lr: training.
    """
    r = as_stack(real, "real", min_n=2)
    s = as_stack(synthetic, "synthetic", min_n=2)
    check_same_grid(("real", r), ("synthetic", s))
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")
    r_train, r_test = _stratified_split(r.shape[0], test_fraction, generator)
    s_train, s_test = _stratified_split(s.shape[0], test_fraction, generator)
    net = _c2st_net(r.ndim - 1, generator)
    x_train = torch.cat([r[r_train], s[s_train]])[:, None]
    y_train = torch.cat([torch.zeros(len(r_train)), torch.ones(len(s_train))])
    w_train = torch.cat(
        [torch.full((len(r_train),), 0.5 / len(r_train)), torch.full((len(s_train),), 0.5 / len(s_train))]
    )
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    loss = torch.zeros(())
    for _ in range(epochs):
        order = torch.randperm(x_train.shape[0], generator=generator)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            per = F.binary_cross_entropy_with_logits(net(x_train[idx])[:, 0], y_train[idx], reduction="none")
            loss = (w_train[idx] * per).sum() / w_train[idx].sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        logit_r = net(r[r_test][:, None])[:, 0]
        logit_s = net(s[s_test][:, None])[:, 0]
    auc = auc_mann_whitney(logit_s, logit_r)
    tpr, tnr = float((logit_s > 0).double().mean()), float((logit_r <= 0).double().mean())
    n_r, n_s = len(r_test), len(s_test)
    return C2STResult(
        auc=auc,
        auc_se=hanley_mcneil_se(auc, n_s, n_r),
        accuracy=(tpr * n_s + tnr * n_r) / (n_s + n_r),
        balanced_accuracy=(tpr + tnr) / 2,
        n_train_real=len(r_train),
        n_train_synthetic=len(s_train),
        n_test_real=n_r,
        n_test_synthetic=n_s,
        test_fraction=test_fraction,
        epochs=epochs,
        n_parameters=sum(p.numel() for p in net.parameters()),
        final_train_loss=float(loss.detach()),
    )
