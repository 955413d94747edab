"""Combine the denoising benchmark's reporting outputs into benchmarks/shipped/demo-pixel-edm.json.

Run from the repository root after the commands of docs/benchmarks.md, "Denoising" (EDM's training noise
levels): bench_out/denoise_edm_gaussian.json and bench_out/denoise_edm_rician.json, measured on the float16
release medidiff/checkpoints/demo-pixel-edm. ``make checkpoints`` then cuts the same release again with
these figures (a half release of the same source writes the same bytes; the release refuses figures of
other weights).
"""

import json
from pathlib import Path

from _runs import training_seconds

from medidiff.train.checkpoint import load_checkpoint

release = load_checkpoint("medidiff/checkpoints/demo-pixel-edm/latent")
runs = [json.loads(Path(f"bench_out/denoise_edm_{m}.json").read_text()) for m in ("gaussian", "rician")]
# measured with the release itself (bench_denoise --checkpoint), whose hash its JSON records (its source's
# in runs made before float16 releases were told apart: the release's path says which weights ran)
ran = {(Path(r["checkpoint"]).resolve(), r["checkpoint_sha256"]) for r in runs}
ok = {release.weights_sha256, str(release.info["release"]["source_weights_sha256"])}
if any(path != release.path.parent.resolve() or sha not in ok for path, sha in ran):
    raise SystemExit("the reporting runs were not made on this release's weights; rerun them")
rows = [json.loads(line) for line in Path("runs/pixel_edm/latent/metrics.jsonl").read_text().splitlines()]
out: dict = {
    "weights_sha256": release.weights_sha256,
    "protocol": "docs/benchmarks.md, 'Denoising': the 2 reporting MR subjects of benchmarks/imaging_split.json, "
    "centred 32^3 blocks at 2 mm, seeds 0-2, 8 particles x 40 ancestral steps, the interval calibrated on the "
    "tuning subject; baselines tuned on the tuning subject",
}
for run in runs:
    for model, levels in run["summary"].items():
        for level, methods in levels.items():
            d, b = methods["diffusion"], methods["bm4d"]
            key = f"{model}_{level}"
            out[f"{key}_psnr_db"] = round(d["psnr_db"]["mean"], 2)
            out[f"{key}_minus_bm4d_db"] = round(d["psnr_db"]["mean"] - b["psnr_db"]["mean"], 2)
            out[f"{key}_coverage90"] = round(d["coverage90"]["mean"], 3)
            out[f"{key}_coverage90_uncalibrated"] = round(d["coverage90_uncalibrated"]["mean"], 3)
out["training"] = (
    f"{rows[-1]['step']} steps of 4 32^3 patches (2000, then a warm restart to 8000), {training_seconds(rows):.0f} s at 2 threads"
)
Path("benchmarks/shipped/demo-pixel-edm.json").write_text(json.dumps(out, indent=2) + "\n")
print(json.dumps(out, indent=1))
