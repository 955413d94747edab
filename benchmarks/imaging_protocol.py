"""The imaging benchmark's protocol: which volumes tune and which report, what was tuned, how seeds are summarised.

Used by :mod:`bench_imaging` (see its docstring for the procedure). Kept apart from the runner so the
rules can be tested without a reconstruction:

- :func:`load_split` / :func:`check_split` / :func:`part_volumes`: the fixed tuning / reporting split
  (``benchmarks/imaging_split.json``), refused when its parts overlap, when a subject is not in the
  manifest, or when one was in the prior's training split;
- :func:`checkpoint_sha256`: the hash that ties a tuned file and a report to one prior;
- :func:`tuning_summary` / :func:`write_tuned` / :func:`tuned_params`: the values chosen on the tuning
  part (best mean PSNR) and their refusal when read for another checkpoint or problem;
- :func:`aggregate` / :func:`summary_markdown`: per setting and method, the mean over volumes per seed,
  then mean, sample std, min and max over seeds; the same for paired differences (smc - TV, ...);
- :func:`estimate_seconds`: a CPU-time estimate printed before a run;
- :func:`emit_json`: a benchmark's result printed as JSON and, when asked, written (atomically) to a file.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SPLIT_FILE = ROOT / "benchmarks" / "imaging_split.json"
TUNED_FILE = ROOT / "benchmarks" / "imaging_tuned.json"
PARTS = ("tuning", "reporting")
MODALITY_OF_KIND = {"mri": "MR", "ct": "CT"}


def emit_json(result: Any, path: Path | None) -> None:
    """Print ``result`` as JSON on stdout; with ``path``, also write it there (atomically, parents made)."""
    from medidiff.io.atomic import atomic_write_json

    print(json.dumps(result, indent=2))
    if path is not None:
        atomic_write_json(path, result)


# Tuning grids. TV: multiples of the stage's default weight lambda0 = sigma_y ||A||, half a decade apart
# from 0.003 to 10 (on the tuning CT volume at 30 views the best weight was ~0.01 lambda0, 3.5 dB above
# lambda0: at a 32^3 patch, 30 views x 49 detectors over-determine each 32^2 slice). DPS: the guidance step
# zeta on ||y - A D(x)|| (medidiff.inverse.dps), half a decade apart from 0.01 to 30 (the 2000-step pixel
# prior's best: 10 at MRI 8x, 0.3 at CT 30, where 1 diverges; docs/benchmarks.md). smc: its top
# noise level sigma_max (normalised units; None = the stage's default, 3 / c for a pixel prior), the knob
# its defaults were once chosen by (best: 3 at MRI 8x, flat within 0.05 dB; 0.5 at CT 30).
TV_MULTIPLES = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
DPS_STEPS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
SMC_SIGMA_MAX: tuple[float | None, ...] = (0.25, 0.5, 1.0, 2.0, 3.0, None)
TV_ITERS = 300
TV_ITERS_CHECK = 3000
TV_CONVERGED_DB = 0.05
"""TV at the chosen weight is rerun with TV_ITERS_CHECK iterations; if the mean PSNR moves by more than
this, TV_ITERS had not converged and the grid is swept again with TV_ITERS_CHECK (on the tuning CT volume
at 30 views and 0.01 lambda0: 46.1 / 47.04 / 47.09 / 47.06 dB after 300 / 1000 / 3000 / 10000)."""
TUNED_METHODS = ("tv", "dps", "smc")
SUMMARY_METRICS = ("psnr_db", "ssim", "coverage90")
DIFFERENCES = (("smc", "tv"), ("smc", "dps"), ("smc", "zero_filled"), ("smc", "fbp"))
PROBLEM_KEYS = {
    "tv": ("sigma_y", "mask_kind"),
    "dps": ("sigma_y", "mask_kind", "steps"),
    "smc": ("sigma_y", "mask_kind", "steps", "smc_options"),
}
"""What a tuned value depends on: reporting refuses a tuned entry whose values of these differ."""


# -- split ----------------------------------------------------------------------------------------


def load_split(path: Path) -> dict[str, dict[str, list[str]]]:
    """The tuning / reporting split ``{part: {modality: [subject, ...]}}``; refuses overlapping parts."""
    if not path.is_file():
        raise SystemExit(
            f"imaging split file {path} does not exist (the repository ships benchmarks/imaging_split.json)."
        )
    raw = json.loads(path.read_text())
    split: dict[str, dict[str, list[str]]] = {}
    for part in PARTS:
        block = raw.get(part)
        if not isinstance(block, dict) or not block:
            raise SystemExit(
                f"{path}: part {part!r} is missing; it must map modalities (MR, CT) to subject lists."
            )
        split[part] = {str(m): [str(s) for s in subs] for m, subs in block.items()}
    seen: dict[str, str] = {}
    for part in PARTS:
        for subs in split[part].values():
            for s in subs:
                if s in seen and seen[s] != part:
                    raise SystemExit(
                        f"{path}: subject {s} is in both the tuning and the reporting part; a value tuned on a "
                        "volume must not be scored on it. Move it to one part."
                    )
                if s in seen:
                    raise SystemExit(f"{path}: subject {s} is listed twice in part {part!r}.")
                seen[s] = part
    return split


def training_subjects(split_json: Path) -> set[str]:
    """The subjects the prior was trained on (``train`` of the run's ``split.json``)."""
    if not split_json.is_file():
        raise SystemExit(
            f"the prior's training split {split_json} does not exist, so the benchmark volumes cannot be checked "
            "against it; pass --train-split <run folder>/split.json."
        )
    return set(json.loads(split_json.read_text())["train"])


def usable_volumes(manifest_dir: Path) -> list[dict[str, Any]]:
    """The manifest's intensity volumes at least 16 voxels along every axis.

    Smaller ones (the broken-on-purpose demo items: a few slices) would be padded to the patch by the
    stage and the metrics would be mostly padding.
    """
    path = manifest_dir / "manifest.json"
    if not path.is_file():
        raise SystemExit(f"{path} does not exist; build the demo cohort with `make demo`.")
    return [
        o
        for o in json.loads(path.read_text())["outputs"]
        if o.get("kind", "intensity") == "intensity" and min(o.get("shape", [0])) >= 16
    ]


def check_split(
    split: dict[str, dict[str, list[str]]], volumes: Sequence[dict[str, Any]], train: set[str]
) -> None:
    """Refuse a split with a subject the prior was trained on, or one without a usable volume of its modality."""
    for part in PARTS:
        for modality, subjects in split[part].items():
            for s in subjects:
                if s in train:
                    raise SystemExit(
                        f"subject {s} ({part} part, {modality}) is in the prior's training split: scoring or tuning "
                        "on it would measure memorisation. Use a subject from the run's val/test split."
                    )
                if not any(v.get("subject") == s and v.get("modality") == modality for v in volumes):
                    raise SystemExit(
                        f"subject {s} ({part} part) has no usable {modality} volume in the manifest. The split names "
                        "the demo cohort as `make demo` ingests it (fixed public hash key DEMO_HASH_KEY); an ingest "
                        "with another key gives other ids."
                    )


def part_volumes(
    split: dict[str, dict[str, list[str]]],
    part: str,
    volumes: Sequence[dict[str, Any]],
    manifest_dir: Path,
    modality: str,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """The ``modality`` volumes of ``part``'s subjects, in the split file's order (at most ``limit``)."""
    picked: list[dict[str, Any]] = []
    for s in split[part].get(modality, []):
        rows = sorted(
            (v for v in volumes if v.get("subject") == s and v.get("modality") == modality),
            key=lambda v: v["path"],
        )
        picked += [{**v, "split": part, "file": str(manifest_dir / v["path"])} for v in rows]
    return picked if limit is None else picked[:limit]


# -- checkpoint -------------------------------------------------------------------------------------


def checkpoint_sha256(ck: Path) -> str:
    """SHA-256 of the checkpoint's ``weights.safetensors`` (the network, its EMA and any autoencoder).

    The value the train stage recorded in ``checkpoint.json``; :func:`load_checkpoint` recomputes it from
    the file and refuses a mismatch, so it is the hash of the weights on disk. The optimizer file is left
    out: it plays no part in sampling. For an inference-only release (the shipped demo prior) it is the
    hash of the training checkpoint it was cut from: its sampling weights are the same tensors (a release
    stored in float16: its own hash).
    """
    from medidiff.train.checkpoint import load_checkpoint

    return load_checkpoint(ck, verify=True).trained_weights_sha256


# -- tuning -----------------------------------------------------------------------------------------


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return statistics.fmean(vals) if vals else None


def tuning_summary(runs: Sequence[dict[str, Any]], kind: str, method: str) -> dict[str, Any]:
    """Scores of every grid value of ``method`` over the tuning runs of ``kind``, and the best one.

    A value's score is its PSNR averaged over every run (settings, volumes, seeds) of that kind; a run
    whose PSNR is missing or not finite (a diverged sampler) counts as the worst. Ties go to the first
    value of the grid.
    """
    rows = [(run, r) for run in runs if run["kind"] == kind for r in run.get("sweeps", {}).get(method, [])]
    if not rows:
        raise ValueError(f"no {method} tuning runs for {kind}")
    values: list[Any] = []
    for _, r in rows:
        if r["value"] not in values:
            values.append(r["value"])
    scores = []
    for v in values:
        these = [(run, r) for run, r in rows if r["value"] == v]
        n_bad = sum(1 for _, r in these if r.get("psnr_db") is None or not math.isfinite(float(r["psnr_db"])))
        scores.append(
            {
                "value": v,
                "psnr_db": None if n_bad else _mean(r.get("psnr_db") for _, r in these),
                "ssim": _mean(r.get("ssim") for _, r in these),
                "coverage90": _mean(r.get("coverage90") for _, r in these),
                "runs": [
                    {
                        "setting": run["setting"],
                        "subject": run["subject"],
                        "seed": run["seed"],
                        "psnr_db": r.get("psnr_db"),
                        "ssim": r.get("ssim"),
                        "coverage90": r.get("coverage90"),
                        "resolved": r.get("resolved"),
                    }
                    for run, r in these
                ],
            }
        )
    best = max(
        range(len(scores)),
        key=lambda i: (-math.inf if scores[i]["psnr_db"] is None else scores[i]["psnr_db"], -i),
    )
    numeric = [s["value"] for s in scores if isinstance(s["value"], int | float)]
    bv = scores[best]["value"]
    edge = isinstance(bv, int | float) and len(numeric) > 2 and bv in (min(numeric), max(numeric))
    return {
        "best": bv,
        "grid": values,
        "scores": scores,
        "at_grid_edge": bool(edge),
        "settings": sorted({run["setting"] for run, _ in rows}),
        "subjects": sorted({run["subject"] for run, _ in rows}),
        "seeds": sorted({run["seed"] for run, _ in rows}),
    }


def read_tuned(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def write_tuned(path: Path, entries: dict[str, dict[str, Any]], header: dict[str, Any]) -> dict[str, Any]:
    """Write (or merge into) the tuned file: ``entries`` is ``{kind: {method: entry}}``.

    Entries of the same checkpoint already in the file are kept unless tuned again; a file for another
    checkpoint is replaced whole.
    """
    from medidiff.io.atomic import atomic_write_text

    old = read_tuned(path)
    tuned: dict[str, Any] = {}
    if old is not None and old.get("checkpoint_sha256") == header["checkpoint_sha256"]:
        tuned = old.get("tuned", {})
    for kind, methods in entries.items():
        tuned.setdefault(kind, {}).update(methods)
    doc = {
        "_comment": (
            "Values chosen by benchmarks/bench_imaging.py --part tuning --tune on the tuning part of "
            "benchmarks/imaging_split.json (best mean PSNR over its volumes, settings of that kind and seeds). "
            "--part reporting reads them and refuses them for another checkpoint (checkpoint_sha256) or another "
            "problem (each entry's 'problem'). TV's weight is tv_multiple x lambda0, lambda0 = sigma_y ||A|| (the "
            "stage's default, recomputed per measurement)."
        ),
        **header,
        "tuned": tuned,
    }
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")
    return doc


def tuned_params(
    tuned: dict[str, Any] | None,
    path: Path,
    sha256: str,
    kind: str,
    method: str,
    problem: dict[str, Any],
    reporting: set[str],
) -> dict[str, Any]:
    """The tuned reconstruction parameters of ``method`` for settings of ``kind``; refuses what does not apply."""
    how = f"run `python benchmarks/bench_imaging.py --part tuning --tune --settings <a {kind} setting> --methods {method}`"
    if tuned is None:
        raise SystemExit(
            f"{path} does not exist: the reporting part uses values tuned on the tuning part; {how} first."
        )
    if tuned.get("checkpoint_sha256") != sha256:
        raise SystemExit(
            f"{path} was tuned for checkpoint {tuned.get('checkpoint')} (weights sha256 "
            f"{str(tuned.get('checkpoint_sha256'))[:12]}...), not this one ({sha256[:12]}...); {how} again for it."
        )
    entry = tuned.get("tuned", {}).get(kind, {}).get(method)
    if entry is None:
        raise SystemExit(f"{path} holds no tuned {method} value for {kind} settings; {how}.")
    for key in PROBLEM_KEYS[method]:
        if entry["problem"].get(key) != problem.get(key):
            raise SystemExit(
                f"{path}: {method} on {kind} was tuned with {key}={entry['problem'].get(key)!r}, this run has "
                f"{problem.get(key)!r}; a tuned value holds for the problem it was tuned on. Use the same {key}, or {how}."
            )
    shared = sorted(set(entry.get("subjects", [])) & reporting)
    if shared:
        raise SystemExit(
            f"{path}: {method} on {kind} was tuned on {', '.join(shared)}, now in the reporting part of the split; "
            f"{how} on the current tuning part."
        )
    return dict(entry["params"])


# -- seeds ----------------------------------------------------------------------------------------


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value), min and max."""
    vals = [float(v) for v in values]
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
    }


def _per_seed(pairs: Iterable[tuple[int, float | None]]) -> dict[int, list[float]]:
    by: dict[int, list[float]] = {}
    for seed, v in pairs:
        if v is not None:
            by.setdefault(seed, []).append(float(v))
    return by


def _seed_stats(pairs: list[tuple[int, float | None]], n_vol: dict[int, int]) -> dict[str, Any] | None:
    """:func:`spread` over seeds of the per-seed means; seeds missing a volume's value are left out."""
    by = _per_seed(pairs)
    means = [statistics.fmean(v) for s, v in sorted(by.items()) if len(v) == n_vol[s]]
    return spread(means) if means else None


def aggregate(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per setting and method: the mean over volumes within each seed, then :func:`spread` over the seeds.

    The spread is therefore the seed-to-seed variation of the cohort mean (mask, noise and sampler
    draws), not the volume-to-volume one. Paired differences (``smc - tv``...) are taken per volume and
    seed before the same two steps. A seed whose volumes do not all have a value is left out of that
    figure (``n`` says how many seeds remain).
    """
    out: dict[str, Any] = {}
    for setting in dict.fromkeys(run["setting"] for run in runs):
        these = [run for run in runs if run["setting"] == setting]
        methods = list(dict.fromkeys(m for run in these for m in run["methods"]))
        n_vol = {run["seed"]: 0 for run in these}
        for run in these:
            n_vol[run["seed"]] += 1
        block: dict[str, Any] = {
            "volumes_per_seed": n_vol,
            "subjects": sorted({r["subject"] for r in these}),
            "methods": {},
            "differences": {},
        }

        for m in methods:
            rows = [(run["seed"], run["methods"][m]) for run in these if m in run["methods"]]
            block["methods"][m] = {
                k: st
                for k in SUMMARY_METRICS
                if (st := _seed_stats([(s, r.get(k)) for s, r in rows], n_vol)) is not None
            }
        for a, b in DIFFERENCES:
            name = f"{a} - {b}"
            for k in ("psnr_db", "ssim"):
                pairs = []
                for run in these:
                    ra, rb = run["methods"].get(a), run["methods"].get(b)
                    if ra is None or rb is None or ra.get(k) is None or rb.get(k) is None:
                        continue
                    pairs.append((run["seed"], float(ra[k]) - float(rb[k])))
                if (st := _seed_stats(pairs, n_vol)) is not None:
                    block["differences"].setdefault(name, {})[k] = st
        out[setting] = block
    return out


# -- cost -------------------------------------------------------------------------------------------

# Seconds per particle and volume on the project's 2-core CPU box (pixel prior, 32^3 patch, 30 levels),
# from the runs in docs/benchmarks.md: smc at N=32 ~2 min per MRI volume (4x and 8x alike), ~4.5 min at
# CT 30 views, ~6.5 min at CT 60 (linear in the views in between); dps at N=16 107-118 s per volume in
# every setting. Each call adds a few seconds (checkpoint load, files); TV and the direct baseline take
# about a second. Rough: a busy machine is slower.
_CALL_S = 3.0


def seconds_per_call(method: str, kind: str, level: int, particles: int, steps: int) -> float:
    """Estimated wall seconds of one ``reconstruct_volume`` call (see the constants above)."""
    if method in ("direct", "tv"):
        return _CALL_S
    if method == "dps":
        per = 7.0
    elif kind == "mri":
        per = 3.8
    else:  # smc / smc_spectral on CT: 8.4 s at 30 views, 12.2 s at 60
        per = 4.6 + 0.127 * level
    return _CALL_S + per * particles * steps / 30.0


def estimate_seconds(calls: Iterable[tuple[str, str, int]], particles: int, steps: int) -> dict[str, float]:
    """Total estimated seconds per method of ``(method, kind, level)`` calls."""
    out: dict[str, float] = {}
    for method, kind, level in calls:
        out[method] = out.get(method, 0.0) + seconds_per_call(method, kind, level, particles, steps)
    return out
