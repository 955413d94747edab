"""What ITK (and so SimpleITK, ANTs, 3D Slicer) makes of a NIfTI header's sform and qform.

**ITK 5.x** (``NiftiImageIO::SetImageIOOrientationFromNIfTI`` since ITK PR #1868, 2020; checked in
the tests against the SimpleITK 2.5 / ITK 5.4 wheel) always takes the voxel size from
``|pixdim[1:4]|`` and only the direction and the origin from a transform, because an
``itk::Image`` cannot hold a shear:

1. both codes 0 -> identity direction in LPS and origin 0 (RAS affine ``diag(-dx, -dy, dz)``);
2. the sform wins if its 3x3 block equals the qform's to 1e-5 element-wise and the
   translations to 1e-7 (the common "both written from the same DICOM" case); otherwise
3. the sform wins if it is *decomposable without skew* (last row ``[0, 0, 0, 1]``, invertible,
   and its column-normalised 3x3 block orthonormal to 1e-4) **and** one of: ``qform_code == 0``
   (with ``sform_code > 0``); ``sform_code == 1`` (scanner); or both codes set and the two
   transforms very similar (singular values, rotations and offsets equal to 1e-4);
4. otherwise the qform if ``qform_code > 0``; otherwise ITK refuses the file ("ITK only
   supports orthonormal direction cosines").

A sform holding NaN defeats ITK's checks (every "difference > tolerance" test is false for NaN):
ITK 5.4 then either refuses the file or returns a NaN direction, even when a valid qform exists.
Both are reported here as ``itk_source == "refused"``.

Recent ITK also has an opt-in ``SFORM_PERMISSIVE`` mode (off by default) that replaces a skewed sform
by its nearest rotation; it is not emulated here. Step 3's "very similar" test is ITK's SVD
comparison restated as "same singular values, same normalised directions, same offsets"; the two
agree except for matrices within a hair of the tolerances.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

__all__ = ["ItkAffineSource", "itk_choice"]

ItkAffineSource = Literal["sform", "qform", "none", "refused"]


def itk_choice(header: Any, scode: int, qcode: int) -> tuple[ItkAffineSource, np.ndarray | None]:
    """Restate ITK 5.x's ``SetImageIOOrientationFromNIfTI`` (see the module docstring).

    Args:
        header: a nibabel ``Nifti1Header`` / ``Nifti2Header``.
        scode, qcode: its ``sform_code`` and ``qform_code``.

    Returns:
        The transform ITK would pick and the RAS affine SimpleITK would report (direction *
        ``|pixdim|`` + origin), or ``None`` when ITK would refuse the file.
    """
    pixdim = np.asarray(header["pixdim"], float)
    # nifti1_io replaces a non-positive voxel size by 1 when building the qform.
    spacing = np.array([abs(d) if d != 0 else 1.0 for d in pixdim[1:4]])
    if scode <= 0 and qcode <= 0:
        return "none", np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    if scode > 0 and not np.all(np.isfinite(header.get_sform())):
        return "refused", None  # NaN passes ITK's tolerance tests: NaN direction or an exception
    # nifti1_io zeroes sto_xyz when sform_code is 0 and builds qto_xyz from pixdim when qform_code is 0.
    sto = np.asarray(header.get_sform(), float) if scode > 0 else np.zeros((4, 4))
    qto = _nifti_qto_xyz(header) if qcode > 0 else np.diag([*spacing, 1.0])

    similar = (
        np.all(np.abs(sto[:3, :3] - qto[:3, :3]) <= 1e-5)
        and np.abs(sto[:3, 3] - qto[:3, 3]).sum() <= 1e-7
        and np.abs(sto[3] - qto[3]).sum() <= 1e-7
    )
    prefer_sform = bool(similar)
    if (not similar or scode > 0) and _decomposable_without_skew(sto):
        if qcode <= 0 < scode or scode == 1:
            prefer_sform = True
        elif qcode > 0 and scode > 0:
            prefer_sform = _very_similar(sto, qto)
    if prefer_sform:
        chosen, source = sto, "sform"
    elif qcode > 0:
        chosen, source = qto, "qform"
    else:
        return "refused", None
    norms = np.linalg.norm(chosen[:3, :3], axis=0)
    if np.any(norms == 0) or not np.all(np.isfinite(chosen)):
        return "refused", None
    out = np.eye(4)
    out[:3, :3] = chosen[:3, :3] / norms * spacing
    out[:3, 3] = chosen[:3, 3]
    return source, out  # type: ignore[return-value]


def _nifti_qto_xyz(header: Any) -> np.ndarray:
    """nifti1_io's ``nifti_quatern_to_mat44``: tolerant of qfac 0 and non-positive pixdim."""
    b, c, d = (float(header[k]) for k in ("quatern_b", "quatern_c", "quatern_d"))
    a2 = 1.0 - (b * b + c * c + d * d)
    if a2 < 1e-7:  # nifti1_io: a 180-degree rotation, renormalise (b, c, d)
        s = 1.0 / np.sqrt(b * b + c * c + d * d)
        a, b, c, d = 0.0, b * s, c * s, d * s
    else:
        a = float(np.sqrt(a2))
    pixdim = np.asarray(header["pixdim"], float)
    xd, yd, zd = (v if v > 0 else 1.0 for v in pixdim[1:4])
    if pixdim[0] < 0:
        zd = -zd
    r = np.array(
        [
            [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
            [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
            [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b],
        ]
    )
    out = np.eye(4)
    out[:3, :3] = r * np.array([xd, yd, zd])
    out[:3, 3] = [float(header[k]) for k in ("qoffset_x", "qoffset_y", "qoffset_z")]
    return out


def _decomposable_without_skew(m: np.ndarray) -> bool:
    if not np.all(np.isfinite(m)):
        return False
    if abs(m[3, 3] - 1.0) + np.abs(m[3, :3]).sum() > np.finfo(np.float32).eps:
        return False
    block = m[:3, :3]
    if abs(np.linalg.det(block)) < 1e-12:
        return False
    norms = np.linalg.norm(block, axis=0)
    rot = block / norms
    return bool(np.all(np.abs(rot @ rot.T - np.eye(3)) <= 1e-4))


def _very_similar(s: np.ndarray, q: np.ndarray) -> bool:
    sv_s = np.linalg.svd(s[:3, :3], compute_uv=False)
    sv_q = np.linalg.svd(q[:3, :3], compute_uv=False)
    dir_s = s[:3, :3] / np.linalg.norm(s[:3, :3], axis=0)
    dir_q = q[:3, :3] / np.linalg.norm(q[:3, :3], axis=0)
    return bool(
        np.all(np.abs(sv_s - sv_q) <= 1e-4)
        and np.all(np.abs(dir_s - dir_q) <= 1e-4)
        and np.all(np.abs(s[:3, 3] - q[:3, 3]) <= 1e-4)
    )
