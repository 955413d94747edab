"""Tiny brain-like phantoms with label maps, and a segmenter trained on them in seconds (tests only).

Each phantom is an ellipsoidal "brain" (label 3, bright) with a "cortex" shell (label 2, mid) and a
"ventricle" (label 1, dark) at a random place and size, plus Gaussian noise, on a grid with a flipped,
shifted affine. Label values can be remapped (e.g. ``{0, 10, 20, 30}``) to catch any interpolation of
labels, which would invent values between them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medidiff.io.nifti_write import write_nifti
from medidiff.volume import LabelVolume, Volume

AFFINE = np.array([[-2.0, 0, 0, 40.0], [0, 2.0, 0, -30.0], [0, 0, 2.0, -20.0], [0, 0, 0, 1]])
INTENSITY = {0: 5.0, 1: 60.0, 2: 140.0, 3: 220.0}


def phantom(seed: int, shape: tuple[int, int, int] = (24, 24, 24)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"))
    centre = np.array(shape) / 2 + rng.uniform(-1.5, 1.5, 3)
    radii = np.array(shape) * rng.uniform(0.3, 0.4, 3)
    r = np.sqrt((((g - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0))
    lab = np.zeros(shape, np.uint8)
    lab[r < 1.0] = 2
    lab[r < 0.75] = 3
    v_c = centre + rng.uniform(-1, 1, 3)
    lab[np.sqrt(((g - v_c[:, None, None, None]) ** 2).sum(0)) < rng.uniform(1.8, 3.0)] = 1
    img = np.vectorize(INTENSITY.get)(lab).astype(np.float32) + rng.normal(0, 12, shape).astype(np.float32)
    return img, lab


def write_pairs(root: Path, n: int, *, values: dict[int, int] | None = None, shape=(24, 24, 24)) -> Path:
    """``root/images/p-XXX.nii.gz`` and ``root/labels/p-XXX.nii.gz``; returns ``root``."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, lab = phantom(i, shape)
        if values is not None:
            lab = np.vectorize(values.get)(lab).astype(np.uint8)
        write_nifti(Volume(img, AFFINE, "MR"), root / "images" / f"p-{i:03d}.nii.gz")
        write_nifti(LabelVolume(lab, AFFINE, "MR"), root / "labels" / f"p-{i:03d}.nii.gz")
    return root


def write_label_card(path: Path, values: tuple[int, ...] = (0, 1, 2, 3)) -> Path:
    names = ["background", "csf", "gray_matter", "white_matter"]
    table = [{"value": v, "name": n} for v, n in zip(values, names, strict=True)]
    path.write_text(json.dumps({"label_sets": {"MR": table}}))
    return path


def write_config(
    root: Path, arch: str = "diffusion", values: tuple[int, ...] = (0, 1, 2, 3), **extra
) -> Path:
    """A segmentation YAML for ``root``'s pairs: tiny networks, 16^3 patches, 1.5 mm model grid."""
    import yaml

    write_label_card(root / "labels.json", values)
    model = {
        "arch": arch, "spacing_mm": 2.0, "patch_size": [16, 16, 16], "channels": [8, 16],
        "norm_num_groups": 4, "sample_steps": 2, "samples": 3, "overlap": 0.5,
        "train": {"budget_s": 600, "max_steps": 60, "batch_size": 2, "lr": 3e-3, "seed": 0},
        **extra,
    }  # fmt: skip
    cfg = {
        "data": {"images": "images", "labels": "labels", "include": "p-*.nii.gz", "modality": "MR",
                 "label_card": "labels.json", "label_set": "MR", "tuning": ["p-000"], "reporting": ["p-001"]},
        "model": model,
    }  # fmt: skip
    path = root / f"seg_{arch}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
