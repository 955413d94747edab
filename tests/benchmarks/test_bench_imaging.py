"""The imaging benchmark's rules (its figures are in docs/benchmarks.md): argument checks, the fixed
tuning / reporting split, the tuned-values file and its checkpoint hash, the summary over seeds, and one
tiny tune-then-report run end to end."""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))  # benchmarks/ is not a package

import bench_imaging  # noqa: E402
import imaging_protocol as protocol  # noqa: E402


def test_a_picture_without_the_direct_baseline_is_refused_before_any_reconstruction(tmp_path: Path) -> None:
    work = tmp_path / "work"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_imaging.py"), "--checkpoint", str(tmp_path / "none"),
           "--settings", "ct:30", "--methods", "smc", "--workdir", str(work)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "--pictures ct:30 needs --methods direct and smc" in out.stderr
    assert not work.exists()  # nothing ran
    # without a picture the same call goes on to the checkpoint, which is missing here
    out = subprocess.run([*cmd, "--pictures"], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "needs --methods" not in out.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tune"], "--tune sweeps on the tuning part only"),
        (["--part", "tuning", "--tune", "--untuned"], "exclude each other"),
        (["--sigma-max", "2"], "reporting uses the tuned values"),
        (["--dps-step", "0.1"], "--dps-step applies with --untuned only"),
        (
            ["--part", "tuning", "--tune", "--methods", "direct", "smc_spectral"],
            "smc_spectral has no tuning sweep",
        ),
        (["--seed", "1", "--seeds", "0", "1"], "not both"),
        (["--seeds", "0", "0"], "repeats a seed"),
        (["--settings", "pet:3"], "kind mri or ct"),
    ],
)
def test_contradictory_flags_are_refused(extra: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        bench_imaging.parse_args(["--pictures", *extra])


# -- the split --------------------------------------------------------------------------------------

MANIFEST = [("sub-tm", "MR"), ("sub-tc", "CT"), ("sub-rm1", "MR"), ("sub-rm2", "MR"), ("sub-rc", "CT"),
            ("sub-train", "MR")]  # fmt: skip
GOOD = {"tuning": {"MR": ["sub-tm"], "CT": ["sub-tc"]},
        "reporting": {"MR": ["sub-rm1", "sub-rm2"], "CT": ["sub-rc"]}}  # fmt: skip


def _cohort(root: Path, split: dict[str, Any], write_images: bool = False) -> dict[str, Path]:
    """A manifest (optionally with its volumes), a benchmark split, and a run folder with a training split."""
    man = root / "manifest"
    outputs = []
    for i, (sub, mod) in enumerate(MANIFEST):
        rel = f"{sub}/0001_{mod}.nii.gz"
        outputs.append(
            {"subject": sub, "modality": mod, "kind": "intensity", "shape": [20, 20, 18], "path": rel}
        )
        if write_images:
            from medidiff.io.nifti_write import write_nifti
            from medidiff.volume import Volume

            ii, jj, kk = np.meshgrid(*[np.linspace(-1, 1, n) for n in (20, 20, 18)], indexing="ij")
            blob = np.exp(-((ii - 0.1 * i) ** 2 + jj**2 + kk**2) / 0.3)
            arr = 100 + 400 * blob if mod == "MR" else -1000 + 1100 * (blob > 0.3) + 200 * blob
            rng = np.random.default_rng(i)
            write_nifti(Volume((arr + rng.standard_normal(arr.shape)).astype(np.float32),
                               np.diag([2.0, 2.0, 2.0, 1.0]), modality=mod), man / rel)  # fmt: skip
    # a 3-slice volume (the demo's broken-on-purpose items) is never picked
    outputs.append(
        {"subject": "sub-rm1", "modality": "MR", "kind": "intensity", "shape": [20, 20, 3], "path": "x"}
    )
    man.mkdir(parents=True, exist_ok=True)
    (man / "manifest.json").write_text(json.dumps({"outputs": outputs}))
    (root / "split.json").write_text(json.dumps(split))
    (root / "run" / "latent").mkdir(parents=True, exist_ok=True)
    (root / "run" / "split.json").write_text(
        json.dumps({"train": ["sub-train"], "val": ["sub-tm"], "test": []})
    )
    return {"manifest": man, "split": root / "split.json", "train": root / "run" / "split.json"}


def test_the_shipped_split_has_disjoint_parts_of_both_modalities() -> None:
    split = protocol.load_split(protocol.SPLIT_FILE)
    tuning = {s for subs in split["tuning"].values() for s in subs}
    reporting = {s for subs in split["reporting"].values() for s in subs}
    assert not tuning & reporting
    assert {len(split["tuning"][m]) for m in ("MR", "CT")} == {1}
    assert {len(split["reporting"][m]) for m in ("MR", "CT")} == {2}


def test_a_good_split_gives_each_part_its_own_volumes(tmp_path: Path) -> None:
    f = _cohort(tmp_path, GOOD)
    split = protocol.load_split(f["split"])
    usable = protocol.usable_volumes(f["manifest"])
    protocol.check_split(split, usable, protocol.training_subjects(f["train"]))  # no refusal
    mr = protocol.part_volumes(split, "reporting", usable, f["manifest"], "MR")
    assert [v["subject"] for v in mr] == ["sub-rm1", "sub-rm2"]  # the 3-slice volume is left out
    assert all(v["split"] == "reporting" and v["file"].startswith(str(f["manifest"])) for v in mr)
    assert [v["subject"] for v in protocol.part_volumes(split, "tuning", usable, f["manifest"], "CT")] == [
        "sub-tc"
    ]
    assert len(protocol.part_volumes(split, "reporting", usable, f["manifest"], "MR", limit=1)) == 1


@pytest.mark.parametrize(
    ("split", "message"),
    [
        (
            {**GOOD, "tuning": {"MR": ["sub-rm1"], "CT": ["sub-tc"]}},
            "in both the tuning and the reporting part",
        ),
        ({**GOOD, "tuning": {"MR": ["sub-tm", "sub-tm"], "CT": ["sub-tc"]}}, "listed twice"),
        (
            {**GOOD, "reporting": {"MR": ["sub-rm1", "sub-train"], "CT": ["sub-rc"]}},
            "in the prior's training split",
        ),
        ({**GOOD, "reporting": {"MR": ["sub-rm1", "sub-gone"], "CT": ["sub-rc"]}}, "has no usable MR volume"),
        ({**GOOD, "tuning": {"MR": ["sub-tm"], "CT": ["sub-rm2"]}}, "in both"),
        ({**GOOD, "tuning": {"MR": ["sub-tm"], "CT": ["sub-tm"]}}, "listed twice"),
        ({"tuning": GOOD["tuning"], "reporting": {"MR": ["sub-rm1"], "CT": ["sub-tm"]}}, "in both"),
        ({**GOOD, "tuning": {"MR": ["sub-tm"], "CT": ["sub-rm1x"]}}, "has no usable CT volume"),
        ({"reporting": GOOD["reporting"]}, "part 'tuning' is missing"),
    ],
)
def test_a_bad_split_is_refused_before_any_reconstruction(tmp_path: Path, split: dict, message: str) -> None:
    f = _cohort(tmp_path, split)
    ck = tmp_path / "run" / "latent" / "ckpt-00000001"  # the train stage's layout: run/latent/ckpt-*
    ck.mkdir()
    (ck / "checkpoint.json").write_text("{}")  # enough for resolve_checkpoint; the split check comes first
    work = tmp_path / "work"
    argv = ["--checkpoint", str(ck), "--manifest", str(f["manifest"]),
            "--split-file", str(f["split"]), "--workdir", str(work), "--settings", "mri:8", "--pictures"]  # fmt: skip
    with pytest.raises(SystemExit, match=message):
        bench_imaging.main(argv)
    assert not work.exists()


def test_a_subject_listed_under_the_wrong_modality_is_refused(tmp_path: Path) -> None:
    f = _cohort(tmp_path, {**GOOD, "tuning": {"MR": ["sub-tc"], "CT": ["sub-tm"]}})
    split = protocol.load_split(f["split"])
    with pytest.raises(SystemExit, match=r"sub-tc .*has no usable MR volume"):
        protocol.check_split(split, protocol.usable_volumes(f["manifest"]), set())


# -- the tuned file --------------------------------------------------------------------------------

PROBLEM = {"sigma_y": 0.01, "mask_kind": "equispaced", "steps": 30, "particles": 32, "smc_options": None}


def _entry(params: dict[str, Any], subjects: list[str], **problem: Any) -> dict[str, Any]:
    return {"params": params, "subjects": subjects, "problem": {**PROBLEM, **problem}}


def test_tuned_values_are_refused_for_another_checkpoint_or_problem(tmp_path: Path) -> None:
    path = tmp_path / "tuned.json"
    header = {"checkpoint": "runs/x", "checkpoint_sha256": "a" * 64, "checkpoint_step": 4000}
    entries = {"mri": {"tv": _entry({"tv_multiple": 0.3, "tv_iters": 300}, ["sub-tm"], steps=10),
                       "dps": _entry({"step_size": 0.1, "sigma_max": None}, ["sub-tm"]),
                       "smc": _entry({"sigma_max": 2.0}, ["sub-tm"])}}  # fmt: skip
    protocol.write_tuned(path, entries, header)
    tuned = protocol.read_tuned(path)
    reporting = {"sub-rm1"}
    problem = {k: PROBLEM[k] for k in ("sigma_y", "mask_kind", "steps", "smc_options")}

    def get(method: str, kind: str = "mri", sha: str = "a" * 64, tuned=tuned, **over: Any) -> dict[str, Any]:
        return protocol.tuned_params(tuned, path, sha, kind, method, {**problem, **over}, reporting)

    assert get("tv") == {"tv_multiple": 0.3, "tv_iters": 300}  # TV does not depend on the step count
    assert get("dps") == {"step_size": 0.1, "sigma_max": None}
    with pytest.raises(SystemExit, match="does not exist"):
        get("smc", tuned=None)
    with pytest.raises(SystemExit, match=r"was tuned for checkpoint runs/x .*not this one"):
        get("smc", sha="b" * 64)
    with pytest.raises(SystemExit, match="no tuned smc value for ct"):
        get("smc", kind="ct")
    with pytest.raises(SystemExit, match="steps=30, this run has 10"):
        get("dps", steps=10)
    with pytest.raises(SystemExit, match="smc_options"):
        get("smc", smc_options={"final": "denoise"})
    with pytest.raises(SystemExit, match="sigma_y"):
        get("tv", sigma_y=0.02)
    with pytest.raises(SystemExit, match="tuned on sub-tm, now in the reporting part"):
        protocol.tuned_params(tuned, path, "a" * 64, "mri", "smc", problem, {"sub-tm"})
    # tuning CT later merges into the same checkpoint's file; a new checkpoint replaces it whole
    protocol.write_tuned(path, {"ct": {"smc": _entry({"sigma_max": 1.0}, ["sub-tc"])}}, header)
    assert get("smc", tuned=protocol.read_tuned(path)) == {"sigma_max": 2.0}
    assert get("smc", kind="ct", tuned=protocol.read_tuned(path)) == {"sigma_max": 1.0}
    protocol.write_tuned(path, {"ct": {"smc": _entry({"sigma_max": 3.0}, ["sub-tc"])}},
                         {**header, "checkpoint_sha256": "c" * 64})  # fmt: skip
    assert set(protocol.read_tuned(path)["tuned"]) == {"ct"}


def test_the_best_grid_value_is_the_highest_mean_psnr_and_a_diverged_run_loses() -> None:
    def run(kind: str, seed: int, subject: str, psnrs: dict[Any, float | None]) -> dict[str, Any]:
        rows = [{"value": v, "psnr_db": p, "ssim": 0.5} for v, p in psnrs.items()]
        return {
            "kind": kind,
            "setting": f"{kind}:8",
            "seed": seed,
            "subject": subject,
            "sweeps": {"smc": rows},
        }

    runs = [run("mri", 0, "a", {1.0: 20.0, 2.0: 21.0, None: 30.0}), run("mri", 1, "a", {1.0: 23.0, 2.0: 21.5, None: None}),
            run("ct", 0, "c", {1.0: 40.0, 2.0: 40.0, None: 39.0})]  # fmt: skip
    s = protocol.tuning_summary(runs, "mri", "smc")
    assert [x["psnr_db"] for x in s["scores"]] == [21.5, 21.25, None]  # 'default' diverged once: no score
    assert s["best"] == 1.0 and s["grid"] == [1.0, 2.0, None] and s["at_grid_edge"] is False
    assert protocol.tuning_summary(runs, "ct", "smc")["best"] == 1.0  # a tie goes to the first grid value


# -- the summary over seeds ------------------------------------------------------------------------


def _runs() -> list[dict[str, Any]]:
    """MRI 8x, two volumes, three seeds; PSNR per (seed, volume) for smc and tv, coverage for smc only."""
    smc = {0: (20.0, 22.0), 1: (23.0, 23.0), 2: (19.0, 21.0)}
    tv = {0: (21.0, 21.0), 1: (22.0, 20.0), 2: (21.0, 23.0)}
    runs = []
    for seed in (0, 1, 2):
        for i, sub in enumerate(("a", "b")):
            runs.append({"setting": "mri:8", "seed": seed, "subject": sub, "methods": {
                "smc": {"psnr_db": smc[seed][i], "ssim": 0.5 + 0.1 * i, "coverage90": 0.8 + 0.05 * seed},
                "tv": {"psnr_db": tv[seed][i], "ssim": 0.6, "coverage90": None}}})  # fmt: skip
    return runs


def test_seed_summary_is_the_spread_of_per_seed_volume_means() -> None:
    out = protocol.aggregate(_runs())["mri:8"]
    smc = out["methods"]["smc"]["psnr_db"]  # per-seed means 21, 23, 20
    assert smc["mean"] == pytest.approx(64 / 3)
    assert smc["std"] == pytest.approx(math.sqrt(7 / 3))  # sample std: squares 1/9 + 25/9 + 16/9 over 2
    assert (smc["min"], smc["max"], smc["n"]) == (20.0, 23.0, 3)
    tv = out["methods"]["tv"]["psnr_db"]  # 21, 21, 22
    assert (tv["mean"], tv["std"]) == (pytest.approx(64 / 3), pytest.approx(math.sqrt(1 / 3)))
    assert "coverage90" not in out["methods"]["tv"]  # no value, no figure
    assert out["methods"]["smc"]["coverage90"]["mean"] == pytest.approx(0.85)
    assert out["methods"]["smc"]["ssim"]["std"] == 0.0
    d = out["differences"]["smc - tv"]["psnr_db"]  # per seed: 0, 2, -2
    assert (d["mean"], d["std"], d["min"], d["max"]) == (pytest.approx(0.0), pytest.approx(2.0), -2.0, 2.0)
    assert out["volumes_per_seed"] == {0: 2, 1: 2, 2: 2} and out["subjects"] == ["a", "b"]
    from imaging_report import summary_markdown

    md = summary_markdown({"mri:8": out}, 3)
    assert "| mri:8 | smc | 21.33 ± 1.53 [20.00, 23.00] |" in md and "| mri:8 | smc - tv | 0.00 ± 2.00" in md


def test_a_seed_missing_one_volume_is_left_out_of_that_figure() -> None:
    runs = _runs()
    runs[3]["methods"]["smc"]["psnr_db"] = None  # seed 1, volume b
    smc = protocol.aggregate(runs)["mri:8"]["methods"]["smc"]["psnr_db"]
    assert smc["n"] == 2 and smc["mean"] == pytest.approx(statistics.fmean([21.0, 20.0]))
    one = protocol.aggregate([r for r in _runs() if r["seed"] == 0])["mri:8"]["methods"]["smc"]["psnr_db"]
    assert (one["mean"], one["std"], one["n"]) == (21.0, 0.0, 1)


# -- reconstructions --------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "kw"), [("mri", {"acceleration": 4.0}), ("ct", {"views": 12})])
def test_lambda0_is_the_stages_default_tv_weight(tmp_path: Path, kind: str, kw: dict) -> None:
    """TV's grid is in multiples of lambda0; an explicit lambda0 must reproduce the stage's default TV."""
    from imaging_runs import tv_lambda0

    from medidiff.stages.reconstruct import reconstruct_volume

    f = _cohort(tmp_path, GOOD, write_images=True)
    ref = f["manifest"] / ("sub-tm/0001_MR.nii.gz" if kind == "mri" else "sub-tc/0001_CT.nii.gz")
    common = dict(reference=ref, simulate=kind, grid=(16, 16, 16), spacing_mm=2.0, device="cpu", seed=3, **kw)
    direct = reconstruct_volume(tmp_path / "d", method="zero_filled" if kind == "mri" else "fbp", **common)
    lam0 = tv_lambda0(direct.out_dir, 0.01)
    default = reconstruct_volume(tmp_path / "a", method="tv", tv_iters=30, **common)
    explicit = reconstruct_volume(tmp_path / "b", method="tv", tv_iters=30, tv_lambda=lam0, **common)
    other = reconstruct_volume(tmp_path / "c", method="tv", tv_iters=30, tv_lambda=10 * lam0, **common)
    assert explicit.metrics["psnr_db"] == pytest.approx(default.metrics["psnr_db"], abs=1e-9)
    assert other.metrics["psnr_db"] != pytest.approx(default.metrics["psnr_db"], abs=1e-3)
    # the stage records the weight it used and its default in the sidecar
    assert default.sidecar["tv"]["lambda"] == default.sidecar["tv"]["lambda_default"] == pytest.approx(lam0)
    assert other.sidecar["tv"]["lambda"] == pytest.approx(10 * lam0)
    assert other.sidecar["tv"]["lambda_default"] == pytest.approx(lam0) and other.sidecar["tv"]["iters"] == 30


@pytest.fixture(scope="module")
def tiny_prior(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.train.test_pixel_space import train_tiny_pixel

    root = tmp_path_factory.mktemp("prior")
    return train_tiny_pixel(root / "run", steps=2, scale_factor_batches=1)


def test_tune_then_report_uses_the_tuned_values_and_refuses_another_checkpoint(
    tmp_path: Path, tiny_prior
) -> None:
    f = _cohort(tmp_path, GOOD, write_images=True)
    (tiny_prior.parent.parent / "split.json").write_text(f["train"].read_text())
    tuned = tmp_path / "tuned.json"
    common = ["--checkpoint", str(tiny_prior), "--manifest", str(f["manifest"]), "--split-file", str(f["split"]),
              "--tuned", str(tuned), "--particles", "2", "--steps", "3", "--settings", "mri:8",
              "--workdir", str(tmp_path / "work"), "--threads", "1"]  # fmt: skip
    res = bench_imaging.main([*common, "--part", "tuning", "--tune", "--tv-grid", "0.1", "10",
                              "--dps-grid", "0.1", "1", "--smc-grid", "0.1", "default"])  # fmt: skip
    doc = json.loads(tuned.read_text())
    assert (
        doc["checkpoint_sha256"]
        == protocol.checkpoint_sha256(tiny_prior)
        == res["config"]["checkpoint_sha256"]
    )
    for method, e in doc["tuned"]["mri"].items():
        scored = [s for s in e["scores"] if s["psnr_db"] is not None]
        assert e["best"] == max(scored, key=lambda s: s["psnr_db"])["value"], method
        assert e["subjects"] == ["sub-tm"] and e["problem"]["steps"] == 3
    assert doc["tuned"]["mri"]["tv"]["params"]["tv_iters"] in (protocol.TV_ITERS, protocol.TV_ITERS_CHECK)
    assert {r["subject"] for r in res["runs"]} == {"sub-tm"}

    res = bench_imaging.main([*common, "--seeds", "0", "1", "--pictures"])  # reporting part
    params = doc["tuned"]["mri"]
    assert [(r["seed"], r["subject"]) for r in res["runs"]] == [(0, "sub-rm1"), (0, "sub-rm2"), (1, "sub-rm1"),
                                                                (1, "sub-rm2")]  # fmt: skip
    for run in res["runs"]:
        tv = run["methods"]["tv"]["params"]
        assert tv["tv_lambda"] == pytest.approx(params["tv"]["params"]["tv_multiple"] * run["lambda0"])
        assert run["methods"]["dps"]["params"] == params["dps"]["params"]
        assert run["methods"]["smc"]["params"] == params["smc"]["params"]
    assert res["summary"]["mri:8"]["methods"]["smc"]["psnr_db"]["n"] == 2

    doc["checkpoint_sha256"] = "0" * 64
    tuned.write_text(json.dumps(doc))
    shutil.rmtree(tmp_path / "work")
    with pytest.raises(SystemExit, match="was tuned for checkpoint"):
        bench_imaging.main([*common, "--pictures"])
    assert not (tmp_path / "work").exists()  # refused before any reconstruction


def test_dps_particles_apply_to_dps_only() -> None:
    import imaging_runs

    args = bench_imaging.parse_args(["--particles", "16", "--dps-particles", "4"])
    assert imaging_runs.particles_of("dps", args) == 4
    assert imaging_runs.particles_of("smc", args) == 16
    assert imaging_runs.particles_of("dps", bench_imaging.parse_args(["--particles", "16"])) == 16


def test_emit_json_prints_and_writes_the_same_result(tmp_path, capsys) -> None:
    result = {"benchmark": "x", "ratio": 1.25, "rows": [{"a": 1}]}
    protocol.emit_json(result, tmp_path / "deep" / "out.json")
    assert json.loads(capsys.readouterr().out) == result
    assert json.loads((tmp_path / "deep" / "out.json").read_text()) == result
    protocol.emit_json(result, None)  # printing only
    assert json.loads(capsys.readouterr().out) == result
