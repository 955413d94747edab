"""Segmentation metrics (MONAI's where MONAI has them), computed in fp32 or wider.

- Dice and HD95 (mm) per structure: ``monai.metrics.compute_dice`` and ``compute_hausdorff_distance``
  (95th percentile, the voxel spacing passed, so distances are in mm);
- expected calibration error of the class probabilities: ``monai.metrics.CalibrationErrorMetric``
  (20 bins, every class including the background, averaged over classes);
- the AUROC of a per-voxel uncertainty for finding misclassified voxels (Mann-Whitney with midranks): 1.0
  means every wrong voxel is more uncertain than every right one, 0.5 means the map is no guide.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["error_auroc", "segmentation_metrics"]


def error_auroc(uncertainty: np.ndarray | Tensor, wrong: np.ndarray | Tensor) -> float:
    """AUROC of ``uncertainty`` as a score for ``wrong`` voxels (NaN when all are right or all wrong)."""
    from medidiff.diffusion.c2st import auc_mann_whitney

    u = torch.as_tensor(np.asarray(uncertainty)).to(torch.float64).reshape(-1)
    w = torch.as_tensor(np.asarray(wrong)).to(torch.bool).reshape(-1)
    if bool(w.all()) or not bool(w.any()):
        return float("nan")
    return auc_mann_whitney(u[w], u[~w])


def _one_hot(index: Tensor, c: int) -> Tensor:
    return torch.nn.functional.one_hot(index.long(), c).movedim(-1, 0)[None].to(torch.float32)


def segmentation_metrics(
    pred: np.ndarray,
    truth: np.ndarray,
    probabilities: np.ndarray,
    uncertainty: np.ndarray,
    *,
    spacing: Sequence[float],
    names: Sequence[str],
    mask: np.ndarray | None = None,
) -> dict[str, Any]:
    """Metrics of one volume.

    Args:
        pred: predicted class indices ``(*spatial)``.
        truth: true class indices ``(*spatial)``.
        probabilities: class probabilities ``(C, *spatial)``.
        uncertainty: per-voxel uncertainty ``(*spatial)`` (higher = less sure).
        spacing: voxel size in mm along the array axes.
        names: class names, background first (C of them).
        mask: voxels that count for the error AUROC's second figure (e.g. the head); all by default.

    Returns:
        ``{"dice": {name: ...}, "hd95_mm": {name: ...}, "calibration_error": ..., "error_auroc": ...,
        "error_auroc_in_mask": ..., "error_rate": ...}``.
    """
    from monai.metrics import CalibrationErrorMetric, compute_dice, compute_hausdorff_distance

    c = len(names)
    if probabilities.shape[0] != c or pred.shape != truth.shape or probabilities.shape[1:] != truth.shape:
        raise ValueError(
            f"shapes disagree: pred {pred.shape}, truth {truth.shape}, probabilities {probabilities.shape}, {c} names"
        )
    p1, t1 = _one_hot(torch.from_numpy(pred), c), _one_hot(torch.from_numpy(truth), c)
    dice = compute_dice(p1, t1, include_background=False)[0]
    hd = compute_hausdorff_distance(p1, t1, include_background=False, percentile=95, spacing=list(spacing))[0]
    cal = CalibrationErrorMetric(num_bins=20, include_background=True)
    cal(torch.from_numpy(np.asarray(probabilities, np.float32))[None], t1)
    wrong = pred != truth
    m = np.ones_like(wrong) if mask is None else mask.astype(bool)
    return {
        "dice": {n: float(d) for n, d in zip(names[1:], dice.tolist(), strict=True)},
        "hd95_mm": {n: float(h) for n, h in zip(names[1:], hd.tolist(), strict=True)},
        "calibration_error": float(cal.aggregate()),
        "error_auroc": error_auroc(uncertainty, wrong),
        "error_auroc_in_mask": error_auroc(uncertainty[m], wrong[m]),
        "error_rate": float(wrong.mean()),
        "error_rate_in_mask": float(wrong[m].mean()),
    }
