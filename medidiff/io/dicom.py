"""DICOM series to volumes: split, sort, check, stack (``shared/design/DICOM.md`` steps 2-6).

The pipeline is ``scan_folder`` (header pass, :mod:`medidiff.io.dicom_scan`) ->
:func:`split_series` -> :func:`plan_series` (sort + geometry checks + affine) ->
:func:`load_series` (pixels, rescale, stack). A series that fails a check raises
:class:`~medidiff.problems.ConversionError` carrying the problem; it is never stacked wrong.

What happens to each broken case (also in ``docs/ingest.md``):

- missing slice (a gap that is a multiple of the slice step): error, not converted;
- irregular spacing (steps differ by more than the tolerance): error, not converted;
- gantry tilt (slice origins shifted in-plane along a straight line): warning; the slices are
  shifted in-plane onto an orthogonal grid (as dcm2niix does) and the tilt angle is recorded.
  ``gantry_tilt="error"`` refuses instead;
- slice positions off any straight line: error;
- duplicate positions: identical SOPInstanceUID copies are dropped with a warning; different
  images at one position are an error;
- mixed orientation within one SeriesInstanceUID: warning; each orientation becomes its own
  volume (key suffix ``-o1``, ``-o2``, ...);
- single-slice series: skipped (a 3D pipeline cannot use it), unless ``keep_single_slice``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from medidiff.io.dicom_scan import SliceRef
from medidiff.problems import ConversionError, Problem, ProblemKind, Severity
from medidiff.volume import LPS_TO_RAS, Volume

__all__ = ["GeometryTolerances", "SeriesPlan", "load_series", "plan_series", "split_series"]


@dataclass(frozen=True)
class GeometryTolerances:
    """Tolerances of the geometry checks.

    Args:
        spacing_rel: allowed deviation of a slice step from the median step, as a fraction.
        spacing_abs_mm: ... and in mm; the larger of the two applies.
        duplicate_mm: two slices closer than this along the normal are at the same position.
        tilt_mm: in-plane drift of slice origins over the whole series below which it is not a tilt.
        orientation: max difference of direction cosines for two slices to share an orientation.
    """

    spacing_rel: float = 0.01
    spacing_abs_mm: float = 0.01
    duplicate_mm: float = 0.01
    tilt_mm: float = 0.01
    orientation: float = 1e-4


@dataclass
class SeriesPlan:
    """A checked, sorted series ready to load. ``affine`` is RAS; ``tilt_shift`` in pixels (row, col)."""

    key: str
    slices: list[SliceRef]
    affine: np.ndarray
    modality: str
    warnings: list[Problem] = field(default_factory=list)
    tilt_shift: np.ndarray | None = None
    tilt_degrees: float = 0.0
    verify_copies: list[tuple[SliceRef, SliceRef]] = field(default_factory=list)

    @property
    def first(self) -> SliceRef:
        return self.slices[0]

    @property
    def paths(self) -> list[str]:
        return sorted({s.path for s in self.slices})


def _unit_iop(iop: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    r = np.asarray(iop[:3], float)
    c = np.asarray(iop[3:6], float)
    return r / np.linalg.norm(r), c / np.linalg.norm(c)


def _split_key(s: SliceRef, tol: GeometryTolerances) -> tuple[Any, ...]:
    q = max(tol.orientation, 1e-9)
    iop = tuple(int(round(v / q)) for v in np.concatenate(_unit_iop(s.iop)))
    ps = tuple(round(v, 4) for v in s.pixel_spacing)
    return (iop, s.echo, s.temporal, s.image_type, ps, s.rows, s.cols)


def _describe_difference(keys: list[tuple[Any, ...]]) -> list[str]:
    names = ["orientation", "echo", "temporal position", "image type", "pixel spacing", "rows", "columns"]
    return [n for i, n in enumerate(names) if len({k[i] for k in keys}) > 1]


def split_series(
    slices: Sequence[SliceRef], tol: GeometryTolerances = GeometryTolerances()
) -> tuple[dict[str, list[SliceRef]], list[Problem]]:
    """Group frames by SeriesInstanceUID, then split by orientation, echo, temporal index,
    image type and pixel size (the attributes dcm2niix splits on).

    Returns:
        ``{key: slices}`` with key = SeriesInstanceUID (plus ``-o<n>`` / ``-s<n>`` when split),
        and the warnings about splits (mixed orientation within one SeriesInstanceUID).
    """
    by_uid: dict[str, list[SliceRef]] = defaultdict(list)
    for s in slices:
        by_uid[s.series_uid or f"no-series-uid:{s.study_uid}"].append(s)
    out: dict[str, list[SliceRef]] = {}
    problems: list[Problem] = []
    for uid in sorted(by_uid):
        groups: dict[tuple[Any, ...], list[SliceRef]] = defaultdict(list)
        try:
            for s in by_uid[uid]:
                groups[_split_key(s, tol)].append(s)
        except (ValueError, OverflowError, ZeroDivisionError) as e:  # one bad series never stops the split
            problems.append(
                Problem(
                    kind=ProblemKind.CONVERSION_FAILED,
                    severity=Severity.ERROR,
                    message=f"the series could not be split into volumes ({type(e).__name__}); please report this",
                    paths=sorted({x.path for x in by_uid[uid]}),
                    series=uid,
                )
            )
            continue
        if len(groups) == 1:
            out[uid] = next(iter(groups.values()))
            continue
        keys = sorted(groups, key=lambda k: min(x.instance_number or 0 for x in groups[k]))
        differs = _describe_difference(keys)
        prefix = "o" if "orientation" in differs else "s"
        for i, k in enumerate(keys, start=1):
            out[f"{uid}-{prefix}{i}"] = groups[k]
        if "orientation" in differs:
            problems.append(
                Problem(
                    kind=ProblemKind.MIXED_ORIENTATION,
                    severity=Severity.WARNING,
                    message=(
                        f"one SeriesInstanceUID holds {len(keys)} different slice orientations; each "
                        "orientation is converted as its own volume"
                    ),
                    paths=sorted({x.path for g in groups.values() for x in g}),
                    series=uid,
                    details={"n_groups": len(keys), "differs_in": differs},
                )
            )
    return out, problems


def _geometry_of(s: SliceRef) -> tuple[Any, ...]:
    return (s.ipp, s.iop, s.pixel_spacing, s.rows, s.cols, s.slope, s.intercept)


def _series_problem(
    kind: ProblemKind, key: str, message: str, slices: Sequence[SliceRef], **details: Any
) -> Problem:
    return Problem(
        kind=kind,
        severity=Severity.ERROR,
        message=message,
        paths=sorted({s.path for s in slices}),
        series=key,
        details=details,
    )


def plan_series(
    key: str,
    slices: Sequence[SliceRef],
    *,
    tol: GeometryTolerances = GeometryTolerances(),
    gantry_tilt: Literal["resample", "error"] = "resample",
    keep_single_slice: bool = False,
    file_sha256: Mapping[str, str] | None = None,
) -> SeriesPlan:
    """Sort frames along the slice normal, check the geometry and build the RAS affine.

    Args:
        file_sha256: content hashes of the files; two files with one SOPInstanceUID and the same
            hash are copies, otherwise their pixels are compared when the series is loaded.

    Raises:
        ConversionError: with the problem, when the series cannot be stacked correctly.
    """
    warnings: list[Problem] = []
    r, c = _unit_iop(slices[0].iop)
    if abs(float(r @ c)) > 1e-3:
        raise ConversionError(
            _series_problem(
                ProblemKind.INCONSISTENT_SLICES,
                key,
                f"ImageOrientationPatient row and column cosines are not orthogonal (dot = {r @ c:.4f})",
                slices,
            )
        )
    n = np.cross(r, c)
    n /= np.linalg.norm(n)

    # Copies of one instance (same SOPInstanceUID and frame) are dropped with a warning when they
    # are the same image; two different images under one SOPInstanceUID are an error.
    unique: dict[tuple[str, int | None], SliceRef] = {}
    copies: list[str] = []
    to_verify: list[tuple[SliceRef, SliceRef]] = []
    for s in slices:
        k = (s.sop_instance_uid, s.frame)
        first = unique.get(k)
        if first is None or not s.sop_instance_uid:
            unique[k] = s
            continue
        same_file = s.path == first.path or (
            file_sha256 is not None
            and file_sha256.get(s.path) is not None
            and file_sha256.get(s.path) == file_sha256.get(first.path)
        )
        if not same_file and _geometry_of(s) != _geometry_of(first):
            raise ConversionError(
                _series_problem(
                    ProblemKind.CONFLICTING_DUPLICATE,
                    key,
                    "two files carry one SOPInstanceUID but place the image differently (position, "
                    "orientation, size or rescale differ); one of them is not what its UID says, so the "
                    "series was not converted",
                    [first, s],
                )
            )
        if not same_file:
            to_verify.append((first, s))  # same header geometry: the pixels decide (in load_series)
        copies.append(s.location)
    if copies:
        warnings.append(
            Problem(
                kind=ProblemKind.DUPLICATE_POSITION,
                severity=Severity.WARNING,
                message=f"{len(copies)} file(s) are copies of an instance already read (same SOPInstanceUID); "
                "the copies were ignored",
                paths=sorted(copies),
                series=key,
            )
        )
    if any(s.acquisition.get("PhotometricInterpretation") == "MONOCHROME1" for s in slices):
        warnings.append(
            Problem(
                kind=ProblemKind.MONOCHROME1,
                severity=Severity.WARNING,
                message="MONOCHROME1 (low values display white): voxel values were kept as stored, not "
                "inverted; a viewer shows the NIfTI with the opposite grey scale",
                paths=sorted({s.path for s in slices})[:1],
                series=key,
            )
        )
    ordered = sorted(unique.values(), key=lambda s: (float(np.asarray(s.ipp) @ n), s.instance_number or 0))

    if len(ordered) == 1 and not keep_single_slice:
        raise ConversionError(
            Problem(
                kind=ProblemKind.SINGLE_SLICE,
                severity=Severity.SKIPPED,
                message="single-slice series (a localizer or a screenshot?): not a volume, skipped; set "
                "keep_single_slice: true in the config to convert it anyway",
                paths=[ordered[0].path],
                series=key,
            )
        )

    ipp = np.array([s.ipp for s in ordered], float)
    d = ipp @ n
    row_sp, col_sp = ordered[0].pixel_spacing  # PixelSpacing = [between rows, between columns]
    lps = np.eye(4)
    lps[:3, 0] = r * col_sp  # array axis i = column index, along the row cosine
    lps[:3, 1] = c * row_sp  # array axis j = row index, along the column cosine
    lps[:3, 3] = ipp[0]
    tilt_shift = None
    tilt_deg = 0.0

    if len(ordered) == 1:
        thickness = float(ordered[0].acquisition.get("SliceThickness", 1.0) or 1.0)
        lps[:3, 2] = n * thickness
        return SeriesPlan(
            key, ordered, LPS_TO_RAS @ lps, ordered[0].modality, warnings, verify_copies=to_verify
        )

    steps = np.diff(d)
    dup = np.flatnonzero(np.abs(steps) < tol.duplicate_mm)
    if dup.size:
        pairs = [[ordered[i].location, ordered[i + 1].location] for i in dup]
        raise ConversionError(
            _series_problem(
                ProblemKind.DUPLICATE_POSITION,
                key,
                f"{dup.size} pair(s) of different images share one slice position; the series mixes "
                "acquisitions (repeats, phases or directions without distinguishing attributes) and "
                "cannot be stacked into one volume",
                slices,
                pairs=pairs[:20],
            )
        )
    step = float(np.median(steps))
    atol = max(tol.spacing_abs_mm, tol.spacing_rel * step)
    off = np.flatnonzero(np.abs(steps - step) > atol)
    if off.size:
        ratio = steps[off] / step
        whole = np.abs(ratio - np.round(ratio)) * step <= atol
        if np.all(whole & (np.round(ratio) >= 2)):
            gaps = [
                {
                    "after": ordered[i].location,
                    "before": ordered[i + 1].location,
                    "missing": int(round(ratio[j])) - 1,
                    "gap_mm": float(steps[i]),
                }
                for j, i in enumerate(off)
            ]
            n_missing = sum(g["missing"] for g in gaps)
            raise ConversionError(
                _series_problem(
                    ProblemKind.MISSING_SLICE,
                    key,
                    f"{n_missing} slice(s) missing: the slice step is {step:.4g} mm but there are "
                    f"{len(gaps)} gap(s) of a whole multiple of it; re-export the complete series",
                    slices,
                    gaps=gaps,
                    step_mm=step,
                )
            )
        raise ConversionError(
            _series_problem(
                ProblemKind.IRREGULAR_SPACING,
                key,
                f"slice spacing varies from {steps.min():.4g} to {steps.max():.4g} mm (median {step:.4g} mm, "
                f"tolerance {atol:.3g} mm); NIfTI needs a uniform grid, so the series was not converted",
                slices,
                steps_mm=[float(x) for x in steps[:500]],
            )
        )

    # In-plane drift of slice origins: zero for orthogonal stacks, linear in d for gantry tilt.
    rel = ipp - ipp[0]
    inplane = np.stack([rel @ r, rel @ c], axis=1)  # mm along row / column cosines
    if np.abs(inplane).max() > tol.tilt_mm:
        dd = (d - d[0])[:, None]
        slope = (dd * inplane).sum(0) / (dd * dd).sum()
        resid = np.abs(inplane - dd * slope).max()
        tilt_deg = float(np.degrees(np.arctan(np.linalg.norm(slope))))
        if resid > max(tol.tilt_mm, 0.05 * min(row_sp, col_sp)):
            raise ConversionError(
                _series_problem(
                    ProblemKind.INCONSISTENT_SLICES,
                    key,
                    f"slice origins do not lie on a straight line (off by up to {resid:.3g} mm in-plane); "
                    "the series cannot be stacked",
                    slices,
                )
            )
        if gantry_tilt == "error":
            raise ConversionError(
                _series_problem(
                    ProblemKind.GANTRY_TILT,
                    key,
                    f"gantry tilt of {tilt_deg:.2f} degrees; set gantry_tilt: resample to convert it onto an "
                    "orthogonal grid",
                    slices,
                    tilt_degrees=tilt_deg,
                )
            )
        # Pixel shifts (rows, cols) that move each tilted slice onto the orthogonal grid.
        tilt_shift = np.stack([inplane[:, 1] / row_sp, inplane[:, 0] / col_sp], axis=1)
        lps[:3, 2] = n * (d[-1] - d[0]) / (len(ordered) - 1)
        warnings.append(
            Problem(
                kind=ProblemKind.GANTRY_TILT,
                severity=Severity.WARNING,
                message=f"gantry tilt of {tilt_deg:.2f} degrees: slices were shifted in-plane onto an "
                "orthogonal grid (linear interpolation); voxels near the edge are filled with the minimum",
                paths=sorted({s.path for s in ordered}),
                series=key,
                details={"tilt_degrees": tilt_deg},
            )
        )
    else:
        lps[:3, 2] = (ipp[-1] - ipp[0]) / (len(ordered) - 1)
    return SeriesPlan(
        key, ordered, LPS_TO_RAS @ lps, ordered[0].modality, warnings, tilt_shift, tilt_deg, to_verify
    )


def _frames_by_file(plan: SeriesPlan) -> dict[str, list[tuple[int, int | None]]]:
    by_file: dict[str, list[tuple[int, int | None]]] = defaultdict(list)
    for k, s in enumerate(plan.slices):
        by_file[s.path].append((k, s.frame))
    return by_file


def _decode(
    path: str, frames: list[int | None], refs: Sequence[SliceRef] | None = None
) -> dict[int | None, np.ndarray]:
    """Pixel arrays of ``frames`` of one file (``None``: the single frame of a legacy file).

    Uncompressed native data whose layout the header pass recorded (``refs``) is read straight
    from the file; anything else goes through pydicom's decoders. Both correct unused high bits
    (sign-extend or mask to BitsStored), as DICOM requires.
    """
    if refs and all(r.pixel_offset is not None and r.pixel_dtype for r in refs):
        out: dict[int | None, np.ndarray] = {}
        with open(path, "rb") as f:
            for frame, r in zip(frames, refs, strict=True):
                dtype = np.dtype(r.pixel_dtype)
                n = r.rows * r.cols
                f.seek(int(r.pixel_offset) + (frame or 0) * n * dtype.itemsize)  # type: ignore[arg-type]
                buf = f.read(n * dtype.itemsize)
                if len(buf) != n * dtype.itemsize:
                    raise EOFError(
                        f"pixel data ends early (truncated file): {len(buf)} of {n * dtype.itemsize} bytes"
                    )
                arr = np.frombuffer(buf, dtype=dtype).reshape(r.rows, r.cols).astype(dtype.newbyteorder("="))
                bits = dtype.itemsize * 8
                if 0 < r.bits_stored < bits:
                    shift = bits - r.bits_stored
                    arr = (arr << shift) >> shift if dtype.kind == "i" else arr & ((1 << r.bits_stored) - 1)
                out[frame] = arr
        return out
    if refs and all(r.pixel_offset is not None and r.bits_allocated for r in refs):
        return _decode_encapsulated(path, frames, refs)
    from pydicom.pixels import iter_pixels, pixel_array

    if frames == [None]:
        return {None: pixel_array(path, correct_unused_bits=True)}
    wanted = set(frames)
    decoded: dict[int | None, np.ndarray] = {}
    for i, frame in enumerate(iter_pixels(path, correct_unused_bits=True)):
        if i in wanted:
            decoded[i] = frame
    return decoded


def _decode_encapsulated(
    path: str, frames: list[int | None], refs: Sequence[SliceRef]
) -> dict[int | None, np.ndarray]:
    """Compressed frames decoded by pydicom's codec plugins straight from the file's bytes."""
    from pydicom.pixels import get_decoder

    r0 = refs[0]
    decoder = get_decoder(r0.transfer_syntax)
    opts = {
        "rows": r0.rows,
        "columns": r0.cols,
        "samples_per_pixel": 1,
        "bits_allocated": r0.bits_allocated,
        "bits_stored": r0.bits_stored,
        "pixel_representation": r0.pixel_representation,
        "photometric_interpretation": str(r0.acquisition.get("PhotometricInterpretation", "MONOCHROME2")),
        "number_of_frames": r0.n_frames,
        "pixel_keyword": "PixelData",
        "correct_unused_bits": True,
    }
    out: dict[int | None, np.ndarray] = {}
    with open(path, "rb") as f:
        for frame in frames:
            f.seek(int(r0.pixel_offset))  # type: ignore[arg-type]
            arr, _ = decoder.as_array(f, index=frame or 0, **opts)
            out[frame] = arr.reshape(r0.rows, r0.cols)
    return out


def _check_copies(plan: SeriesPlan, raw: Sequence[np.ndarray | None]) -> None:
    """Two files with one SOPInstanceUID must hold the same pixels (else CONFLICTING_DUPLICATE)."""
    index = {id(s): k for k, s in enumerate(plan.slices)}
    for first, copy in plan.verify_copies:
        kept = raw[index[id(first)]] if id(first) in index else None
        try:
            other = _decode(copy.path, [copy.frame], [copy]).get(copy.frame)
        except Exception:
            other = None
        if kept is None or other is None or other.shape != kept.shape or not np.array_equal(other, kept):
            raise ConversionError(
                _series_problem(
                    ProblemKind.CONFLICTING_DUPLICATE,
                    plan.key,
                    "two files carry one SOPInstanceUID but hold different pixels; one of them is not the "
                    "image its UID names, so the series was not converted (remove the wrong file)",
                    [first, copy],
                )
            )


def load_series(plan: SeriesPlan, *, fill: float | None = None) -> Volume:
    """Read the pixels of a planned series, apply rescale per frame in float, and stack.

    Integer results (slope 1, integer intercepts) are kept as the smallest integer type that
    holds them exactly; anything else becomes float32.

    Raises:
        ConversionError: when a frame cannot be decoded (truncated or unsupported compression).
    """
    n = len(plan.slices)
    rows, cols = plan.first.rows, plan.first.cols
    raw: list[np.ndarray | None] = [None] * n
    for path, items in _frames_by_file(plan).items():
        try:
            decoded = _decode(path, [f for _, f in items], [plan.slices[k] for k, _ in items])
        except Exception as e:
            msg = str(e)
            kind = (
                ProblemKind.TRUNCATED_FILE
                if "end of" in msg.lower() or "truncat" in msg.lower()
                else (ProblemKind.DECODE_FAILED)
            )
            ts = plan.first.transfer_syntax
            no_plugin = (
                "no pixel data decoders" in msg.lower() or "missing required dependencies" in msg.lower()
            )
            hint = (
                "install the pylibjpeg plugins (pylibjpeg-libjpeg, pylibjpeg-openjpeg, pylibjpeg-rle)"
                if no_plugin
                else "the compressed stream is damaged; export the file again from the source"
            )
            raise ConversionError(
                Problem(
                    kind=kind,
                    severity=Severity.ERROR,
                    message=f"pixel data could not be decoded ({type(e).__name__}: {msg}); transfer syntax {ts}: "
                    f"{hint}",
                    paths=[path],
                    series=plan.key,
                )
            ) from e
        for k, f in items:
            frame = decoded.get(f)
            if frame is None or frame.shape != (rows, cols):
                raise ConversionError(
                    Problem(
                        kind=ProblemKind.DECODE_FAILED,
                        severity=Severity.ERROR,
                        message=f"frame has shape {None if frame is None else frame.shape}, header says "
                        f"{(rows, cols)}",
                        paths=[path],
                        series=plan.key,
                    )
                )
            raw[k] = frame

    _check_copies(plan, raw)

    slopes = np.array([s.slope for s in plan.slices])
    inters = np.array([s.intercept for s in plan.slices])
    integer = (
        all(f is not None and f.dtype.kind in "iu" for f in raw)
        and np.all(slopes == 1.0)
        and np.all(inters == np.round(inters))
    )
    dtype: Any = np.float32
    if integer:
        lo = min(int(f.min()) + int(i) for f, i in zip(raw, inters, strict=True))  # type: ignore[union-attr]
        hi = max(int(f.max()) + int(i) for f, i in zip(raw, inters, strict=True))  # type: ignore[union-attr]
        dtype = next(
            (t for t in (np.int16, np.int32) if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max), np.float64
        )
    # Slices are stacked into a C-ordered (slice, row, column) buffer, each one a contiguous
    # write, and shown as the (column, row, slice) volume by a transposed view: NIfTI stores
    # that view's memory order (Fortran) as it is.
    buf = np.empty((n, rows, cols), dtype=dtype)
    for k in range(n):
        f = raw[k]
        if integer:
            np.add(f, inters[k], out=buf[k], casting="unsafe")  # fits: the dtype was chosen above
        else:
            buf[k] = f.astype(np.float64) * slopes[k] + inters[k]  # type: ignore[union-attr]
        raw[k] = None  # free the decoded frame as soon as it is stacked
    out = buf.transpose(2, 1, 0)

    if out.dtype.kind == "f" and not np.isfinite(out).all():
        # Cannot happen with rescale values that passed check_rescale; a guard, because a
        # non-finite voxel must never be written.
        bad = int(np.count_nonzero(~np.isfinite(out)))
        raise ConversionError(
            Problem(
                kind=ProblemKind.NONFINITE_VOXELS,
                severity=Severity.ERROR,
                message=f"{bad} voxel(s) are NaN or infinite after applying RescaleSlope/Intercept; the "
                "series was not converted",
                paths=plan.paths[:1],
                series=plan.key,
                details={"count": bad},
            )
        )

    if plan.tilt_shift is not None:
        from scipy.ndimage import shift as nd_shift

        cval = float(out.min())
        shifted = np.empty(out.shape, dtype=np.float32)
        for k in range(n):
            dr, dc = plan.tilt_shift[k]
            # out is indexed (col, row): shift by (dc, dr) moves slice k onto the orthogonal grid.
            shifted[:, :, k] = nd_shift(out[:, :, k].astype(np.float32), (dc, dr), order=1, cval=cval)
        out = shifted

    first = plan.first
    monochrome1 = first.acquisition.get("PhotometricInterpretation") == "MONOCHROME1"
    meta: dict[str, Any] = {
        "series_key": plan.key,
        "series_uid": first.series_uid,
        "study_uid": first.study_uid,
        "frame_of_reference_uid": first.frame_of_reference_uid,
        "n_slices": n,
        "series_number": first.series_number,
        "transfer_syntax": first.transfer_syntax,
        "image_type": list(first.image_type),
        "enhanced_multiframe": first.frame is not None,
        "rescale": {
            "slope": sorted({float(x) for x in slopes}),
            "intercept": sorted({float(x) for x in inters}),
        },
        "acquisition": dict(first.acquisition),
        "gantry_tilt_degrees": plan.tilt_degrees,
        "source_sop_instance_uids": [s.sop_instance_uid for s in plan.slices],
    }
    if monochrome1:
        meta["photometric_note"] = "MONOCHROME1: low values display white; voxel values are not inverted"
    return Volume(array=out, affine=plan.affine, modality=plan.modality, meta=meta)
