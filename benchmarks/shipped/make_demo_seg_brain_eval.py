"""Write benchmarks/shipped/demo-seg-brain.json from the segmentation benchmark's reporting run.

Run from the repository root after the commands of docs/benchmarks.md, "Segmentation" (the scaled label
map): ``make_demo_seg_brain_eval.py bench_out/segment_b003_2steps.json bench_out/segment_b003.json``, the
reporting run of runs/seg_b003 (the source of the float16 release) at its shipped defaults, and a run of
the same command with the DynUNet baseline's rows (when the first has none).
``make checkpoints`` then cuts the release with these figures (a segmenter's release records them under
its source's weights hash, which it checks).
"""

import json
import sys
from pathlib import Path

src = Path(sys.argv[1] if len(sys.argv) > 1 else "bench_out/segment_b003_2steps.json")
run = json.loads(src.read_text())
rep = run["reporting"]
if "dynunet" not in rep:
    baseline = json.loads(
        Path(sys.argv[2] if len(sys.argv) > 2 else "bench_out/segment_b003.json").read_text()
    )
    rep = {**rep, "dynunet": baseline["reporting"]["dynunet"]}
(diff_key,) = [k for k in run["models"] if k.startswith("diffusion:")]
model = run["models"][diff_key]
summ, base = rep["diffusion"]["summary"], rep["dynunet"]["summary"]
structures = [k.split(".", 1)[1] for k in summ if k.startswith("dice.") and k != "dice.mean"]
out = {
    "weights_sha256": model["weights_sha256"],
    "benchmark": f"benchmarks/bench_segment.py --config {run['config']} --part reporting --steps {rep['steps']} "
    f"--eta {rep['eta']:g} --fuse {rep['fuse']} (docs/benchmarks.md, Segmentation)",
    "reporting_volumes": rep["names"],
    "samples": 4,
    "steps": rep["steps"],
    "eta": rep["eta"],
    "fuse": rep["fuse"],
    "training": f"{model['steps_trained']} steps, seed {model['train_seed']}, 1 thread",
    "dice": {
        **{s: round(summ[f"dice.{s}"]["mean"], 3) for s in structures},
        "mean": round(summ["dice.mean"]["mean"], 3),
    },
    "hd95_mm": {s: round(summ[f"hd95_mm.{s}"]["mean"], 2) for s in structures},
    "calibration_error": round(summ["calibration_error"]["mean"], 4),
    "error_auroc_in_head": round(summ["error_auroc_in_mask"]["mean"], 3),
    "dynunet_baseline_dice_mean": round(base["dice.mean"]["mean"], 3),
}
Path("benchmarks/shipped/demo-seg-brain.json").write_text(json.dumps(out, indent=1) + "\n")
print(json.dumps(out, indent=1))
