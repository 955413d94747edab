"""The demo cohort: synthetic brain MR subjects and body CT phantoms written as a DICOM drop.

Layout of ``dst`` (paths in the JSON files are relative to ``dst``)::

    dicom/                         the DICOM drop (what ``medidiff ingest`` reads):
      mr/mr-001/IM0001.dcm ...     one folder per MR subject (single-frame or one enhanced file)
      ct/ct-001/IM0001.dcm ...     one folder per CT phantom (ct-008 holds two series)
      broken/...                   deliberately broken files and series (medidiff.demo.broken)
    truth/<series>.nii.gz          the voxels each series stores, in physical units (HU for CT)
    truth/<series>.json            the drawn parameters and acquisition protocol of the series
    labels/<series>.nii.gz         label map on the same grid (CSF/GM/WM or CT organs)
    cohort.json                    subjects, protocols, seed, source and licence
    expected_problems.json         what the reader must report for each broken item (paths
                                   relative to ``dicom/``)
    LICENSE_MNI152.txt             the MNI152 template's copyright notice

Every subject cycles through a list of acquisition protocols (orientation, spacing, transfer
syntax, single-frame or enhanced, InstanceNumber order, rescale), so a cohort of 10 or more
subjects of each modality exercises all of them. Parameters are drawn from generators seeded with
``(seed, modality, index)``, so a subject does not change when the cohort size changes, and all
UIDs derive from the seed: the same seed writes byte-identical files.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

import medidiff
from medidiff.demo import grid_covering, rotation
from medidiff.demo.broken import BrokenItem, write_broken_items
from medidiff.demo.ct import CT_BOX_HALF_EXTENT, CT_LABELS, CTPhantomParams, draw_ct_params, synthesize_ct
from medidiff.demo.mr import (
    MNI152_NOTICE,
    MNI152_SOURCE,
    MR_LABELS,
    draw_mr_params,
    load_mni_template,
    synthesize_mr,
)
from medidiff.io.atomic import atomic_write_json, atomic_write_text, atomic_write_with
from medidiff.io.dicom_write import derive_uid, write_dicom_series, write_enhanced_series
from medidiff.volume import LabelVolume, Volume

DICOM_DIR = "dicom"  # the DICOM drop itself; ground truth and labels sit beside it, not inside

__all__ = [
    "CT_PROTOCOLS",
    "MR_PROTOCOLS",
    "DemoCohortResult",
    "DemoSeries",
    "Protocol",
    "ct_phantom_series",
    "load_cohort",
    "make_demo_cohort",
]

ProgressCallback = Callable[[int, int], None]

# RAS directions (columns: world direction of array axes i, j, k) of what scanners write.
# Axial: DICOM IOP [1,0,0,0,1,0] (LPS identity); sagittal: IOP [0,1,0,0,0,-1];
# coronal: IOP [1,0,0,0,0,-1].
AXIAL = np.diag([-1.0, -1.0, 1.0])
SAGITTAL = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
CORONAL = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, -1.0, 0.0]])
# Slices stored from head to feet: the slice axis points against the normal (left-handed grid).
AXIAL_HEAD_FIRST = AXIAL @ np.diag([1.0, 1.0, -1.0])


@dataclass(frozen=True)
class Protocol:
    """How one series is acquired and stored.

    Attributes:
        name: short label (``"axial"``, ``"oblique"``, ...).
        direction: RAS directions of array axes i, j, k (orthonormal columns).
        spacing: voxel size (mm) before the cohort's ``resolution_scale``.
        transfer_syntax: DICOM transfer syntax UID.
        enhanced: one Legacy Converted Enhanced multi-frame object instead of single frames.
        reverse_instance_numbers: InstanceNumber runs against the spatial order.
        slope: RescaleSlope (MR only; one value, or a cycle of per-slice values).
        intercept: RescaleIntercept (CT: -1024 stores unsigned, 0 stores signed).
        file_suffix: file name suffix (``""`` like many PACS exports).
        extra_series_spacing: if set, a second series of the same subject with this spacing is
            written into the same folder (two series in one folder).
    """

    name: str
    direction: np.ndarray
    spacing: tuple[float, float, float]
    transfer_syntax: str = ExplicitVRLittleEndian
    enhanced: bool = False
    reverse_instance_numbers: bool = False
    slope: float | tuple[float, ...] = 1.0
    intercept: float = 0.0
    file_suffix: str = ".dcm"
    extra_series_spacing: tuple[float, float, float] | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["direction"] = np.asarray(self.direction).round(6).tolist()
        d["transfer_syntax_name"] = _ts_name(self.transfer_syntax)
        return d


def _ts_name(uid: str) -> str:
    from pydicom.uid import UID

    return UID(uid).name


MR_PROTOCOLS: tuple[Protocol, ...] = (
    Protocol("axial", AXIAL, (2.0, 2.0, 2.0)),
    Protocol("sagittal", SAGITTAL, (1.5, 1.5, 3.0), RLELossless, reverse_instance_numbers=True),
    Protocol("coronal", CORONAL, (2.0, 2.0, 2.5), JPEGLSLossless),
    Protocol("oblique", rotation(15.0, -20.0, 0.0) @ AXIAL, (2.0, 2.0, 2.0), slope=0.5),
    Protocol("axial", AXIAL, (1.6, 1.6, 3.2), JPEG2000Lossless),
    Protocol("axial", AXIAL, (2.0, 2.0, 2.0), enhanced=True, slope=0.5),
    Protocol(
        "axial", AXIAL_HEAD_FIRST, (2.0, 2.0, 2.0), ImplicitVRLittleEndian, reverse_instance_numbers=True
    ),
    Protocol(
        "oblique", rotation(0.0, 12.0, 18.0) @ SAGITTAL, (1.8, 1.8, 2.4), RLELossless, slope=(0.25, 0.5, 1.0)
    ),
    Protocol("axial", AXIAL, (2.0, 2.0, 2.0), slope=0.25, file_suffix=""),
    Protocol("coronal", CORONAL, (1.5, 2.0, 2.0), JPEGLSLossless, reverse_instance_numbers=True),
)

CT_PROTOCOLS: tuple[Protocol, ...] = (
    Protocol("axial", AXIAL, (1.5, 1.5, 3.0), intercept=-1024.0),
    Protocol("axial", AXIAL, (1.2, 1.2, 2.0), RLELossless, reverse_instance_numbers=True, intercept=-1024.0),
    Protocol("sagittal", SAGITTAL, (2.0, 2.0, 2.0), JPEGLSLossless, intercept=-1024.0),
    Protocol("oblique", rotation(10.0, 20.0, 0.0) @ AXIAL, (1.5, 1.5, 2.5), intercept=-1024.0),
    Protocol("axial", AXIAL, (2.0, 2.0, 3.0), RLELossless, enhanced=True, intercept=-1024.0),
    Protocol("coronal", CORONAL, (1.5, 1.5, 2.5), intercept=-1024.0, file_suffix=""),
    Protocol("axial", AXIAL, (1.5, 1.5, 2.5), JPEG2000Lossless, intercept=0.0),
    Protocol("axial", AXIAL, (1.5, 1.5, 2.5), intercept=-1024.0, extra_series_spacing=(1.5, 1.5, 5.0)),
    Protocol(
        "axial",
        AXIAL_HEAD_FIRST,
        (1.5, 1.5, 3.0),
        ImplicitVRLittleEndian,
        reverse_instance_numbers=True,
        intercept=-1024.0,
    ),
    Protocol("oblique", rotation(0.0, -15.0, 25.0) @ AXIAL, (2.0, 2.0, 2.0), RLELossless, intercept=-1024.0),
)


@dataclass(frozen=True)
class DemoSeries:
    """One written series and where its ground truth lies (paths relative to the drop root)."""

    name: str
    subject: str
    modality: str
    protocol: str
    layout: str  # "single-frame" | "enhanced"
    transfer_syntax: str
    reverse_instance_numbers: bool
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    orientation: str
    series_uid: str
    study_uid: str
    files: tuple[str, ...]
    truth: str
    labels: str
    params: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DemoCohortResult:
    """What :func:`make_demo_cohort` wrote.

    Attributes:
        root: the drop folder.
        seed: the seed used.
        series: every written image series with its ground truth.
        broken: the deliberately broken items (see :mod:`medidiff.demo.broken`).
        cohort_json: path of ``cohort.json``.
        expected_problems_json: path of ``expected_problems.json``.
        seconds: wall time spent.
    """

    root: Path
    seed: int
    series: list[DemoSeries] = field(default_factory=list)
    broken: list[BrokenItem] = field(default_factory=list)
    cohort_json: Path | None = None
    expected_problems_json: Path | None = None
    seconds: float = 0.0

    def __str__(self) -> str:
        n_mr = sum(s.modality == "MR" for s in self.series)
        n_ct = sum(s.modality == "CT" for s in self.series)
        return (
            f"{n_mr} MR and {n_ct} CT series, {len(self.broken)} broken items, seed {self.seed}, "
            f"{self.seconds:.1f} s"
        )


def _save_nifti(vol: Volume, path: Path) -> None:
    import nibabel as nib

    img = vol.to_nibabel()
    atomic_write_with(path, lambda tmp: nib.save(img, tmp))


def _scaled(spacing: Sequence[float], scale: float) -> tuple[float, float, float]:
    return tuple(round(float(s) * scale, 4) for s in spacing)  # type: ignore[return-value]


def _uids(seed: int, subject: str, prefix: str | None) -> dict[str, str]:
    return {
        "study_uid": derive_uid("medidiff-demo", seed, subject, "study", prefix=prefix),
        "frame_of_reference_uid": derive_uid("medidiff-demo", seed, subject, "frame", prefix=prefix),
    }


def _write_series(
    root: Path,
    *,
    name: str,
    subject: str,
    folder: Path,
    image: Volume,
    labels: LabelVolume,
    protocol: Protocol,
    slopes: float | np.ndarray,
    params: dict[str, Any],
    seed: int,
    series_number: int,
    uid_prefix: str | None,
) -> DemoSeries:
    series_uid = derive_uid("medidiff-demo", seed, name, "series", prefix=uid_prefix)
    uids = _uids(seed, subject, uid_prefix)
    transfer_syntax = protocol.transfer_syntax
    if transfer_syntax == JPEG2000Lossless and min(image.shape[:2]) < 32:
        # OpenJPEG cannot encode frames under 32 pixels (tiny test cohorts); the record says so.
        transfer_syntax = JPEGLSLossless
    common = dict(
        modality=image.modality,
        series_uid=series_uid,
        series_number=series_number,
        series_description=f"medidiff demo {image.modality} {protocol.name} (synthetic, not for clinical use)",
        rescale_slope=slopes,
        rescale_intercept=protocol.intercept,
        transfer_syntax=transfer_syntax,
        patient_name=f"Demo^{subject.replace('-', '').upper()}",
        patient_id=f"DEMO-{subject.upper()}",
        uid_prefix=uid_prefix,
        **uids,
    )
    if protocol.enhanced:
        paths = [write_enhanced_series(image, folder / f"{name}-enhanced.dcm", **common)]  # type: ignore[arg-type]
    else:
        paths = write_dicom_series(
            image,
            folder,
            reverse_instance_numbers=protocol.reverse_instance_numbers,
            file_prefix=f"{name}-" if protocol.extra_series_spacing else "IM",
            file_suffix=protocol.file_suffix,
            **common,  # type: ignore[arg-type]
        )
    truth = root / "truth" / f"{name}.nii.gz"
    label_path = root / "labels" / f"{name}.nii.gz"
    param_path = root / "truth" / f"{name}.json"
    _save_nifti(image, truth)
    _save_nifti(labels, label_path)
    record = DemoSeries(
        name=name,
        subject=subject,
        modality=image.modality,
        protocol=protocol.name,
        layout="enhanced" if protocol.enhanced else "single-frame",
        transfer_syntax=str(transfer_syntax),
        reverse_instance_numbers=protocol.reverse_instance_numbers and not protocol.enhanced,
        shape=image.shape,
        spacing=tuple(round(s, 6) for s in image.spacing),  # type: ignore[arg-type]
        orientation=image.orientation,
        series_uid=str(series_uid),
        study_uid=str(uids["study_uid"]),
        files=tuple(p.relative_to(root).as_posix() for p in paths),
        truth=truth.relative_to(root).as_posix(),
        labels=label_path.relative_to(root).as_posix(),
        params=param_path.relative_to(root).as_posix(),
    )
    atomic_write_json(
        param_path,
        {
            "series": record.to_json(),
            "protocol": protocol.to_json(),
            "rescale_slope": np.asarray(slopes).tolist(),
            "labels": {str(k): v for k, v in (labels.labels or {}).items()},
            "parameters": params,
        },
    )
    return record


def _slopes(protocol: Protocol, n_slices: int) -> float | np.ndarray:
    if isinstance(protocol.slope, tuple):
        return np.resize(np.asarray(protocol.slope, float), n_slices)
    return float(protocol.slope)


def make_demo_cohort(
    dst: str | Path,
    *,
    seed: int = 0,
    n_mr: int = 20,
    n_ct: int = 10,
    resolution_scale: float = 1.0,
    include_broken: bool = True,
    progress: ProgressCallback | None = None,
    uid_prefix: str | None = None,
) -> DemoCohortResult:
    """Write the demo cohort into ``dst`` (see the module docstring for the layout).

    Args:
        dst: folder to write into; it must be empty or not exist.
        seed: the seed for every random draw and every UID; same seed, same bytes.
        n_mr: number of brain MR subjects (MNI152 template from nilearn, no download).
        n_ct: number of CT phantoms.
        resolution_scale: multiplies every protocol's voxel spacing (e.g. 4.0 for tiny test
            cohorts); 1.0 gives 1.2-3.2 mm voxels.
        include_broken: also write the deliberately broken items under ``broken/``.
        progress: called as ``progress(done, total)`` after each subject.
        uid_prefix: UID root (pydicom's when ``None``).

    Returns:
        A :class:`DemoCohortResult` listing the series, their ground truth and the broken items.

    Raises:
        FileExistsError: when ``dst`` exists and is not empty.
        ValueError: for negative counts or a non-positive ``resolution_scale``.
    """
    t0 = time.perf_counter()
    root = Path(dst)
    if n_mr < 0 or n_ct < 0:
        raise ValueError(f"n_mr and n_ct must be >= 0, got {n_mr}, {n_ct}")
    if not resolution_scale > 0:
        raise ValueError(f"resolution_scale must be positive, got {resolution_scale}")
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; choose a new folder for the demo cohort")
    root.mkdir(parents=True, exist_ok=True)
    result = DemoCohortResult(root=root, seed=seed)
    total = n_mr + n_ct + int(include_broken)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    if n_mr:
        template = load_mni_template()
        # Every grid covers the brain box plus a margin, whatever its orientation.
        box_min, box_max = template.box_min - 6.0, template.box_max + 6.0
    for i in range(n_mr):
        subject = f"mr-{i + 1:03d}"
        protocol = MR_PROTOCOLS[i % len(MR_PROTOCOLS)]
        params = draw_mr_params(np.random.default_rng([seed, 1, i]))
        grid = grid_covering(
            box_min, box_max, protocol.direction, _scaled(protocol.spacing, resolution_scale)
        )
        slopes = _slopes(protocol, grid.shape[2])
        image, labels = synthesize_mr(params, grid, slopes=slopes, template=template)
        result.series.append(
            _write_series(
                root,
                name=subject,
                subject=subject,
                folder=root / DICOM_DIR / "mr" / subject,
                image=image,
                labels=labels,
                protocol=protocol,
                slopes=slopes,
                params=params.to_json(),
                seed=seed,
                series_number=1,
                uid_prefix=uid_prefix,
            )
        )
        tick()

    for i in range(n_ct):
        subject = f"ct-{i + 1:03d}"
        protocol, params, series = ct_phantom_series(seed, i, resolution_scale=resolution_scale)
        for n, (image, labels) in enumerate(series):
            name = subject if n == 0 else f"{subject}-s{n + 1}"
            result.series.append(
                _write_series(
                    root,
                    name=name,
                    subject=subject,
                    folder=root / DICOM_DIR / "ct" / subject,
                    image=image,
                    labels=labels,
                    protocol=protocol,
                    slopes=1.0,
                    params=params.to_json(),
                    seed=seed,
                    series_number=n + 1,
                    uid_prefix=uid_prefix,
                )
            )
        tick()

    if include_broken:
        result.broken = write_broken_items(root / DICOM_DIR, seed=seed, uid_prefix=uid_prefix)
        tick()

    atomic_write_text(root / "LICENSE_MNI152.txt", _licence_text())
    result.expected_problems_json = atomic_write_json(
        root / "expected_problems.json",
        {
            "description": (
                "Deliberately broken items of the medidiff demo drop and the problem kinds "
                "(medidiff.problems.ProblemKind values) a correct reader reports for them. Every kind "
                "in 'expected' must be reported for some of the item's paths; kinds in 'also_allowed' "
                "may be reported too. Paths are relative to this file's folder."
            ),
            "items": [b.to_json() for b in result.broken],
        },
    )
    result.cohort_json = atomic_write_json(
        root / "cohort.json", _cohort_json(result, n_mr, n_ct, resolution_scale)
    )
    result.seconds = time.perf_counter() - t0
    return result


def ct_phantom_series(
    seed: int, index: int, *, resolution_scale: float = 1.0, noise: bool = True
) -> tuple[Protocol, CTPhantomParams, list[tuple[Volume, LabelVolume]]]:
    """The demo cohort's CT phantom ``index`` (0-based; cohort seed ``seed``): its protocol, its drawn
    parameters and its series' stored voxels and labels, as :func:`make_demo_cohort` writes them;
    ``noise=False`` leaves out the noise the cohort stores in them (the phantom's analytic anatomy)."""
    protocol = CT_PROTOCOLS[index % len(CT_PROTOCOLS)]
    params = draw_ct_params(np.random.default_rng([seed, 2, index]))
    centre = np.asarray(params.centre)
    spacings = [protocol.spacing]
    if protocol.extra_series_spacing is not None:
        spacings.append(protocol.extra_series_spacing)
    series = []
    for spacing in spacings:
        grid = grid_covering(
            centre - CT_BOX_HALF_EXTENT,
            centre + CT_BOX_HALF_EXTENT,
            protocol.direction,
            _scaled(spacing, resolution_scale),
        )
        series.append(synthesize_ct(params, grid, noise=noise))
    return protocol, params, series


def _licence_text() -> str:
    return (
        "The brain MR subjects of this synthetic cohort (folders mr/, truth/mr-*, labels/mr-*) are\n"
        "derived from the MNI ICBM152 2009a nonlinear symmetric template:\n\n"
        f"{MNI152_NOTICE}\n\n"
        "The CT phantoms are generated analytically by medidiff and derive from no data.\n"
    )


def _cohort_json(result: DemoCohortResult, n_mr: int, n_ct: int, resolution_scale: float) -> dict[str, Any]:
    return {
        "name": "medidiff demo cohort",
        "synthetic": True,
        "phi": "none: every subject is synthetic; patient names and IDs are made up (Demo^..., DEMO-...)",
        "generator": {"module": "medidiff.demo.cohort", "medidiff_version": medidiff.__version__},
        "seed": result.seed,
        "options": {"n_mr": n_mr, "n_ct": n_ct, "resolution_scale": resolution_scale},
        "source": {
            "mr": MNI152_SOURCE,
            "mr_licence": "MNI/McGill permissive licence: any use, keep the copyright notice (LICENSE_MNI152.txt)",
            "mr_notice": MNI152_NOTICE,
            "ct": "analytic phantoms (body outline, lungs, liver, kidneys, spine, liver lesions), no source data",
        },
        "labels": {
            "MR": {str(k): v for k, v in MR_LABELS.items()},
            "CT": {str(k): v for k, v in CT_LABELS.items()},
        },
        "layout": {
            "mr": "dicom/mr/<subject>/: one DICOM series per subject",
            "ct": "dicom/ct/<subject>/: one DICOM series per phantom (two in some folders)",
            "broken": "dicom/broken/: deliberately broken items, see expected_problems.json (paths relative to dicom/)",
            "truth": "truth/<series>.nii.gz: stored voxels in physical units; truth/<series>.json: parameters",
            "labels": "labels/<series>.nii.gz: label maps on the truth grids",
        },
        "protocols": {
            "MR": [p.to_json() for p in MR_PROTOCOLS],
            "CT": [p.to_json() for p in CT_PROTOCOLS],
        },
        "series": [s.to_json() for s in result.series],
        "broken": [b.name for b in result.broken],
    }


def load_cohort(root: str | Path) -> dict[str, Any]:
    """Read ``cohort.json`` of a drop written by :func:`make_demo_cohort`."""
    return json.loads((Path(root) / "cohort.json").read_text())
