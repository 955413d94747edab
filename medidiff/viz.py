"""Quick-look pictures: a montage of the three orthogonal mid-slices of several volumes.

Used for the documentation (samples next to real patches) and for review sheets. Reads NIfTI
files, reorients them to RAS, and draws them in the radiological convention (patient right on the
left of the picture, superior and anterior at the top); the column headers say so. Writes a PNG
with PIL (no matplotlib needed).

    python -m medidiff.viz docs/montage.png runs/synth/*.nii.gz --titles ...
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["mid_slices", "montage"]


def mid_slices(array: np.ndarray) -> list[np.ndarray]:
    """Axial, coronal and sagittal mid-slices of a RAS-ordered array, oriented for display
    (superior / anterior at the top, patient right on the left of the picture)."""
    i, j, k = (s // 2 for s in array.shape)
    axial = np.flipud(array[:, :, k].T)  # rows: A at the top; columns: L -> R
    coronal = np.flipud(array[:, j, :].T)  # rows: S at the top; columns: L -> R
    sagittal = np.flipud(array[i, :, :].T)  # rows: S at the top; columns: P -> A
    return [np.fliplr(axial), np.fliplr(coronal), sagittal]  # radiological: R on the left


def _to_uint8(img: np.ndarray, lo: float, hi: float) -> np.ndarray:
    x = (np.clip(img.astype(np.float64), lo, hi) - lo) / max(hi - lo, 1e-12)
    return (x * 255).round().astype(np.uint8)


def montage(
    paths: Sequence[str | Path],
    out_png: str | Path,
    *,
    titles: Sequence[str] | None = None,
    scale: int = 3,
    percentiles: tuple[float, float] = (1.0, 99.0),
    window: tuple[float, float] | None = None,
) -> Path:
    """Write one row per volume: its three mid-slices, each windowed to the volume's percentiles.

    Args:
        paths: NIfTI files (any orientation; reoriented to RAS first).
        out_png: the picture to write (atomically).
        titles: one label per row (default: the file names).
        scale: magnification (pixels per smallest voxel size); slices keep their physical aspect.
        percentiles: intensity window per volume.
        window: one fixed intensity window ``(lo, hi)`` for every volume instead (e.g. ``(0, 1)`` for
            normalised volumes, so that a sample's contrast is shown as it is, not stretched).

    Raises:
        ValueError: no paths, or titles of the wrong length.
    """
    import nibabel as nib
    from PIL import Image, ImageDraw

    from medidiff.io.atomic import atomic_path

    if not paths:
        raise ValueError("montage needs at least one volume")
    labels = list(titles) if titles is not None else [Path(p).name for p in paths]
    if len(labels) != len(paths):
        raise ValueError(f"{len(labels)} titles for {len(paths)} volumes")
    rows: list[list[Image.Image]] = []
    for p in paths:
        img = nib.as_closest_canonical(nib.load(str(p)))
        arr = np.asarray(img.dataobj, dtype=np.float32)
        lo, hi = window if window is not None else np.percentile(arr[np.isfinite(arr)], percentiles)
        zi, zj, zk = (float(z) for z in img.header.get_zooms()[:3])
        unit = min(zi, zj, zk)
        # (row, column) voxel sizes of the axial, coronal and sagittal pictures: square millimetres
        sizes = [(zj, zi), (zk, zi), (zk, zj)]
        tiles = []
        for sl, (zr, zc) in zip(mid_slices(arr), sizes, strict=True):
            h = max(1, round(sl.shape[0] * zr / unit * scale))
            w = max(1, round(sl.shape[1] * zc / unit * scale))
            tiles.append(Image.fromarray(_to_uint8(sl, lo, hi)).resize((w, h), Image.NEAREST))
        rows.append(tiles)
    row_h = [max(t.size[1] for t in r) for r in rows]
    cell_w = max(t.size[0] for r in rows for t in r)
    label_w, pad = 150, 4
    canvas = Image.new("L", (label_w + 3 * (cell_w + pad), sum(row_h) + pad * len(rows) + 16), 0)
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(("axial (R|L)", "coronal (R|L)", "sagittal (P|A)")):
        draw.text((label_w + c * (cell_w + pad) + 2, 2), name, fill=255)
    y = 16
    for label, slices, h in zip(labels, rows, row_h, strict=True):
        draw.text((2, y + h // 2 - 6), label[:22], fill=255)
        for c, tile in enumerate(slices):
            canvas.paste(tile, (label_w + c * (cell_w + pad), y))
        y += h + pad
    out = Path(out_png)
    with atomic_path(out) as tmp:
        canvas.save(tmp, format="PNG")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Montage of mid-slices of NIfTI volumes.")
    ap.add_argument("out_png")
    ap.add_argument("volumes", nargs="+")
    ap.add_argument("--titles", nargs="*", default=None)
    ap.add_argument("--scale", type=int, default=3)
    a = ap.parse_args(argv)
    print(montage(a.volumes, a.out_png, titles=a.titles, scale=a.scale))


if __name__ == "__main__":
    main()
