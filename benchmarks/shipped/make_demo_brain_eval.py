"""Combine the autoencoder and realism benchmark outputs into benchmarks/shipped/demo-brain.json.

Run from the repository root after the commands of docs/benchmarks.md, "Brain latent diffusion model"
(bench_out/brain_ae_e_5600.json and bench_out/realism/brain_ldm_e_5600.json), before ``make checkpoints``
cuts the release; the release refuses the file if its weights_sha256 is not the checkpoint's.
"""

import json
from pathlib import Path

from _runs import training_seconds

from medidiff.train.checkpoint import load_checkpoint

ae = json.loads(Path("bench_out/brain_ae_e_5600.json").read_text())
re = json.loads(Path("bench_out/realism/brain_ldm_e_5600.json").read_text())
ck = load_checkpoint("runs/brain_ldm_e/latent")
rows = [json.loads(line) for line in Path("runs/brain_ldm_e/latent/metrics.jsonl").read_text().splitlines()]
acc = re["report"]["acceptance"]
mem = acc["memorisation"]
out = {
    "weights_sha256": ck.weights_sha256,
    "protocol": "docs/benchmarks.md, 'Brain latent diffusion model (issue 15)': autoencoder on the 4 held-out "
    "brains (whole 64^3 grid at 3 mm); samples against the run's real training and held-out brains "
    "(benchmarks/bench_realism.py)",
    "autoencoder_psnr_db": {k: ae["psnr_db"][k] for k in ("mean", "std", "min", "max")},
    "autoencoder_psnr_foreground_db": {k: ae["psnr_foreground_db"][k] for k in ("mean", "std", "min", "max")},
    "autoencoder_ssim": {k: ae["ssim"][k] for k in ("mean", "std", "min", "max")},
    "autoencoder_compression": ae["compression_ratio"],
    "samples": re["report"]["inputs"]["n_synthetic"],
    "c2st_auc_seed0": acc["c2st_auc"]["value"],
    "c2st_auc_over_seeds": {k: re["c2st_auc_over_seeds"][k] for k in ("mean", "sd", "min", "max")}
    | {"std": re["c2st_auc_over_seeds"]["sd"]},
    "tissue_fraction_p_csf_gm_wm": [
        round(acc["tissue_fractions_in_range"]["p_values"][c], 4) for c in ("csf", "gm", "wm")
    ],
    "diversity_ratio": acc["diversity_ratio"]["value"],
    "memorisation_passed": mem["passed"],
    "realism_passed": re["report"]["passed"],
    "training": f"autoencoder 5600 steps, 6708 s at 1 thread; latent diffusion {rows[-1]['step']} steps of 2 whole brains, {training_seconds(rows):.0f} s at 2 threads",
}
Path("benchmarks/shipped/demo-brain.json").write_text(json.dumps(out, indent=2))
print(json.dumps(out, indent=1))
