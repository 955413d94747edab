"""Realism of synthetic volumes against the real cohort (issue 15, item 3): C2ST, intensity histogram,
tissue fractions, MS-SSIM diversity and memorisation, from :func:`medidiff.diffusion.realism.realism_report`.

**Sets.** Three stacks of volumes of one modality (``--modality``, default MR):

- ``real_train`` / ``real_heldout``: from an ingest run (``--manifest DIR --split RUN/split.json``): the
  subjects of ``--train-splits`` (default ``train``) and of ``--heldout-splits`` (default ``val test``);
  or from folders of NIfTI files (``--real-train DIR --real-heldout DIR``).
- ``synthetic``: a folder of NIfTI files (``--synthetic DIR``, e.g. the output of ``medidiff synthesize``),
  or, as sanity checks on real data only, the volumes of some splits of the manifest
  (``--synthetic-splits val test``: real held-out volumes posing as samples), or half of the training
  split (``--halve-train``: its subjects ranked by SHA-256 of their id, every second one moved from
  ``real_train`` into ``synthetic``; real volumes the "model" never saw, as many as a C2ST needs).

**Grid.** Every volume goes through the training pipeline's deterministic steps,
:func:`medidiff.data.preprocess_transforms` (load, RAS, ``Spacingd`` to ``--spacing`` mm, normalisation
by modality with :func:`medidiff.transforms.normalize`, padding with the volume's minimum up to
``--grid``), then MONAI's ``CenterSpatialCrop`` to exactly ``--grid`` (default 64^3 voxels of 3 mm). A NIfTI
file is taken as already normalised, and not normalised again, when its JSON sidecar says so (``medidiff
synthesize`` writes MR samples in normalised [0, 1] units, ``"intensity": {"denormalized": false}``);
``--assume-normalized yes/no`` overrides that for every folder volume.

**Output.** JSON on stdout (``--json OUT`` writes it too): the inputs (subjects or file names, grid),
the report (definitions in :mod:`medidiff.diffusion.realism`), and the C2ST AUC over ``--seeds`` (each
seed a fresh split, initialisation and batch order; the report itself uses the first seed) so the spread
of that small-sample statistic is visible. ``--diversity-spread K`` adds the same yardstick for the diversity
ratio: its spread between random halves of the real volumes alone (train and held-out pooled).

Run (sanity checks on the demo brains, no model involved, 1-2 min each on one core; the figures are in
docs/benchmarks.md, "Realism metrics (issue 15)")::

    .venv/bin/python benchmarks/bench_realism.py --manifest demo_out/ingested --split runs/pixel/split.json \\
        --halve-train --seeds 0 1 2 3 4 5 6 7 8 9 --diversity-spread 1000 \\
        --json bench_out/realism/sanity_halves.json

and on samples: ``--synthetic SYNTH_DIR`` in place of ``--halve-train``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medidiff.data import DataConfig, preprocess_transforms, read_manifest, read_splits, select_entries  # noqa: E402
from medidiff.diffusion import realism  # noqa: E402
from medidiff.transforms import NoNormalization, NormalizationConfig  # noqa: E402

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _config(
    manifest: Path,
    modality: str,
    grid: tuple[int, int, int],
    spacing: tuple[float, float, float],
    *,
    normalize: bool,
) -> DataConfig:
    norm = (
        NormalizationConfig() if normalize else NormalizationConfig(by_modality={modality: NoNormalization()})
    )
    return DataConfig(
        manifest=manifest,
        modalities=(modality,),
        target_spacing=spacing,
        patch_size=grid,
        normalization=norm,
        verify_hashes=True,
    )


def load_stack(items: list[dict[str, Any]], cfg_norm: DataConfig, cfg_raw: DataConfig) -> torch.Tensor:
    """``(N, *grid)`` float32: each item ``{"path", "modality", "normalized"}`` through the pipeline's
    deterministic steps (``cfg_raw``, no normalisation, for items already normalised), centre-cropped."""
    from monai.transforms import CenterSpatialCrop, Compose

    chains = {False: Compose(preprocess_transforms(cfg_norm)), True: Compose(preprocess_transforms(cfg_raw))}
    crop = CenterSpatialCrop(cfg_norm.roi_size)
    out = []
    for it in items:
        d = chains[it["normalized"]]({"image": str(it["path"]), "modality": it["modality"]})
        out.append(torch.as_tensor(crop(d["image"]))[0])
    return torch.stack(out)


def manifest_items(
    manifest: Path, split_file: Path, splits: list[str], cfg: DataConfig
) -> list[dict[str, Any]]:
    """The volumes of ``cfg.modalities`` whose subjects are in ``splits``, ordered by (subject, path)."""
    entries = read_manifest(manifest, verify=cfg.verify_hashes)
    selected = select_entries(cfg, entries)
    split = read_splits(split_file)
    items = []
    for name in splits:
        for e in split.select(selected, name):  # type: ignore[arg-type]
            items.append(
                {
                    "path": e.path,
                    "modality": e.modality,
                    "normalized": False,
                    "subject": e.subject,
                    "id": f"{name}/{e.relpath}",
                }
            )
    if not items:
        raise SystemExit(f"no {list(cfg.modalities)} volume in splits {splits} of {split_file}")
    return items


def folder_items(folder: Path, modality: str, assume: str) -> list[dict[str, Any]]:
    """The NIfTI files in ``folder`` (sorted); ``normalized`` from the sidecar unless ``assume`` says."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))
    if not files:
        raise SystemExit(f"no NIfTI file (*.nii, *.nii.gz) in {folder}")
    items = []
    for p in files:
        stem = p.name[: -len(".nii.gz")] if p.name.endswith(".nii.gz") else p.name[: -len(".nii")]
        side_path = p.with_name(stem + ".json")
        side = json.loads(side_path.read_text()) if side_path.is_file() else {}
        if assume == "auto":
            normalized = side.get("intensity", {}).get("denormalized") is False
        else:
            normalized = assume == "yes"
        mod = str(side.get("modality", modality)).upper()
        if mod != modality:
            raise SystemExit(f"{p} is {mod} by its sidecar, but --modality is {modality}")
        items.append({"path": p, "modality": modality, "normalized": normalized, "id": p.name})
    return items


def spread(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
    }


def diversity_spread(real: torch.Tensor, k: int, *, data_range: list[float], seed: int) -> dict[str, Any]:
    """How far the diversity ratio strays between two halves of the real volumes alone.

    The MS-SSIM of every pair of ``real`` once (report settings), then ``k`` random halvings (from
    ``torch.Generator().manual_seed(seed)``): diversity of one half over that of the other. Where the
    cohort is small, a 0.8 floor sits inside this real-vs-real spread.
    """
    n = real.shape[0]
    settings = realism.msssim_settings_for(tuple(real.shape[1:]))
    pairs = torch.combinations(torch.arange(n), r=2)
    vals = realism.pairwise_msssim(real, pairs, settings=settings, data_range=data_range[1] - data_range[0])
    sim = torch.eye(n, dtype=torch.float64)
    sim[pairs[:, 0], pairs[:, 1]] = vals
    sim[pairs[:, 1], pairs[:, 0]] = vals

    def diversity(idx: torch.Tensor) -> float:
        block = sim[idx][:, idx]
        return 1.0 - float((block.sum() - len(idx)) / (len(idx) * (len(idx) - 1)))

    g = torch.Generator().manual_seed(seed)
    ratios = []
    for _ in range(k):
        perm = torch.randperm(n, generator=g)
        ratios.append(diversity(perm[n // 2 :]) / diversity(perm[: n // 2]))
    q = torch.quantile(
        torch.tensor(ratios, dtype=torch.float64), torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)
    )
    return {
        "n_real": n,
        "halvings": k,
        "diversity_all_real": diversity(torch.arange(n)),
        **spread(ratios),
        "quantiles_5_50_95": [float(x) for x in q],
        "share_below_floor": sum(r < realism.DIVERSITY_RATIO_MIN for r in ratios) / k,
    }


def write_montage(
    stacks: dict[str, torch.Tensor], spacing: tuple[float, float, float], out: Path, rows: int
) -> Path:
    """Real held-out volumes above synthetic ones, on the grid the metrics compare (one window: [0, 1])."""
    import tempfile

    import nibabel as nib
    import numpy as np

    from medidiff.viz import montage

    affine = np.diag([*spacing, 1.0])
    paths, titles = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, label in (("real_heldout", "real held-out"), ("synthetic", "synthetic")):
            for i, vol in enumerate(stacks[name][:rows]):
                path = Path(tmp) / f"{name}_{i}.nii.gz"
                nib.save(nib.Nifti1Image(vol.numpy().astype(np.float32), affine), str(path))
                paths.append(path)
                titles.append(f"{label} {i + 1}")
        out.parent.mkdir(parents=True, exist_ok=True)
        return montage(paths, out, titles=titles, scale=2, window=(0.0, 1.0))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", type=Path, help="ingest output folder (with --split)")
    ap.add_argument("--split", type=Path, help="the training run's split.json")
    ap.add_argument("--train-splits", nargs="+", default=["train"])
    ap.add_argument("--heldout-splits", nargs="+", default=["val", "test"])
    ap.add_argument(
        "--synthetic-splits", nargs="+", help="sanity check: real volumes of these splits as the samples"
    )
    ap.add_argument(
        "--halve-train", action="store_true", help="sanity check: half the train subjects as samples"
    )
    ap.add_argument("--real-train", type=Path, help="folder of NIfTI files (instead of --manifest)")
    ap.add_argument("--real-heldout", type=Path, help="folder of NIfTI files (instead of --manifest)")
    ap.add_argument("--synthetic", type=Path, help="folder of NIfTI samples")
    ap.add_argument(
        "--assume-normalized", choices=("auto", "yes", "no"), default="auto", help="folder volumes"
    )
    ap.add_argument("--modality", default="MR")
    ap.add_argument("--grid", type=int, nargs=3, default=[64, 64, 64])
    ap.add_argument("--spacing", type=float, nargs=3, default=[3.0, 3.0, 3.0], help="mm")
    ap.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="C2ST seeds; the first drives the report"
    )
    ap.add_argument("--max-pairs", type=int, default=realism.MSSSIM_MAX_PAIRS, help="MS-SSIM pairs per set")
    ap.add_argument(
        "--diversity-spread",
        type=int,
        default=0,
        metavar="K",
        help="also: the real-vs-real diversity ratio over K random halvings of all real volumes",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the JSON here")
    ap.add_argument(
        "--montage",
        type=Path,
        help="also write a PNG: the first --montage-rows held-out real volumes above as many samples, "
        "axial / coronal / sagittal mid-slices on the compared grid",
    )
    ap.add_argument("--montage-rows", type=int, default=4)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    modality = args.modality.strip().upper()
    grid, spacing = tuple(args.grid), tuple(args.spacing)

    from_manifest = args.manifest is not None
    if from_manifest == (args.real_train is not None or args.real_heldout is not None):
        ap.error("give either --manifest and --split, or --real-train and --real-heldout")
    if (
        sum(
            x is not None and x is not False
            for x in (args.synthetic, args.synthetic_splits, args.halve_train)
        )
        != 1
    ):
        ap.error("give one of --synthetic DIR, --synthetic-splits or --halve-train")
    if from_manifest and args.split is None:
        ap.error("--manifest needs --split (the training run's split.json)")
    if (args.synthetic_splits is not None or args.halve_train) and not from_manifest:
        ap.error("--synthetic-splits and --halve-train need --manifest and --split")
    base = args.manifest if from_manifest else args.real_train
    cfg_norm = _config(base, modality, grid, spacing, normalize=True)
    cfg_raw = _config(base, modality, grid, spacing, normalize=False)

    t0 = time.perf_counter()
    if from_manifest:
        sets = {
            "real_train": manifest_items(args.manifest, args.split, args.train_splits, cfg_norm),
            "real_heldout": manifest_items(args.manifest, args.split, args.heldout_splits, cfg_norm),
        }
    else:
        if args.real_train is None or args.real_heldout is None:
            ap.error("folder mode needs both --real-train and --real-heldout")
        sets = {
            "real_train": folder_items(args.real_train, modality, args.assume_normalized),
            "real_heldout": folder_items(args.real_heldout, modality, args.assume_normalized),
        }
    if args.synthetic_splits is not None:
        sets["synthetic"] = manifest_items(args.manifest, args.split, args.synthetic_splits, cfg_norm)
    elif args.halve_train:
        subjects = sorted(
            {it["subject"] for it in sets["real_train"]}, key=lambda s: hashlib.sha256(s.encode()).hexdigest()
        )
        moved = set(subjects[1::2])
        sets["synthetic"] = [it for it in sets["real_train"] if it["subject"] in moved]
        sets["real_train"] = [it for it in sets["real_train"] if it["subject"] not in moved]
    else:
        sets["synthetic"] = folder_items(args.synthetic, modality, args.assume_normalized)
    stacks = {name: load_stack(items, cfg_norm, cfg_raw) for name, items in sets.items()}
    t_load = time.perf_counter() - t0
    print(
        f"[bench_realism] loaded {', '.join(f'{k} {len(v)}' for k, v in stacks.items())} in {t_load:.1f} s",
        file=sys.stderr,
        flush=True,
    )

    report = realism.realism_report(
        stacks["real_train"], stacks["real_heldout"], stacks["synthetic"],
        generator=torch.Generator().manual_seed(args.seeds[0]), max_pairs=args.max_pairs,
    )  # fmt: skip
    t_report = time.perf_counter() - t0 - t_load
    per_seed = [report["c2st"]["auc"]]
    for seed in args.seeds[1:]:
        res = realism.c2st(
            stacks["real_train"], stacks["synthetic"], generator=torch.Generator().manual_seed(seed)
        )
        per_seed.append(res.auc)
    if args.diversity_spread:
        real_all = torch.cat([stacks["real_train"], stacks["real_heldout"]])
        spread_real = diversity_spread(
            real_all,
            args.diversity_spread,
            data_range=report["inputs"]["intensity_range_train"],
            seed=args.seeds[0],
        )
    result = {
        "benchmark": "realism",
        "config": {
            "command": " ".join(
                ["python", "benchmarks/bench_realism.py", *(argv if argv is not None else sys.argv[1:])]
            ),
            "modality": modality,
            "grid": list(grid),
            "spacing_mm": list(spacing),
            "seeds": args.seeds,
            "threads": args.threads,
            "machine": platform.machine(),
            "torch": torch.__version__,
        },
        "inputs": {name: [it["id"] for it in items] for name, items in sets.items()},
        "normalized_as_given": {name: sum(it["normalized"] for it in items) for name, items in sets.items()},
        "report": report,
        "c2st_auc_over_seeds": {**spread(per_seed), "values": per_seed},
        "real_diversity_ratio_over_halvings": spread_real if args.diversity_spread else None,
        "seconds": {
            "load": round(t_load, 1),
            "report": round(t_report, 1),
            "total": round(time.perf_counter() - t0, 1),
        },
    }
    if args.montage is not None:
        result["montage"] = str(write_montage(stacks, spacing, args.montage, args.montage_rows))
    text = json.dumps(result, indent=1)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
