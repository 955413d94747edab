"""NIfTI reader: one file to one or more :class:`~medidiff.volume.Volume` objects, problems reported.

Which affine is used
--------------------
A NIfTI-1/2 header can hold two voxel-to-world transforms, the *sform* (a free 3x4 matrix,
``srow_x/y/z``) and the *qform* (a rotation quaternion, ``pixdim`` voxel sizes and an offset), each
with a code saying what space it maps to (0 = unknown, 1 = scanner, 2 = aligned, 3 = Talairach,
4 = MNI, 5 = template). Readers disagree on which one wins, so this module computes both choices:

**nibabel** (``Nifti1Header.get_best_affine``), which this reader *uses*:

1. ``sform_code > 0`` -> the sform, whatever it contains (shears and scales included);
2. else ``qform_code > 0`` -> the qform;
3. else the Analyze fall-back: ``diag(-pixdim1, pixdim2, pixdim3)`` with the origin at the centre
   of the array (``shape_zoom_affine`` with an x flip).

**ITK 5.x** always takes the voxel size from ``|pixdim[1:4]|`` and only the direction and the
origin from the sform or the qform (an ``itk::Image`` cannot hold a shear); which transform it
picks, and when it refuses the file, is restated in :mod:`medidiff.io.nifti_itk`.

When the nibabel geometry and the ITK geometry put a corner voxel more than ``mismatch_tol_mm``
apart, the reader keeps nibabel's choice and reports :attr:`ProblemKind.QFORM_SFORM_MISMATCH`
(warning) naming the form used and the one ITK-based tools (ANTs, 3D Slicer, SimpleITK) would use.

What happens to each problem
----------------------------
====================================  ============================================================
Case                                  Outcome
====================================  ============================================================
empty file                            ``ConversionError`` EMPTY_FILE
gzip stream cut short                 ``ConversionError`` TRUNCATED_FILE
bad gzip stream / CRC, not NIfTI      ``ConversionError`` UNREADABLE_FILE
voxel data shorter than the header    ``ConversionError`` TRUNCATED_FILE
chosen affine zero/NaN/singular,      warning DEGENERATE_AFFINE, the other form is used (so does
  the other form valid                ITK for a zero or singular sform, not for a NaN one)
no usable affine at all               ``ConversionError`` DEGENERATE_AFFINE
both codes 0 (no orientation)         warning DEGENERATE_AFFINE (``reason: no_xform``), nibabel's
                                      fall-back affine is used
sform/qform (or nibabel/ITK) differ   warning QFORM_SFORM_MISMATCH
NaN/inf intensities                   warning NONFINITE_VOXELS with counts; voxels left as they are
NaN/inf or fractional labels          ``ConversionError`` NONFINITE_VOXELS / CONVERSION_FAILED
4D with one frame                     squeezed to 3D silently
4D with several frames                ``four_d="split"`` (default): one volume per frame and a
                                      warning FOUR_D; ``four_d="error"``: ``ConversionError`` FOUR_D
5D and more (after dropping trailing  ``ConversionError`` UNSUPPORTED_IMAGE
  size-1 axes)
RGB / complex voxels                  ``ConversionError`` UNSUPPORTED_IMAGE
====================================  ============================================================

A 1D or 2D image gets trailing size-1 axes and is read as a 3D volume.
"""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from medidiff.io.nifti_itk import ItkAffineSource, itk_choice
from medidiff.problems import ConversionError, Problem, ProblemKind, Severity
from medidiff.volume import LabelVolume, Volume, affine_is_valid

__all__ = [
    "SIDECAR_KEYS",
    "AffineChoice",
    "NiftiReadResult",
    "read_nifti",
    "resolve_affines",
    "sidecar_path",
]

AffineSource = Literal["sform", "qform", "fallback"]

# Acquisition fields copied from a BIDS-like JSON sidecar into ``meta["sidecar"]``. A whitelist,
# because sidecars written by some converters carry names, dates and device serial numbers.
SIDECAR_KEYS: tuple[str, ...] = (
    "Modality",
    "MagneticFieldStrength",
    "Manufacturer",
    "ManufacturersModelName",
    "ScanningSequence",
    "SequenceVariant",
    "MRAcquisitionType",
    "RepetitionTime",
    "EchoTime",
    "InversionTime",
    "FlipAngle",
    "SliceThickness",
    "SpacingBetweenSlices",
    "KVP",
    "XRayExposure",
    "ConvolutionKernel",
    "ContrastBolusAgent",
)

_NIFTI_SUFFIXES = (".nii.gz", ".nii", ".hdr", ".img", ".img.gz")


@dataclass
class AffineChoice:
    """The transforms of one NIfTI header and which one each reader picks.

    Attributes:
        affine: the affine this reader uses (nibabel's choice, or the other form if that is degenerate).
        source: which transform ``affine`` came from.
        nibabel_source: nibabel's choice (differs from ``source`` only after a degenerate fall-back).
        itk_affine: the RAS affine SimpleITK would report (direction * ``|pixdim|`` + origin), or
            ``None`` when ITK would refuse the file.
        itk_source: the transform ITK would pick (``"none"``: both codes 0; ``"refused"``: ITK throws).
        sform, qform: the stored transforms (``None`` when their code is 0 or they cannot be decoded).
        sform_code, qform_code: the header codes.
        problems: degenerate-affine and mismatch problems found while choosing.
    """

    affine: np.ndarray
    source: AffineSource
    nibabel_source: AffineSource
    itk_affine: np.ndarray | None
    itk_source: ItkAffineSource
    sform: np.ndarray | None
    qform: np.ndarray | None
    sform_code: int
    qform_code: int
    problems: list[Problem] = field(default_factory=list)


@dataclass
class NiftiReadResult:
    """What :func:`read_nifti` returns for a file it could convert.

    Attributes:
        volumes: one volume for a 3D file, one per frame for a split 4D file.
        problems: warnings about the file (errors raise :class:`ConversionError` instead).
        path: the file read.
        affine: the geometry details (see :class:`AffineChoice`).
    """

    volumes: list[Volume]
    problems: list[Problem]
    path: Path
    affine: AffineChoice


# ---------------------------------------------------------------------------------------- public


def sidecar_path(path: str | Path) -> Path:
    """The BIDS-style JSON sidecar beside a NIfTI file (``sub-01_T1w.nii.gz`` -> ``sub-01_T1w.json``)."""
    p = Path(path)
    name = p.name
    for suffix in _NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return p.with_name(name[: -len(suffix)] + ".json")
    return p.with_suffix(".json")


def read_nifti(
    path: str | Path,
    *,
    modality: str = "OT",
    kind: Literal["intensity", "label"] = "intensity",
    four_d: Literal["split", "error"] = "split",
    mismatch_tol_mm: float = 1e-3,
) -> NiftiReadResult:
    """Read a NIfTI-1/2 file (``.nii``, ``.nii.gz`` or a ``.hdr``/``.img`` pair) into volumes.

    See the module docstring for the affine choice and for what happens in each bad case.

    Args:
        path: the file to read.
        modality: DICOM modality code. When left at ``"OT"`` (unknown), the ``"Modality"`` field
            of a JSON sidecar beside the file is used if there is one; an explicit value wins.
        kind: ``"intensity"`` gives :class:`Volume` objects (``scl_slope``/``scl_inter`` applied in
            float32), ``"label"`` gives :class:`LabelVolume` objects (integer voxels required).
        four_d: what to do with a 4D file of several frames: ``"split"`` into one volume per frame
            (with a FOUR_D warning) or ``"error"``.
        mismatch_tol_mm: how far apart (mm) two readers may place a corner voxel before a
            QFORM_SFORM_MISMATCH warning is raised.

    Returns:
        The volumes and the warnings.

    Raises:
        ConversionError: the file cannot be converted; ``.problem`` says why.
        FileNotFoundError: ``path`` does not exist.
        ValueError: an argument is out of range.
    """
    if kind not in ("intensity", "label"):
        raise ValueError(f"kind must be 'intensity' or 'label', got {kind!r}")
    if four_d not in ("split", "error"):
        raise ValueError(f"four_d must be 'split' or 'error', got {four_d!r}")
    if not mismatch_tol_mm > 0:
        raise ValueError(f"mismatch_tol_mm must be positive, got {mismatch_tol_mm}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no NIfTI file at {path}")

    import nibabel as nib

    name = path.name
    paths = [str(path)]
    problems: list[Problem] = []

    def fail(kind_: ProblemKind, message: str, **details: Any) -> ConversionError:
        return ConversionError(Problem(kind_, Severity.ERROR, message, paths, name, details))

    def warn(kind_: ProblemKind, message: str, **details: Any) -> None:
        problems.append(Problem(kind_, Severity.WARNING, message, paths, name, details))

    if path.stat().st_size == 0:
        raise fail(ProblemKind.EMPTY_FILE, f"{name} is empty (0 bytes); re-export it.")
    if name.lower().endswith(".gz"):
        _check_gzip_stream(path, fail)

    try:
        img = nib.load(path)
    except Exception as exc:  # nibabel raises ImageFileError, HeaderDataError, OSError, ...
        raise fail(
            ProblemKind.UNREADABLE_FILE,
            f"{name} could not be read as NIfTI ({type(exc).__name__}: {exc}); check it is a NIfTI file.",
        ) from exc
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image | nib.Nifti1Pair | nib.Nifti2Pair):
        raise fail(
            ProblemKind.UNREADABLE_FILE,
            f"{name} was read by nibabel as {type(img).__name__}, not NIfTI; convert it to NIfTI first.",
        )
    hdr = img.header

    # Shape first: the affine checks need the spatial shape.
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 4:
        raise fail(
            ProblemKind.UNSUPPORTED_IMAGE,
            f"{name} has {len(shape)} dimensions {shape}; only 3D and 4D images are supported. "
            "Split it into 3D files first.",
            shape=list(shape),
        )
    if len(shape) == 4 and four_d == "error":
        raise fail(
            ProblemKind.FOUR_D,
            f"{name} is 4D with {shape[3]} frames and four_d='error'; split it or allow splitting.",
            shape=list(shape),
        )
    spatial = (*shape, 1, 1, 1)[:3]

    try:
        choice = resolve_affines(hdr, spatial, mismatch_tol_mm=mismatch_tol_mm)
    except ConversionError as exc:
        exc.problem.paths, exc.problem.series = paths, name
        raise
    for p in choice.problems:
        p.paths, p.series = paths, name
    problems.extend(choice.problems)

    data = _load_voxels(img, kind, fail)
    data = data.reshape(spatial + ((shape[3],) if len(shape) == 4 else ()))

    modality, sidecar, sidecar_problem = _modality_from_sidecar(path, modality)
    if sidecar_problem is not None:
        problems.append(sidecar_problem)

    nonfinite = _count_nonfinite(data)
    if nonfinite["count"]:
        if kind == "label":
            raise fail(
                ProblemKind.NONFINITE_VOXELS,
                f"{name} is a label map with {nonfinite['count']} NaN/inf voxels; fix the labels.",
                **nonfinite,
            )
        warn(
            ProblemKind.NONFINITE_VOXELS,
            f"{name} has {nonfinite['count']} NaN/inf voxels ({nonfinite['nan']} NaN, "
            f"{nonfinite['inf']} inf); they were kept as they are, so mask or fill them before "
            "computing statistics.",
            **nonfinite,
        )

    frames = [data] if data.ndim == 3 else [data[..., t] for t in range(data.shape[3])]
    if len(frames) > 1:
        warn(
            ProblemKind.FOUR_D,
            f"{name} is 4D with {len(frames)} frames; it was split into {len(frames)} 3D volumes "
            "(meta 'frame'). Pass four_d='error' to refuse 4D inputs instead.",
            shape=list(shape),
            n_frames=len(frames),
        )

    base_meta: dict[str, Any] = {
        # the file name only: folder names in hospital exports often carry patient names
        "source": {"file": name, "format": type(img).__name__},
        "nifti": {
            "affine_source": choice.source,
            "nibabel_affine_source": choice.nibabel_source,
            "itk_affine_source": choice.itk_source,
            "sform_code": choice.sform_code,
            "qform_code": choice.qform_code,
            "intent_code": int(hdr["intent_code"]),
            "xyzt_units": [str(u) for u in hdr.get_xyzt_units()],
            "stored_dtype": str(hdr.get_data_dtype()),
        },
    }
    if sidecar:
        base_meta["sidecar"] = sidecar
    cls = LabelVolume if kind == "label" else Volume
    volumes: list[Volume] = []
    for t, frame in enumerate(frames):
        meta = json.loads(json.dumps(base_meta))
        if len(frames) > 1:
            meta.update(frame=t, n_frames=len(frames))
        if nonfinite["count"]:
            meta["nonfinite_voxels"] = int(np.count_nonzero(~np.isfinite(frame)))
        try:
            volumes.append(
                cls(array=np.ascontiguousarray(frame), affine=choice.affine, modality=modality, meta=meta)
            )
        except ValueError as exc:  # e.g. fractional labels
            raise fail(ProblemKind.CONVERSION_FAILED, f"{name}: {exc}") from exc
    return NiftiReadResult(volumes=volumes, problems=problems, path=path, affine=choice)


def resolve_affines(
    header: Any, spatial_shape: tuple[int, int, int], *, mismatch_tol_mm: float = 1e-3
) -> AffineChoice:
    """Work out the affine nibabel and ITK would use for a NIfTI header, and check it.

    Args:
        header: a nibabel ``Nifti1Header`` / ``Nifti2Header``.
        spatial_shape: the first three dimensions, used to measure disagreement at the corners.
        mismatch_tol_mm: corner distance above which a QFORM_SFORM_MISMATCH warning is made.

    Returns:
        The choice; ``problems`` holds warnings (with empty ``paths``, filled by the caller).

    Raises:
        ConversionError: DEGENERATE_AFFINE when no usable transform exists.
    """
    scode, qcode = int(header["sform_code"]), int(header["qform_code"])
    sform = np.asarray(header.get_sform(), float) if scode > 0 else None
    qform, qform_error = None, ""
    if qcode > 0:
        try:
            qform = np.asarray(header.get_qform(), float)
        except Exception as exc:  # invalid qfac / negative pixdim
            qform_error = f"{type(exc).__name__}: {exc}"
    base = np.asarray(header.get_base_affine(), float)
    problems: list[Problem] = []

    nib_source: AffineSource = "sform" if scode > 0 else "qform" if qcode > 0 else "fallback"
    candidates: dict[AffineSource, np.ndarray | None] = {"sform": sform, "qform": qform, "fallback": base}
    reasons: dict[str, str] = {}
    for src, mat in candidates.items():
        if mat is None:
            reasons[src] = qform_error if src == "qform" and qform_error else "not set"
        else:
            ok, why = affine_is_valid(mat)
            if not ok:
                reasons[src] = why

    # nibabel's order, but skip a degenerate form when the other one is valid (as ITK does for a
    # zero or singular sform).
    order: list[AffineSource] = ["sform", "qform"] if scode > 0 or qcode > 0 else ["fallback"]
    usable = [s for s in order if s not in reasons]
    if not usable:
        detail = "; ".join(f"{s}: {reasons[s]}" for s in order)
        raise ConversionError(
            Problem(
                ProblemKind.DEGENERATE_AFFINE,
                Severity.ERROR,
                f"no usable voxel-to-world transform ({detail}); fix the header (e.g. with "
                "nibabel's set_sform/set_qform) before ingesting.",
                details={"sform_code": scode, "qform_code": qcode, "reasons": reasons},
            )
        )
    source = usable[0]
    affine = cast(np.ndarray, candidates[source])  # forms without a reason are never None
    if source != nib_source:
        problems.append(
            Problem(
                ProblemKind.DEGENERATE_AFFINE,
                Severity.WARNING,
                f"the {nib_source} (code {scode if nib_source == 'sform' else qcode}) is degenerate "
                f"({reasons[nib_source]}); the {source} was used instead. Check the orientation "
                "of the result.",
                details={"reason": reasons[nib_source], "used": source, "nibabel_would_use": nib_source},
            )
        )
    if source == "fallback":
        problems.append(
            Problem(
                ProblemKind.DEGENERATE_AFFINE,
                Severity.WARNING,
                "qform_code and sform_code are both 0, so the file has no orientation: nibabel's "
                "fall-back (pixdim scaling, x flipped, origin at the centre) was used. Left/right "
                "and the position in the scanner are guesses.",
                details={"reason": "no_xform", "used": "fallback"},
            )
        )

    itk_source, itk_affine = itk_choice(header, scode, qcode)

    corners = _corner_indices(spatial_shape)
    mism: dict[str, Any] = {}
    if sform is not None and qform is not None and "sform" not in reasons and "qform" not in reasons:
        mism["sform_vs_qform_mm"] = _corner_distance(sform, qform, corners)
    if itk_affine is not None:
        mism["used_vs_itk_mm"] = _corner_distance(affine, itk_affine, corners)
    disagree = any(v > mismatch_tol_mm for v in mism.values()) or itk_source == "refused"
    if source != "fallback" and disagree:
        itk_text = (
            f"ITK-based tools (SimpleITK, ANTs, Slicer) would use the {itk_source} with voxel sizes "
            "from pixdim"
            if itk_source in ("sform", "qform")
            else "ITK-based tools would refuse this file or give it a NaN orientation"
        )
        how = "as nibabel does" if source == nib_source else f"because the {nib_source} is degenerate"
        dist = ", ".join(f"{k} = {v:.4g}" for k, v in mism.items())
        problems.append(
            Problem(
                ProblemKind.QFORM_SFORM_MISMATCH,
                Severity.WARNING,
                f"the header's transforms disagree ({dist}, tolerance {mismatch_tol_mm} mm). The "
                f"{source} (code {scode if source == 'sform' else qcode}) was used, {how}; "
                f"{itk_text}. Check which one the scanner export meant.",
                details={
                    "used": source,
                    "itk_would_use": itk_source,
                    "sform_code": scode,
                    "qform_code": qcode,
                    **mism,
                },
            )
        )
    return AffineChoice(
        affine=np.array(affine, dtype=float),
        source=source,
        nibabel_source=nib_source,
        itk_affine=itk_affine,
        itk_source=itk_source,
        sform=sform,
        qform=qform,
        sform_code=scode,
        qform_code=qcode,
        problems=problems,
    )


# ---------------------------------------------------------------------------------------- internals


def _check_gzip_stream(path: Path, fail: Any) -> None:
    """Decompress the whole gzip stream once: nibabel reads only as many bytes as it needs, so a
    damaged tail (bad CRC, cut-off stream) would otherwise go unnoticed."""
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 22):
                pass
    except EOFError as exc:
        raise fail(
            ProblemKind.TRUNCATED_FILE,
            f"{path.name} is a truncated gzip stream ({exc}); copy or export the file again.",
        ) from exc
    except (gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise fail(
            ProblemKind.UNREADABLE_FILE,
            f"{path.name} is not a valid gzip stream ({exc}); copy or export the file again.",
        ) from exc


def _load_voxels(img: Any, kind: str, fail: Any) -> np.ndarray:
    dtype = img.header.get_data_dtype()
    if dtype.fields is not None or dtype.kind == "c":
        raise fail(
            ProblemKind.UNSUPPORTED_IMAGE,
            f"{img.get_filename()} has {dtype} voxels (RGB or complex); only scalar images are supported.",
            dtype=str(dtype),
        )
    # After loading, nibabel keeps scl_slope/scl_inter on the array proxy and resets the header's.
    slope = float(getattr(img.dataobj, "slope", 1.0))
    inter = float(getattr(img.dataobj, "inter", 0.0))
    scaled = not (slope == 1.0 and inter == 0.0)
    try:
        if scaled:
            # scl_slope/scl_inter are part of the voxel values. Labels are scaled in float64 so that
            # LabelVolume can tell whether the result is integral.
            data = img.get_fdata(dtype=np.float64 if kind == "label" else np.float32)
        else:
            data = np.asarray(img.dataobj)
    except (OSError, EOFError, ValueError) as exc:
        raise fail(
            ProblemKind.TRUNCATED_FILE,
            f"the voxel data of {img.get_filename()} could not be read ({exc}); the file is "
            "probably truncated, so copy or export it again.",
        ) from exc
    if not data.dtype.isnative:
        # Big-endian files: torch and SimpleITK accept native byte order only.
        data = data.astype(data.dtype.newbyteorder("="))
    return data


def _count_nonfinite(data: np.ndarray) -> dict[str, Any]:
    if data.dtype.kind != "f":
        return {"count": 0, "nan": 0, "inf": 0}
    n_nan = int(np.count_nonzero(np.isnan(data)))
    n_inf = int(np.count_nonzero(np.isinf(data)))
    out: dict[str, Any] = {"count": n_nan + n_inf, "nan": n_nan, "inf": n_inf}
    if data.ndim == 4 and out["count"]:
        out["per_frame"] = [int(c) for c in np.count_nonzero(~np.isfinite(data), axis=(0, 1, 2))]
    return out


def _modality_from_sidecar(path: Path, modality: str) -> tuple[str, dict[str, Any], Problem | None]:
    side = sidecar_path(path)
    if not side.is_file():
        return modality, {}, None
    try:
        content = json.loads(side.read_text(encoding="utf-8"))
        if not isinstance(content, dict):
            raise ValueError("top level is not an object")
    except (OSError, ValueError) as exc:
        return (
            modality,
            {},
            Problem(
                ProblemKind.UNREADABLE_FILE,
                Severity.WARNING,
                f"the sidecar {side.name} could not be read ({exc}); the modality stays {modality!r}.",
                [str(side)],
                path.name,
            ),
        )
    kept = {k: content[k] for k in SIDECAR_KEYS if k in content}
    kept["file"] = side.name
    found = content.get("Modality")
    if modality == "OT" and isinstance(found, str) and found.strip():
        modality = found.strip().upper()
    return modality, kept, None


def _corner_indices(shape: tuple[int, int, int]) -> np.ndarray:
    n = np.array(shape, float) - 1
    return np.array([[a, b, c, 1.0] for a in (0, n[0]) for b in (0, n[1]) for c in (0, n[2])])


def _corner_distance(a: np.ndarray, b: np.ndarray, corners: np.ndarray) -> float:
    return float(np.max(np.linalg.norm((corners @ a.T - corners @ b.T)[:, :3], axis=1)))
