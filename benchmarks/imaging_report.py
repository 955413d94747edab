"""The imaging benchmark's outputs besides its JSON: markdown tables and the reconstruction pictures.

Used by :mod:`bench_imaging`: :func:`markdown` renders a run's result (the seed summary of a reporting
run, or the sweeps of a tuning run, then every run); :func:`summary_markdown` the seed summary alone
(:func:`imaging_protocol.aggregate`); :func:`picture` one reconstruction's mid-slices.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def _f(v: Any, nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def _pm(st: dict[str, Any] | None, nd: int) -> str:
    if st is None:
        return "-"
    return f"{st['mean']:.{nd}f} ± {st['std']:.{nd}f} [{st['min']:.{nd}f}, {st['max']:.{nd}f}]"


def summary_markdown(summary: dict[str, Any], n_seeds: int) -> str:
    """The seed summary as two markdown tables (methods; smc's paired differences)."""
    lines = [
        f"Mean over the reporting volumes per seed, then mean ± sample std [min, max] over {n_seeds} seed(s).",
        "",
        "| setting | method | PSNR dB | SSIM | 90% coverage |",
        "| --- | --- | --- | --- | --- |",
    ]
    for setting, block in summary.items():
        for m, st in block["methods"].items():
            lines.append(
                f"| {setting} | {m} | {_pm(st.get('psnr_db'), 2)} | {_pm(st.get('ssim'), 3)} "
                f"| {_pm(st.get('coverage90'), 3)} |"
            )
    diff_rows = [
        f"| {setting} | {name} | {_pm(st.get('psnr_db'), 2)} | {_pm(st.get('ssim'), 3)} |"
        for setting, block in summary.items()
        for name, st in block["differences"].items()
    ]
    if diff_rows:
        lines += [
            "",
            "| setting | paired difference | PSNR dB | SSIM |",
            "| --- | --- | --- | --- |",
            *diff_rows,
        ]
    return "\n".join(lines) + "\n"


def _header(result: dict[str, Any]) -> str:
    cfg = result["config"]
    return (
        f"Checkpoint `{cfg['checkpoint']}` (step {cfg['checkpoint_step']}, weights sha256 "
        f"`{cfg['checkpoint_sha256']}`); part `{cfg['part']}` of `{cfg['split_file']}` "
        f"({', '.join(cfg['subjects'])}); {cfg['mode']}; seeds {' '.join(map(str, cfg['seeds']))}; sigma_y "
        f"{cfg['sigma_y']} (normalised units); smc and dps: N={cfg['particles']} particles, {cfg['steps']} steps; "
        f"{cfg['torch_threads']} torch threads; total {result['seconds']:.0f} s."
    )


def markdown(result: dict[str, Any]) -> str:
    """The run's tables: the seed summary (reporting) or the sweeps (tuning), then every run."""
    cfg = result["config"]
    lines = [_header(result), ""]
    if cfg["mode"] == "tune":
        lines += [
            "| kind | method | value | mean PSNR dB | mean SSIM | mean 90% coverage | chosen |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for kind, methods in result["tuned_now"].items():
            for method, e in methods.items():
                for s in e["scores"]:
                    lines.append(
                        f"| {kind} | {method} | {'default' if s['value'] is None else s['value']} "
                        f"| {_f(s['psnr_db'])} | {_f(s['ssim'], 3)} | {_f(s['coverage90'], 3)} "
                        f"| {'**' + json.dumps(e['params']) + '**' if s['value'] == e['best'] else ''} |"
                    )
        for kind, methods in result["tuned_now"].items():
            if "tv" in methods:
                c = methods["tv"]["convergence"]
                short, long = c["tv_iters"]
                verdict = (
                    f"converged, tv_iters {short}"
                    if methods["tv"]["params"]["tv_iters"] == short
                    else f"not converged: the {kind} tv rows above are the {long}-iteration sweep, tv_iters {long}"
                )
                lines.append(
                    f"\nTV on {kind} at {c['tv_multiple']:g} x lambda0: {short} / {long} iterations give "
                    f"{c['psnr_db'][0]:.3f} / {c['psnr_db'][1]:.3f} dB (mean); {verdict}."
                )
        return "\n".join(lines) + "\n"
    if cfg["mode"] == "report":
        lines.append(
            "Tuned values (imaging_tuned.json): "
            + "; ".join(
                f"{kind} {m} {json.dumps(p)}" for kind, ms in cfg["params"].items() for m, p in ms.items()
            )
            + "."
        )
    lines += [
        summary_markdown(result["summary"], len(cfg["seeds"])),
        "<details><summary>Every run</summary>",
        "",
    ]
    lines += [
        "| setting | seed | subject (part) | method | PSNR dB | SSIM | 90% coverage (predictive / quantile) "
        "| chi2 mean | chi2 particles | s/volume | min ESS | resamplings | min lambda |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in result["runs"]:
        for method, r in run["methods"].items():
            lines.append(
                f"| {run['setting']} | {run['seed']} | {run['subject'][:12]} ({run['split']}) | {method} "
                f"| {_f(r.get('psnr_db'))} | {_f(r.get('ssim'), 3)} | {_f(r.get('coverage90'), 3)} / "
                f"{_f(r.get('coverage90_quantile'), 3)} | {_f(r.get('chi2_mean'), 1)} | {_f(r.get('chi2_samples'), 2)} "
                f"| {_f(r.get('seconds'), 1)} | {_f(r.get('min_ess'), 2)} | {r.get('n_resamples', '-')} "
                f"| {_f(r.get('min_lambda'), 3)} |"
            )
    return "\n".join([*lines, "", "</details>"]) + "\n"


def picture(run: dict[str, Any], out_png: Path, scale: int = 4) -> Path:
    """Reference / direct baseline / smc mean / smc std / |error| mid-slices (rows: axial, coronal, sagittal)."""
    import nibabel as nib
    from PIL import Image, ImageDraw

    from medidiff.io.atomic import atomic_path
    from medidiff.viz import mid_slices

    base = Path(run["dir"])
    direct = "zero_filled" if run["kind"] == "mri" else "fbp"

    def load(p: Path) -> np.ndarray:
        return np.asarray(nib.as_closest_canonical(nib.load(str(p))).dataobj, dtype=np.float64)

    ref = load(base / "smc" / "reference.nii.gz")
    mean = load(base / "smc" / "mean.nii.gz")
    panels = [
        ("reference", ref),
        (direct.replace("_", "-"), load(base / direct / "mean.nii.gz")),
        ("smc mean", mean),
        ("smc std", std := load(base / "smc" / "std.nii.gz")),
        ("|mean - ref|", np.abs(mean - ref)),
    ]
    lo, hi = np.percentile(ref, (1.0, 99.0))
    hi_err = float(max(np.percentile(panels[3][1], 99.5), np.percentile(panels[4][1], 99.5), 1e-12))
    windows = [(lo, hi)] * 3 + [(0.0, hi_err)] * 2

    def to_u8(a: np.ndarray, w: tuple[float, float]) -> np.ndarray:
        x = (np.clip(a, w[0], w[1]) - w[0]) / max(w[1] - w[0], 1e-12)
        return (x * 255).round().astype(np.uint8)

    size = [s * scale for s in ref.shape]
    cell = max(size)
    label_w, head, pad = 70, 30, 4
    canvas = Image.new("L", (label_w + 5 * (cell + pad), head + 3 * (cell + pad) + 14), 0)
    draw = ImageDraw.Draw(canvas)
    for c, (name, _) in enumerate(panels):
        draw.text((label_w + c * (cell + pad) + 2, 2), name, fill=255)
    draw.text((label_w + 3 * (cell + pad) + 2, 14), f"max {std.max():.2g}", fill=200)
    draw.text((label_w + 4 * (cell + pad) + 2, 14), f"both 0..{hi_err:.3g}", fill=200)
    for r, view in enumerate(("axial R|L", "coronal R|L", "sagittal P|A")):
        y0 = head + r * (cell + pad)
        draw.text((2, y0 + cell // 2 - 6), view, fill=255)
        for c, ((_, arr), w) in enumerate(zip(panels, windows, strict=True)):
            sl = mid_slices(arr)[r]
            tile = Image.fromarray(to_u8(sl, w)).resize(
                (sl.shape[1] * scale, sl.shape[0] * scale), Image.NEAREST
            )
            canvas.paste(tile, (label_w + c * (cell + pad), y0))
    m = run["methods"]
    psnrs = " / ".join(f"{k} {v['psnr_db']:.1f}" for k, v in m.items() if v.get("psnr_db") is not None)
    caption = (
        f"{run['setting']} {run['subject']}: PSNR {psnrs} dB; smc 90% coverage {_f(m['smc']['coverage90'])}"
    )
    draw.text((2, head + 3 * (cell + pad)), caption, fill=255)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_png) as tmp:
        canvas.save(tmp, format="PNG")
    return out_png
