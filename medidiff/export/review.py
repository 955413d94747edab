"""Review sheets: what a radiologist looks at first, as PNG and PDF, with an HTML index of a run's exports.

:func:`review_sheet` draws, for a stage's result folder, key slices in three planes (axial, coronal,
sagittal, in the radiological convention: patient right on the left) through the result's centre (a
segmentation: through its labelled voxels' centre):

- reconstruction / denoising: input | posterior mean | difference (mean - input) | posterior std;
- segmentation: input | input with the label overlay (the data card's colours) | uncertainty;
- synthesis: each sample;

then a metrics table (the stage's recorded metrics; structure volumes for a segmentation) and a
provenance summary (stage, checkpoint and its weights' hash, sampler, steps, particles or samples,
seed, medidiff version). It writes ``review.png``, ``review.pdf`` and ``index.html`` (the sheet, the
tables, and the DICOM objects of an ``export.json`` in the same folder, if any). Nothing on the sheet
comes from patient attributes: volumes are named by role, the subject by its keyed id at most.

Drawn with PIL (no plotting library); the input is resampled onto the result's grid (trilinear; labels
nearest-neighbour) so that every panel shows the same plane.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medidiff.export.source import ExportError, Result, read_result, result_input

__all__ = ["review_sheet", "write_index"]

_PANEL = 200  # pixels per panel side (longest side)
_BG, _FG = (18, 18, 18), (235, 235, 235)


def _canonical(arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(arr), affine))
    return np.asarray(img.dataobj), np.asarray(img.affine)


def _resample(
    arr: np.ndarray, affine: np.ndarray, shape: tuple[int, ...], target: np.ndarray, order: int
) -> np.ndarray:
    """``arr`` (with ``affine``) sampled at the voxel centres of the grid ``(shape, target)``."""
    from scipy.ndimage import map_coordinates

    ijk = np.indices(shape[:3]).reshape(3, -1).astype(np.float64)
    world = target[:3, :3] @ ijk + target[:3, 3:4]
    inv = np.linalg.inv(affine)
    src = inv[:3, :3] @ world + inv[:3, 3:4]
    out = map_coordinates(np.asarray(arr, dtype=np.float64), src, order=order, mode="constant", cval=0.0)
    return out.reshape(shape[:3])


def _planes(arr: np.ndarray, centre: tuple[int, int, int]) -> list[np.ndarray]:
    i, j, k = centre
    axial = np.fliplr(np.flipud(arr[:, :, k].T))
    coronal = np.fliplr(np.flipud(arr[:, j, :].T))
    sagittal = np.flipud(arr[i, :, :].T)
    return [axial, coronal, sagittal]


def _plane_spacing(spacing: np.ndarray) -> list[tuple[float, float]]:
    """(column, row) pixel sizes of the three planes."""
    return [(spacing[0], spacing[1]), (spacing[0], spacing[2]), (spacing[1], spacing[2])]


def _window(arr: np.ndarray, symmetric: bool = False) -> tuple[float, float]:
    v = arr[np.isfinite(arr)]
    if v.size == 0:
        return 0.0, 1.0
    if symmetric:
        m = float(np.percentile(np.abs(v), 99.5)) or 1.0
        return -m, m
    lo, hi = (float(x) for x in np.percentile(v, [0.5, 99.5]))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _tile(
    img2d: np.ndarray, px: tuple[float, float], window: tuple[float, float], overlay: Any = None
) -> Any:
    from PIL import Image

    lo, hi = window
    g = ((np.clip(img2d, lo, hi) - lo) / max(hi - lo, 1e-12) * 255).round().astype(np.uint8)
    rgb = np.repeat(g[..., None], 3, axis=2).astype(np.float64)
    if overlay is not None:
        labels, colours = overlay
        for value, colour in colours.items():
            m = labels == value
            rgb[m] = 0.55 * rgb[m] + 0.45 * np.asarray(colour, dtype=np.float64)
    im = Image.fromarray(rgb.round().astype(np.uint8), "RGB")
    w, h = img2d.shape[1] * px[0], img2d.shape[0] * px[1]
    s = _PANEL / max(w, h)
    return im.resize(
        (max(1, round(w * s)), max(1, round(h * s))),
        Image.Resampling.NEAREST if overlay else Image.Resampling.BILINEAR,
    )


def _font(size: int) -> Any:
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _panels(
    result: Result, search: Sequence[Path] = ()
) -> tuple[list[str], list[tuple[np.ndarray, tuple[float, float], Any]], np.ndarray, np.ndarray]:
    """Column titles and, per column, (array on the display grid, window, overlay); plus spacing and grid."""
    import nibabel as nib

    kind = result.kind
    if kind == "synthetic":
        names = list(result.files)
        first = nib.load(result.files[names[0]])
        base, aff = _canonical(np.asarray(first.dataobj, dtype=np.float64), first.affine)
        cols = []
        for name in names[:4]:
            img = nib.load(result.files[name])
            arr, _ = _canonical(np.asarray(img.dataobj, dtype=np.float64), img.affine)
            cols.append((arr, _window(arr), None))
        return [f"sample {i + 1}" for i in range(len(cols))], cols, aff, np.asarray(base.shape)
    main = "labels" if kind == "segmentation" else "mean"
    if main not in result.files:
        raise ExportError(f"{result.folder} has no {main}.nii.gz; rerun the stage.")
    img = nib.load(result.files[main])
    arr, aff = _canonical(np.asarray(img.dataobj, dtype=np.float64), img.affine)
    found = result_input(result, main, search)
    inp = None
    if found is not None:
        src = nib.load(found[0])
        inp = _resample(np.asarray(src.dataobj, dtype=np.float64), src.affine, arr.shape, aff, order=1)
    if kind == "segmentation":
        if inp is None:
            raise ExportError(
                "a segmentation's review sheet needs its input volume; run it where the stage ran."
            )
        colours = {
            int(d["value"]): tuple(d.get("colour") or (255, 0, 0))
            for d in result.record.get("labels", [])
            if int(d["value"]) != 0
        }
        w = _window(inp)
        cols = [(inp, w, None), (inp, w, (arr.astype(int), colours))]
        if "uncertainty" in result.files:
            u = nib.load(result.files["uncertainty"])
            ua, _ = _canonical(np.asarray(u.dataobj, dtype=np.float64), u.affine)
            cols.append((ua, (0.0, max(float(ua.max()), 1e-6)), None))
        titles = ["input", "labels", "uncertainty (entropy)"][: len(cols)]
        return titles, cols, aff, np.asarray(arr.shape)
    w = _window(arr)
    cols, titles = [], []
    # a reconstruction's input is the reference it simulated its measurement from
    name = "reference" if kind == "reconstruction" else "input"
    if inp is not None:
        cols.append((inp, w, None))
        titles.append(name)
    cols.append((arr, w, None))
    titles.append("posterior mean")
    if inp is not None:
        diff = arr - inp
        cols.append((diff, _window(diff, symmetric=True), None))
        titles.append(f"mean - {name}")
    if "std" in result.files:
        s = nib.load(result.files["std"])
        sa, _ = _canonical(np.asarray(s.dataobj, dtype=np.float64), s.affine)
        cols.append((sa, (0.0, max(float(np.percentile(sa, 99.5)), 1e-6)), None))
        titles.append("posterior std")
    return titles, cols, aff, np.asarray(arr.shape)


def _centre(result: Result, shape: np.ndarray, cols: list[Any]) -> tuple[int, int, int]:
    if result.kind == "segmentation":
        labels = cols[1][2][0]
        idx = np.argwhere(labels > 0)
        if len(idx):
            return tuple(int(v) for v in idx.mean(0).round())  # type: ignore[return-value]
    return tuple(int(s) // 2 for s in shape)  # type: ignore[return-value]


def _tables(result: Result) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(metrics rows, provenance rows) from the stage's record."""
    from medidiff import __version__

    r = result.record
    metrics: list[tuple[str, str]] = []
    if result.kind == "segmentation":
        for st in r.get("structures", []):
            v = st.get("volume_ml_samples", {})
            metrics.append(
                (
                    f"{st['name']} (mL)",
                    f"{st['volume_ml']:.1f} (samples {v.get('mean', 0):.1f} +- {v.get('sd', 0):.1f})",
                )
            )
    for key, value in (r.get("metrics") or {}).items():
        if isinstance(value, int | float):
            metrics.append((key, f"{value:.4g}"))
    for key in ("sigma", "noise_level", "sigma_estimated"):
        if isinstance(r.get("noise"), dict) and isinstance(r["noise"].get(key), int | float):
            metrics.append((f"noise {key}", f"{r['noise'][key]:.4g}"))
    prov: list[tuple[str, str]] = [
        ("result", result.kind),
        ("medidiff", str(r.get("medidiff_version", __version__))),
    ]
    model = r.get("segmenter") or r.get("prior") or r.get("checkpoint") or {}
    if isinstance(model, dict):
        for key in ("checkpoint", "weights_sha256", "step"):
            if model.get(key) is not None:
                value = str(model[key])
                prov.append((key, Path(value).name if key == "checkpoint" else value[:16]))
    elif model:
        prov.append(("checkpoint", Path(str(model)).name))
    settings = r.get("settings") if isinstance(r.get("settings"), dict) else {}
    for key in ("method", "sampler", "steps", "particles", "n_particles", "samples", "seed"):
        value = r.get(key, settings.get(key))
        if value is not None and not isinstance(value, dict | list):
            prov.append((key, str(value)))
    seeds = r.get("seeds")
    if isinstance(seeds, dict) and "seed" in seeds:
        prov.append(("seed", str(seeds["seed"])))
    return metrics, list(dict.fromkeys(prov))


def review_sheet(
    result_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    input_root: Sequence[str | os.PathLike[str]] = (),
) -> dict[str, Path]:
    """Write ``review.png``, ``review.pdf`` and ``index.html`` for ``result_dir`` into ``out_dir``.

    ``input_root``: more folders to look for the stage's input volume in (an ingest folder's manifest
    finds it by hash).

    Raises:
        ExportError: not a stage's output folder, or its main output or input is missing.
    """
    from PIL import Image, ImageDraw

    from medidiff.io.atomic import atomic_path

    result = read_result(result_dir)
    titles, cols, aff, shape = _panels(result, [Path(p) for p in input_root])
    spacing = np.sqrt((aff[:3, :3] ** 2).sum(0))
    centre = _centre(result, shape, cols)
    pxs = _plane_spacing(spacing)
    tiles = []
    for arr, window, overlay in cols:
        planes = _planes(arr, centre)
        over = None if overlay is None else [(p, overlay[1]) for p in _planes(overlay[0], centre)]
        tiles.append(
            [
                _tile(p, px, window, None if over is None else over[n])
                for n, (p, px) in enumerate(zip(planes, pxs, strict=True))
            ]
        )
    metrics, prov = _tables(result)
    pad, head = 10, 28
    col_w = _PANEL + pad
    width = pad + col_w * len(tiles) + 80
    rows_h = [max(t[r].size[1] for t in tiles) + pad for r in range(3)]
    text_rows = 2 + len(metrics) + len(prov) + 3
    height = head + 20 + sum(rows_h) + text_rows * 18 + pad
    sheet = Image.new("RGB", (max(width, 720), height), _BG)
    draw = ImageDraw.Draw(sheet)
    draw.text(
        (pad, 6),
        f"medidiff review: {result.kind} - RESEARCH USE ONLY, NOT FOR DIAGNOSTIC USE",
        fill=_FG,
        font=_font(16),
    )
    y = head + 20
    for c, title in enumerate(titles):
        draw.text((pad + c * col_w, head), title, fill=_FG, font=_font(13))
    for r, plane in enumerate(("axial", "coronal", "sagittal")):
        for c, t in enumerate(tiles):
            sheet.paste(t[r], (pad + c * col_w, y))
        draw.text((pad + len(tiles) * col_w, y + 4), plane, fill=_FG, font=_font(12))
        y += rows_h[r]
    draw.text(
        (pad, y),
        "R on the left of each axial and coronal view (radiological convention)",
        fill=(170, 170, 170),
        font=_font(11),
    )
    y += 22
    for heading, rows in (("metrics", metrics or [("-", "none recorded")]), ("provenance", prov)):
        draw.text((pad, y), heading, fill=(255, 210, 120), font=_font(13))
        y += 18
        for k, v in rows:
            draw.text((pad + 10, y), f"{k}: {v}", fill=_FG, font=_font(12))
            y += 18
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png, pdf, index = out / "review.png", out / "review.pdf", out / "index.html"
    with atomic_path(png) as tmp:
        sheet.save(tmp, format="PNG")
    with atomic_path(pdf) as tmp:
        sheet.save(tmp, format="PDF", resolution=100.0)
    with atomic_path(index) as tmp:
        Path(tmp).write_text(_index_html(result, metrics, prov, out), encoding="utf-8")
    return {"png": png, "pdf": pdf, "index": index}


def write_index(result_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """(Re)write ``index.html`` beside a sheet already in ``out_dir`` (after the DICOM objects landed there)."""
    from medidiff.io.atomic import atomic_path

    result = read_result(result_dir)
    metrics, prov = _tables(result)
    out = Path(out_dir)
    with atomic_path(out / "index.html") as tmp:
        Path(tmp).write_text(_index_html(result, metrics, prov, out), encoding="utf-8")
    return out / "index.html"


def _index_html(
    result: Result, metrics: list[tuple[str, str]], prov: list[tuple[str, str]], out: Path
) -> str:
    def table(rows: list[tuple[str, str]]) -> str:
        body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
        return f"<table>{body}</table>"

    exports = ""
    record_path = out / "export.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text(encoding="utf-8"))
        items = "".join(
            f'<li><a href="{html.escape(o["folder"])}/">{html.escape(o["folder"])}</a>: {html.escape(o["what"])} '
            f"({html.escape(o['sop_class'])}, {len(o['files'])} file(s))</li>"
            for o in record.get("objects", [])
        )
        exports = f"<h2>DICOM objects</h2><ul>{items}</ul>"
    return (
        '<!doctype html><html><head><meta charset="utf-8"><title>medidiff review</title>'
        "<style>body{font-family:sans-serif;background:#121212;color:#eee}th{text-align:left;padding-right:1em}"
        "a{color:#9cf}</style></head><body>"
        f"<h1>medidiff review: {html.escape(result.kind)}</h1><p><b>Research use only, not for diagnostic use.</b></p>"
        '<p><a href="review.pdf">review.pdf</a></p><img src="review.png" alt="review sheet">'
        f"<h2>Metrics</h2>{table(metrics or [('-', 'none recorded')])}<h2>Provenance</h2>{table(prov)}{exports}"
        "</body></html>\n"
    )
