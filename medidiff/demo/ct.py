"""Analytic body CT phantoms: a trunk section with organs and lesions at realistic HU.

The phantom is defined in world coordinates (RAS mm, centred on the table position) by
elliptic cylinders and ellipsoids, painted in a fixed order (later shapes cover earlier ones),
so the label map is known by construction and independent of the sampling grid. Parameters are
drawn once (:func:`draw_ct_params`) and applied deterministically (:func:`synthesize_ct`).

Values are whole Hounsfield units in ``[-1024, 3071]``, which DICOM stores exactly with
RescaleIntercept -1024 and RescaleSlope 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from medidiff.demo import Grid
from medidiff.volume import LabelVolume, Volume

__all__ = [
    "CT_BOX_HALF_EXTENT",
    "CT_LABELS",
    "CTPhantomParams",
    "Ellipsoid",
    "draw_ct_params",
    "synthesize_ct",
]

CT_LABELS: dict[int, str] = {
    0: "background",
    1: "body",
    2: "lung",
    3: "liver",
    4: "kidney",
    5: "bone",
    6: "lesion",
}

# Half extent (mm) of the box around the phantom centre that an acquisition grid must cover.
CT_BOX_HALF_EXTENT = np.array([200.0, 150.0, 60.0])

_HU_MIN, _HU_MAX = -1024, 3071


@dataclass(frozen=True)
class Ellipsoid:
    """An axis-aligned ellipsoid (mm, relative to the phantom centre) with its HU value."""

    centre: tuple[float, float, float]
    semi_axes: tuple[float, float, float]
    hu: float

    def inside(self, p: np.ndarray) -> np.ndarray:
        q = (p - np.asarray(self.centre)) / np.asarray(self.semi_axes)
        return np.einsum("...i,...i->...", q, q) <= 1.0


@dataclass(frozen=True)
class CTPhantomParams:
    """One phantom. Positions are RAS mm relative to ``centre`` (the table position).

    Attributes:
        centre: world position of the phantom centre.
        body_semi_axes: (left-right, anterior-posterior) semi-axes of the body outline.
        fat_thickness: subcutaneous fat layer thickness (mm).
        hu_fat, hu_muscle, hu_bone, hu_canal: tissue values.
        lungs, liver, kidneys: organ ellipsoids.
        spine_centre: (x, y) of the vertebral body axis; ``spine_radius`` its radius.
        lesions: spheres inside the liver (their ``hu`` is absolute).
        noise_sigma: Gaussian noise standard deviation (HU).
        noise_seed: seed of the noise generator.
    """

    centre: tuple[float, float, float]
    body_semi_axes: tuple[float, float]
    fat_thickness: float
    hu_fat: float
    hu_muscle: float
    hu_bone: float
    hu_canal: float
    lungs: tuple[Ellipsoid, ...]
    liver: Ellipsoid
    kidneys: tuple[Ellipsoid, ...]
    spine_centre: tuple[float, float]
    spine_radius: float
    lesions: tuple[Ellipsoid, ...] = field(default_factory=tuple)
    noise_sigma: float = 10.0
    noise_seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _r(x: float, nd: int = 2) -> float:
    return round(float(x), nd)


def draw_ct_params(rng: np.random.Generator, *, max_lesions: int = 3) -> CTPhantomParams:
    """Draw one phantom: body size, organ positions and values jittered, 0..``max_lesions`` lesions."""
    jit = lambda s: float(rng.normal(0.0, s))  # noqa: E731 - a tiny local helper reads best inline
    sx, sy = rng.uniform(0.88, 1.12, 2)
    a, b = 165.0 * sx, 115.0 * sy
    centre = (_r(rng.uniform(-20, 20)), _r(rng.uniform(-15, 15)), _r(rng.uniform(-30, 30)))
    lungs = tuple(
        Ellipsoid(
            centre=(_r(side * 0.45 * a + jit(4)), _r(0.05 * b + jit(4)), _r(60 + jit(5))),
            semi_axes=(_r(0.33 * a), _r(0.55 * b), 55.0),
            hu=_r(-850 + jit(15), 0),
        )
        for side in (-1, 1)
    )
    # RAS: +x points to the patient's right, where the liver is.
    liver = Ellipsoid(
        centre=(_r(0.38 * a + jit(5)), _r(0.1 * b + jit(5)), _r(10 + jit(5))),
        semi_axes=(_r(0.45 * a * rng.uniform(0.9, 1.1)), _r(0.55 * b), _r(rng.uniform(45, 60))),
        hu=_r(60 + jit(5), 0),
    )
    kidneys = tuple(
        Ellipsoid(
            centre=(_r(side * 0.42 * a + jit(3)), _r(-0.45 * b + jit(3)), _r(-30 + jit(5))),
            semi_axes=(28.0, 24.0, 50.0),
            hu=_r(30 + jit(4), 0),
        )
        for side in (-1, 1)
    )
    lesions = []
    for _ in range(int(rng.integers(0, max_lesions + 1))):
        # A point well inside the liver, so the lesion is (mostly) parenchymal.
        d = rng.normal(size=3)
        d = d / np.linalg.norm(d) * rng.uniform(0, 0.55)
        pos = np.asarray(liver.centre) + d * np.asarray(liver.semi_axes)
        radius = float(rng.uniform(6, 16))
        hu = liver.hu + (rng.uniform(-45, -20) if rng.random() < 0.7 else rng.uniform(30, 70))
        lesions.append(Ellipsoid(centre=tuple(_r(p) for p in pos), semi_axes=(_r(radius),) * 3, hu=_r(hu, 0)))  # type: ignore[arg-type]
    return CTPhantomParams(
        centre=centre,
        body_semi_axes=(_r(a), _r(b)),
        fat_thickness=_r(rng.uniform(8, 25)),
        hu_fat=_r(-100 + jit(8), 0),
        hu_muscle=_r(40 + jit(5), 0),
        hu_bone=_r(rng.uniform(650, 900), 0),
        hu_canal=_r(20 + jit(3), 0),
        lungs=lungs,
        liver=liver,
        kidneys=kidneys,
        spine_centre=(_r(jit(2)), _r(-0.7 * b)),
        spine_radius=_r(rng.uniform(15, 20)),
        lesions=tuple(lesions),
        noise_sigma=_r(rng.uniform(6, 18)),
        noise_seed=int(rng.integers(0, 2**31 - 1)),
    )


def synthesize_ct(params: CTPhantomParams, grid: Grid, *, noise: bool = True) -> tuple[Volume, LabelVolume]:
    """Render the phantom on ``grid``.

    Returns:
        ``(image, labels)``: whole HU values (int16, modality CT) and the ``CT_LABELS`` map.
    """
    p = grid.world() - np.asarray(params.centre)
    x, y = p[..., 0], p[..., 1]
    a, b = params.body_semi_axes
    hu = np.full(grid.shape, -1000.0)
    lab = np.zeros(grid.shape, np.uint8)

    def paint(mask: np.ndarray, value: float, label: int) -> None:
        hu[mask] = value
        lab[mask] = label

    body = (x / a) ** 2 + (y / b) ** 2 <= 1.0
    t = params.fat_thickness
    inner = (x / (a - t)) ** 2 + (y / (b - t)) ** 2 <= 1.0
    paint(body, params.hu_fat, 1)
    paint(inner, params.hu_muscle, 1)
    for lung in params.lungs:
        paint(lung.inside(p) & inner, lung.hu, 2)
    paint(params.liver.inside(p) & inner, params.liver.hu, 3)
    for kidney in params.kidneys:
        paint(kidney.inside(p) & inner, kidney.hu, 4)
    sx, sy = params.spine_centre
    r = params.spine_radius
    paint((x - sx) ** 2 + (y - sy) ** 2 <= r**2, params.hu_bone, 5)
    # Posterior arch with the spinal canal inside it.
    arch_y = sy - 1.6 * r
    paint(((x - sx) ** 2 + (y - arch_y) ** 2 <= (0.9 * r) ** 2) & inner, params.hu_bone, 5)
    paint((x - sx) ** 2 + (y - arch_y) ** 2 <= (0.45 * r) ** 2, params.hu_canal, 1)
    for lesion in params.lesions:
        paint(lesion.inside(p) & (lab == 3), lesion.hu, 6)
    if noise and params.noise_sigma > 0:
        hu += np.random.default_rng(params.noise_seed).normal(0.0, params.noise_sigma, grid.shape)
    values = np.clip(np.rint(hu), _HU_MIN, _HU_MAX).astype(np.int16)
    return (
        Volume(values, grid.affine.copy(), "CT"),
        LabelVolume(lab, grid.affine.copy(), "CT", labels=dict(CT_LABELS)),
    )
