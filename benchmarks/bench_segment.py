"""Segmentation benchmark (issue 16, items 5-7): the conditional diffusion segmenter against MONAI
DynUNet (nnU-Net's architecture), trained on the same pairs, patches and wall-clock budget.

Procedure:

1. Data and split: ``configs/seg_brain.yaml`` (the demo drop's MR images and their CSF/GM/WM label maps).
   Its ``tuning`` names (never trained on) choose the diffusion segmenter's inference knob; its
   ``reporting`` names (never trained on, never tuned on) give every figure reported.
2. Models: two ``medidiff train-seg`` runs of that config, ``--arch diffusion`` and ``--arch dynunet``,
   each 1500 s of wall clock at 1 thread, side by side on the 2-core machine (1.76 M vs 1.36 M
   parameters). The commands are in docs/benchmarks.md.
3. Inference: the ``medidiff segment`` stage (``segment_volume``) on each whole volume at its own grid
   (windows of the training patch, 25% overlap, Gaussian blending), 1 thread. Diffusion: K samples of
   S DDIM steps with DDIM's eta and a step fusion (a sample's last step, or the mean of its steps); S,
   eta and the fusion chosen on the tuning part from ``--steps-grid`` x ``--eta-grid`` x ``--fuse-grid``
   (``--criterion``: best mean Dice over structures, or mean Dice + error AUROC in the head); its
   sampling seeds ``--seeds`` give the spread. DynUNet is deterministic: its spread is over its
   training runs (``--dynunet RUN [RUN ...]``).
4. Metrics on the input grid against the true label map (``medidiff.seg.metrics``): Dice and HD95 (mm)
   per structure, expected calibration error (MONAI, 20 bins), the AUROC of the uncertainty map
   (normalised predictive entropy) for misclassified voxels, over the whole volume and within the head
   (true labels dilated by 2 voxels: the background far from the head is trivially right), and seconds
   per volume (the stage's wall time, reading and writing included). Per method: mean over volumes
   within a seed, then mean / sample SD / min / max over seeds.

    python benchmarks/bench_segment.py --diffusion runs/seg_brain_diffusion/segmenter \\
        --dynunet runs/seg_brain_dynunet/segmenter --json bench_out/segment.json \\
        [--part tuning|reporting|both] [--seeds 0 1 2] [--samples 4] [--figure docs/img/segment_example.png]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STEPS_GRID = (1, 2, 4, 8)


def _load(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(path).dataobj)


def _head_mask(truth: np.ndarray) -> np.ndarray:
    from scipy.ndimage import binary_dilation

    return binary_dilation(truth > 0, iterations=2)


def score(ckpt: Path, name: str, data: Any, cfg: Any, *, seed: int, samples: int | None, steps: int | None,
          tmp: Path, eta: float | None = None, fuse: str | None = None,
          ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:  # fmt: skip
    """Segment one volume with the stage and score it; also returns the maps (for the figure)."""
    from medidiff.seg.metrics import segmentation_metrics
    from medidiff.stages.segment import segment_volume
    from medidiff.volume import spacing_from_affine

    image = data.images / f"{name}.nii.gz"
    t0 = time.perf_counter()
    res = segment_volume(
        image,
        tmp / f"{name}-{seed}",
        checkpoint=ckpt,
        seed=seed,
        samples=samples,
        steps=steps,
        eta=eta,
        fuse=fuse,
    )
    seconds = time.perf_counter() - t0
    import nibabel as nib

    lab_img = nib.load(res.files["labels"])
    labels = np.asarray(lab_img.dataobj).astype(np.int64)
    values = list(cfg.label_values)
    lut = np.zeros(256, np.int64)
    for i, v in enumerate(values):
        lut[v] = i
    pred = lut[labels]
    truth = lut[_load(data.labels / f"{name}.nii.gz").astype(np.int64)]
    probs = np.moveaxis(_load(res.files["probabilities"]), -1, 0)
    unc = _load(res.files["uncertainty"])
    m = segmentation_metrics(
        pred, truth, probs, unc, spacing=spacing_from_affine(lab_img.affine), names=[d.name for d in cfg.labels],
        mask=_head_mask(truth),
    )  # fmt: skip
    m["seconds"] = seconds
    m["samples"] = res.sidecar["samples"]
    m["steps"] = res.sidecar["steps"]
    m["eta"], m["fuse"] = res.sidecar["eta"], res.sidecar["fuse"]
    maps = {"image": _load(image), "truth": truth, "pred": pred, "uncertainty": unc, "affine": lab_img.affine}
    return m, maps


def _flat(m: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in m.items():
        if isinstance(v, dict):
            out.update({f"{k}.{n}": float(x) for n, x in v.items()})
        elif isinstance(v, int | float):
            out[k] = float(v)
    out["dice.mean"] = float(np.mean([v for k, v in out.items() if k.startswith("dice.")]))
    return out


def aggregate(per_seed: dict[int, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Mean over volumes within a seed, then mean / SD / min / max over seeds."""
    seed_means: dict[str, list[float]] = {}
    for rows in per_seed.values():
        flats = [_flat(r) for r in rows]
        for k in flats[0]:
            seed_means.setdefault(k, []).append(float(np.mean([f[k] for f in flats])))
    return {
        k: {"mean": statistics.fmean(v), "sd": statistics.stdev(v) if len(v) > 1 else 0.0, "min": min(v),
            "max": max(v), "n_seeds": len(v)}
        for k, v in seed_means.items()
    }  # fmt: skip


def markdown(report: dict[str, Any]) -> str:
    """The reporting summary as a Markdown table: mean +- SD over seeds (diffusion) or runs (DynUNet)."""
    keys = [k for k in next(iter(report.values()))["summary"] if k.startswith(("dice.", "hd95_mm."))]
    keys += ["calibration_error", "error_auroc_in_mask", "error_auroc", "seconds"]
    lines = ["| metric | " + " | ".join(report) + " |", "| --- |" + " --- |" * len(report)]
    for k in keys:
        cells = []
        for arch in report:
            e = report[arch]["summary"].get(k)
            cells.append(
                "-"
                if e is None
                else f"{e['mean']:.3f} +- {e['sd']:.3f}"
                if k != "seconds"
                else f"{e['mean']:.1f}"
            )
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(path: Path, maps: dict[str, dict[str, np.ndarray]]) -> None:
    """Rows image / truth / diffusion / DynUNet (labels 0-3) / uncertainty / diffusion errors, three planes
    each (medidiff.viz.montage, radiological orientation)."""
    from PIL import Image

    from medidiff.io.nifti_write import write_nifti
    from medidiff.viz import montage
    from medidiff.volume import Volume

    d, b = maps["diffusion"], maps["dynunet"]
    groups = [
        ([("image", d["image"])], None),
        ([("truth", d["truth"]), ("diffusion", d["pred"]), ("DynUNet", b["pred"])], (0.0, 3.0)),
        ([("uncertainty", d["uncertainty"])], (0.0, 1.0)),
        ([("diffusion errors", (d["pred"] != d["truth"]).astype(np.float32))], (0.0, 1.0)),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        parts = []
        for g, (rows, window) in enumerate(groups):
            paths = [write_nifti(Volume(np.asarray(a, np.float32), d["affine"], "MR"), Path(tmp) / f"{g}-{i}.nii.gz")
                     for i, (_, a) in enumerate(rows)]  # fmt: skip
            out = Path(tmp) / f"{g}.png"
            montage(paths, out, titles=[t for t, _ in rows], window=window)
            parts.append(Image.open(out))
        canvas = Image.new(parts[0].mode, (max(p.width for p in parts), sum(p.height for p in parts)))
        y = 0
        for p in parts:
            canvas.paste(p, (0, y))
            y += p.height
        path.parent.mkdir(parents=True, exist_ok=True)
        canvas.save(path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "seg_brain.yaml")
    p.add_argument("--diffusion", type=Path, required=True)
    p.add_argument("--dynunet", type=Path, nargs="+", required=True, help="one or more training runs (seeds)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--samples", type=int, default=None, help="K for the diffusion (default: the checkpoint's)"
    )
    p.add_argument("--steps-grid", type=int, nargs="+", default=list(STEPS_GRID))
    p.add_argument("--steps", type=int, default=None, help="skip tuning: use this many DDIM steps")
    p.add_argument("--eta-grid", type=float, nargs="+", default=[0.0], help="DDIM etas tried in tuning")
    p.add_argument("--fuse-grid", nargs="+", choices=["last", "steps"], default=["last"])
    p.add_argument("--eta", type=float, default=None, help="skip tuning: this eta (with --steps and --fuse)")
    p.add_argument("--fuse", choices=["last", "steps"], default=None)
    p.add_argument(
        "--criterion", choices=["dice", "dice+auroc"], default="dice",
        help="tuning picks the highest mean Dice, or mean Dice + error AUROC in the head",
    )  # fmt: skip
    p.add_argument("--part", choices=["tuning", "reporting", "both"], default="both")
    p.add_argument("--methods", nargs="+", choices=["diffusion", "dynunet"], default=["diffusion", "dynunet"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path)
    p.add_argument("--figure", type=Path)
    args = p.parse_args(argv)
    import torch

    from medidiff.stages.train_seg import load_seg_run_config
    from medidiff.train.checkpoint import load_checkpoint

    torch.set_num_threads(args.threads)
    data, _ = load_seg_run_config(args.config)
    cks = {"diffusion": load_checkpoint(args.diffusion, expect_stage="segmenter")}
    dyn_runs = [load_checkpoint(d, expect_stage="segmenter") for d in args.dynunet]
    cks["dynunet"] = dyn_runs[0]
    for arch, ck in [*cks.items(), *(("dynunet", d) for d in dyn_runs)]:
        if ck.config.arch != arch:
            raise SystemExit(f"--{arch} {ck.path} is a {ck.config.arch} segmenter")
        trained_on = set(json.loads((ck.path.parent.parent / "split.json").read_text())["train"])
        if trained_on & (set(data.tuning) | set(data.reporting)):
            raise SystemExit(
                f"{ck.path} was trained on held-out volumes {sorted(trained_on & set(data.reporting))}"
            )
    out: dict[str, Any] = {
        "config": str(args.config.relative_to(ROOT)) if args.config.is_relative_to(ROOT) else str(args.config),
        "threads": args.threads,
        "models": {f"{a}:{ck.path.parent.parent.name}": {"weights_sha256": ck.weights_sha256, "steps_trained": ck.step,
            "train_seed": ck.training_state.get("seed"), **{
            k: ck.metrics.get(k) for k in ("train_seconds", "parameters", "validation_dice")}}
            for a, ck in [("diffusion", cks["diffusion"]), *(("dynunet", d) for d in dyn_runs)]},
    }  # fmt: skip
    t0 = time.perf_counter()
    maps: dict[str, dict[str, np.ndarray]] = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        steps, eta, fuse = args.steps, args.eta, args.fuse
        if args.part in ("tuning", "both") and steps is None:
            tuning: dict[tuple[int, float, str], dict[str, float]] = {}
            for s in args.steps_grid:
                for e in args.eta_grid:
                    for f in args.fuse_grid:
                        rows = [score(args.diffusion, n, data, cks["diffusion"].config, seed=100,
                                      samples=args.samples, steps=s, eta=e, fuse=f, tmp=tmp)[0]
                                for n in data.tuning]  # fmt: skip
                        flat = [_flat(r) for r in rows]
                        tuning[s, e, f] = {k: float(np.mean([x[k] for x in flat]))
                                           for k in ("dice.mean", "error_auroc_in_mask")}  # fmt: skip
                        print(f"tuning: {s} steps, eta {e:g}, fuse {f} -> {tuning[s, e, f]}", file=sys.stderr)

            def merit(key: tuple[int, float, str]) -> float:
                m = tuning[key]
                return m["dice.mean"] + (m["error_auroc_in_mask"] if args.criterion == "dice+auroc" else 0.0)

            steps, eta, fuse = max(tuning, key=merit)
            out["tuning"] = {
                "names": list(data.tuning), "criterion": args.criterion,
                "grid": [{"steps": k[0], "eta": k[1], "fuse": k[2], **v} for k, v in tuning.items()],
                "chosen_steps": steps, "chosen_eta": eta, "chosen_fuse": fuse,
            }  # fmt: skip
        if args.part in ("reporting", "both"):
            report: dict[str, Any] = {}
            for arch in args.methods:
                per_seed: dict[int, list[dict[str, Any]]] = {}
                # diffusion: sampling seeds of one model; DynUNet (deterministic): its training runs
                runs = [(seed, cks["diffusion"]) for seed in args.seeds] if arch == "diffusion" else list(
                    enumerate(dyn_runs))  # fmt: skip
                for seed, ck in runs:
                    per_seed[seed] = []
                    for n in data.reporting:
                        m, mp = score(ck.path, n, data, ck.config, seed=seed,
                                      samples=args.samples if arch == "diffusion" else None,
                                      steps=steps if arch == "diffusion" else None, tmp=tmp,
                                      eta=eta if arch == "diffusion" else None,
                                      fuse=fuse if arch == "diffusion" else None)  # fmt: skip
                        per_seed[seed].append({"name": n, **m})
                        if n == data.reporting[0] and arch not in maps:
                            maps[arch] = mp
                        print(f"{arch} {'seed' if arch == 'diffusion' else 'run'} {seed} {n}: Dice {m['dice']} AUROC {m['error_auroc_in_mask']:.3f} "
                              f"{m['seconds']:.1f} s", file=sys.stderr)  # fmt: skip
                report[arch] = {
                    "per_seed": {str(k): v for k, v in per_seed.items()},
                    "summary": aggregate(per_seed),
                }
            out["reporting"] = {"names": list(data.reporting), "steps": steps, "eta": eta, "fuse": fuse, **report,
                                "markdown": markdown(report)}  # fmt: skip
            print(out["reporting"]["markdown"], file=sys.stderr)
    out["seconds"] = time.perf_counter() - t0
    text = json.dumps(out, indent=1, default=float)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    if args.part != "tuning" and args.figure and len(maps) == 2:
        figure(args.figure, maps)
    print(text)
    return out


if __name__ == "__main__":
    main()
