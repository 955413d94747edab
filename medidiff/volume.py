"""Volume data model: voxels that always travel with their 4x4 RAS affine.

A :class:`Volume` holds intensities; a :class:`LabelVolume` holds integer labels. They are
distinct types so that labels are never intensity-normalised and always resampled with
nearest neighbour (torchio's ``ScalarImage`` / ``LabelMap`` split).

Conventions
-----------
- ``array`` is indexed ``[i, j, k]`` and ``affine`` maps ``(i, j, k, 1)`` to RAS+ millimetres,
  exactly as in NIfTI/nibabel.
- SimpleITK and DICOM use LPS+; the conversion is ``RAS = diag(-1, -1, 1, 1) @ LPS``.
- MONAI ``MetaTensor`` objects are channel-first ``(1, i, j, k)`` with ``meta["affine"]`` in RAS.

Only numpy is imported at module level; nibabel, SimpleITK and MONAI are imported inside the
conversion functions so that the compute core stays importable on a bare torch+monai machine.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Self

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import nibabel as nib
    import SimpleITK as sitk
    from monai.data import MetaTensor

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

__all__ = [
    "LPS_TO_RAS",
    "LabelVolume",
    "Volume",
    "affine_from_lps",
    "affine_is_valid",
    "orientation_codes",
    "spacing_from_affine",
]


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis (column norms of the 3x3 block)."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0))


def affine_is_valid(affine: np.ndarray, *, min_spacing: float = 1e-6) -> tuple[bool, str]:
    """Check a 4x4 affine is finite, non-singular and has a proper last row.

    Returns:
        ``(ok, reason)``; ``reason`` is empty when ``ok``.
    """
    a = np.asarray(affine, dtype=float)
    if a.shape != (4, 4):
        return False, f"affine has shape {a.shape}, expected (4, 4)"
    if not np.all(np.isfinite(a)):
        return False, "affine contains NaN or infinite values"
    if not np.allclose(a[3], [0, 0, 0, 1]):
        return False, f"affine last row is {a[3].tolist()}, expected [0, 0, 0, 1]"
    sp = np.linalg.norm(a[:3, :3], axis=0)
    if np.any(sp < min_spacing):
        return False, f"affine has a zero-length axis (spacing {sp.tolist()})"
    # Condition number of the direction cosines: a singular or near-singular matrix means two
    # axes point the same way and world coordinates are meaningless.
    direction = a[:3, :3] / sp
    if abs(np.linalg.det(direction)) < 1e-3:
        return False, "affine is singular (axes are collinear)"
    return True, ""


def orientation_codes(affine: np.ndarray) -> str:
    """Three-letter axis codes (e.g. ``"RAS"``, ``"LPS"``) of the closest axis-aligned orientation."""
    import nibabel as nib

    return "".join(nib.aff2axcodes(np.asarray(affine, float)))


def affine_from_lps(direction: np.ndarray, spacing: tuple[float, ...], origin: np.ndarray) -> np.ndarray:
    """RAS affine from an ITK/DICOM-style LPS description (direction columns are unit axes)."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(direction, float).reshape(3, 3) * np.asarray(spacing, float)[None, :]
    lps[:3, 3] = np.asarray(origin, float)
    return LPS_TO_RAS @ lps


def _meta_for_json(meta: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(meta)


@dataclass(eq=False)
class Volume:
    """An intensity volume: voxels plus RAS affine, modality and free-form JSON-able metadata.

    Args:
        array: 3D voxel array indexed ``[i, j, k]``.
        affine: 4x4 voxel-to-RAS+ (mm) matrix.
        modality: DICOM modality code (``"CT"``, ``"MR"``, ...) or ``"OT"`` when unknown.
        meta: JSON-serialisable metadata (acquisition parameters, warnings, normalisation).
    """

    array: np.ndarray
    affine: np.ndarray
    modality: str = "OT"
    meta: dict[str, Any] = field(default_factory=dict)

    kind: ClassVar[str] = "intensity"

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        if not self.array.dtype.isnative:
            # Big-endian files give big-endian arrays; torch and SimpleITK accept native order only.
            self.array = self.array.astype(self.array.dtype.newbyteorder("="))
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.array.ndim != 3:
            raise ValueError(
                f"{type(self).__name__} needs a 3D array, got shape {self.array.shape}; "
                "split 4D data into one volume per frame first."
            )
        ok, reason = affine_is_valid(self.affine)
        if not ok:
            raise ValueError(f"invalid affine for {type(self).__name__}: {reason}")

    # ------------------------------------------------------------------ geometry
    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return spacing_from_affine(self.affine)

    @property
    def orientation(self) -> str:
        return orientation_codes(self.affine)

    def corners_world(self) -> np.ndarray:
        """World (RAS, mm) coordinates of the 8 corner voxel centres, shape (8, 3)."""
        n = np.array(self.shape) - 1
        idx = np.array([[a, b, c] for a in (0, n[0]) for b in (0, n[1]) for c in (0, n[2])], float)
        return (self.affine[:3, :3] @ idx.T).T + self.affine[:3, 3]

    def with_array(self, array: np.ndarray, affine: np.ndarray | None = None, **meta: Any) -> Self:
        """Same type and metadata, new voxels (and optionally a new affine)."""
        new_meta = {**_meta_for_json(self.meta), **meta}
        return replace(self, array=array, affine=self.affine if affine is None else affine, meta=new_meta)

    # ------------------------------------------------------------------ nibabel
    def to_nibabel(self) -> nib.Nifti1Image:
        """NIfTI-1 image with identical sform and qform (code 1, scanner) so all readers agree."""
        import nibabel as nib

        img = nib.Nifti1Image(self.array, self.affine)
        # update_affine=False keeps img.affine in float64; only the file header is float32.
        img.set_sform(self.affine, code=1, update_affine=False)
        img.set_qform(self.affine, code=1, update_affine=False)
        img.header.set_xyzt_units("mm", "sec")
        if self.kind == "label":
            img.header.set_intent("label")
        return img

    @classmethod
    def from_nibabel(cls, img: nib.spatialimages.SpatialImage, modality: str = "OT", **meta: Any) -> Self:
        """From any nibabel spatial image, using nibabel's sform/qform choice (``img.affine``)."""
        if cls.kind == "intensity" and _has_scaling(img):
            # scl_slope/scl_inter are part of the voxel values: apply them in float.
            data = img.get_fdata(dtype=np.float32)
        else:
            data = np.asanyarray(img.dataobj)  # lossless: keep the stored dtype
        return cls(array=np.asarray(data), affine=np.asarray(img.affine, float), modality=modality, meta=meta)

    # ------------------------------------------------------------------ SimpleITK
    def to_sitk(self) -> sitk.Image:
        """SimpleITK image (LPS, array order k,j,i) with the same world geometry."""
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(np.ascontiguousarray(self.array.transpose(2, 1, 0)))
        lps = LPS_TO_RAS @ self.affine
        sp = np.array(self.spacing)
        img.SetSpacing(tuple(float(s) for s in sp))
        img.SetOrigin(tuple(float(o) for o in lps[:3, 3]))
        img.SetDirection(tuple(float(d) for d in (lps[:3, :3] / sp[None, :]).ravel()))
        return img

    @classmethod
    def from_sitk(cls, img: sitk.Image, modality: str = "OT", **meta: Any) -> Self:
        import SimpleITK as sitk

        if img.GetDimension() != 3:
            raise ValueError(f"expected a 3D SimpleITK image, got dimension {img.GetDimension()}")
        arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
        aff = affine_from_lps(np.array(img.GetDirection()), img.GetSpacing(), np.array(img.GetOrigin()))
        return cls(array=arr, affine=aff, modality=modality, meta=meta)

    # ------------------------------------------------------------------ MONAI
    def to_metatensor(self) -> MetaTensor:
        """Channel-first MONAI MetaTensor ``(1, i, j, k)`` with the RAS affine in its metadata."""
        import torch
        from monai.data import MetaTensor
        from monai.utils import MetaKeys, SpaceKeys

        meta = {
            MetaKeys.SPACE: SpaceKeys.RAS,
            "modality": self.modality,
            "kind": self.kind,
            "medidiff_meta": _meta_for_json(self.meta),
            "labels": {str(k): v for k, v in getattr(self, "labels", {}).items()},
        }
        t = torch.as_tensor(np.ascontiguousarray(self.array))[None]
        return MetaTensor(t, affine=torch.as_tensor(self.affine, dtype=torch.float64), meta=meta)

    @classmethod
    def from_metatensor(cls, mt: MetaTensor, modality: str | None = None) -> Self:
        """From a MONAI MetaTensor (channel-first with one channel, or plain 3D)."""
        from monai.utils import MetaKeys, SpaceKeys

        arr = mt.detach().cpu().numpy()
        if arr.ndim == 4:
            if arr.shape[0] != 1:
                raise ValueError(f"expected one channel, got {arr.shape[0]}; select a channel first")
            arr = arr[0]
        affine = np.asarray(mt.affine.detach().cpu().numpy(), float)
        if str(mt.meta.get(MetaKeys.SPACE, SpaceKeys.RAS)) == str(SpaceKeys.LPS):
            affine = LPS_TO_RAS @ affine
        meta = dict(mt.meta.get("medidiff_meta", {}))
        extra: dict[str, Any] = {}
        if cls.kind == "label":
            extra["labels"] = {int(k): v for k, v in dict(mt.meta.get("labels", {})).items()}
        return cls(
            array=arr,
            affine=affine,
            modality=modality or str(mt.meta.get("modality", "OT")),
            meta=meta,
            **extra,
        )


def _has_scaling(img: Any) -> bool:
    # A loaded image keeps scl_slope/scl_inter on its array proxy; its header's are reset to NaN.
    proxy_slope = getattr(img.dataobj, "slope", 1.0)
    proxy_inter = getattr(img.dataobj, "inter", 0.0)
    if proxy_slope != 1.0 or proxy_inter != 0.0:
        return True
    hdr = getattr(img, "header", None)
    if hdr is None or not hasattr(hdr, "get_slope_inter"):
        return False
    slope, inter = hdr.get_slope_inter()
    return not ((slope is None or slope == 1.0) and (inter is None or inter == 0.0))


@dataclass(eq=False)
class LabelVolume(Volume):
    """A label map: integer voxels, resampled nearest-neighbour, never intensity-normalised.

    ``labels`` maps each integer value to a name (``{0: "background", 1: "csf", ...}``).
    """

    labels: dict[int, str] = field(default_factory=dict)

    kind: ClassVar[str] = "label"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.array.dtype.kind == "f":
            if not np.all(np.isfinite(self.array)) or not np.all(self.array == np.round(self.array)):
                raise ValueError("label volume has non-integer values; round or threshold it first")
            self.array = self.array.astype(
                np.int16 if np.abs(self.array).max(initial=0) < 32768 else np.int32
            )
        elif self.array.dtype.kind not in "iub":
            raise ValueError(f"label volume needs an integer array, got dtype {self.array.dtype}")
        elif self.array.dtype == np.bool_:
            self.array = self.array.astype(np.uint8)  # NIfTI and SimpleITK have no bool type
        elif self.array.dtype.itemsize == 8:
            # nibabel refuses 64-bit integers without an explicit dtype; labels never need them.
            lo, hi = int(self.array.min(initial=0)), int(self.array.max(initial=0))
            for t in (np.int16, np.int32):
                if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max:
                    self.array = self.array.astype(t)
                    break
