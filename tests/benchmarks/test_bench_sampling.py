"""The sampling benchmark's headline is at parity: MONAI and medidiff on the same prepared networks, the same
graph and precision (its figures are in docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = 2
EQ_NFE = {"ddim": 4, "dpmpp_2m": 2}  # a stand-in for bench_gmm_nfe.py's output, small to stay fast


def _load_report():
    """benchmarks/ is not a package: load the report module from its path."""
    spec = importlib.util.spec_from_file_location(
        "sampling_report", ROOT / "benchmarks" / "sampling_report.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("bench_sampling")
    gmm = tmp / "gmm.json"
    gmm.write_text(json.dumps({"nfe_for_equal_quality": EQ_NFE}))
    out = tmp / "result.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_sampling.py"), "--config",
           str(ROOT / "configs" / "model_tiny.yaml"), "--steps", str(STEPS), "--repeats", "1", "--no-memory",
           "--gmm-json", str(gmm), "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_monai_runs_on_the_same_frozen_networks_at_each_precision(result: dict) -> None:
    cfgs = result["configs"]
    for p in ("fp32", "bf16"):
        for name, nfe in ((f"monai_ddim_{p}_frozen", STEPS), (f"monai_ddim_{p}_frozen_eq", EQ_NFE["ddim"])):
            assert cfgs[name]["pipeline"] == "monai" and cfgs[name]["precision"] == p
            assert cfgs[name]["networks"] == "jit-frozen" and cfgs[name]["nfe"] == nfe
        assert cfgs[f"medidiff_ddim_{p}_frozen"]["networks"] == "jit-frozen"
        assert cfgs[f"medidiff_dpmpp_{p}_frozen_eq"]["nfe"] == EQ_NFE["dpmpp_2m"]
        assert cfgs[f"monai_ddim_{p}_eager"]["networks"] == "eager"  # context rows, kept
    assert all(result["checks"]["all_finite"].values())
    # the two pipelines agree on a grid where MONAI's DDIM steps where it says, eager and frozen
    for check in result["checks"]["equivalence_leading_grid"].values():
        assert check["rel_err_decoded_volume"] < 1e-5


@pytest.mark.slow
def test_the_headline_ratios_come_from_same_graph_same_precision_rows(result: dict) -> None:
    cfgs, rat, head = result["configs"], result["ratios"], result["headline"]
    parity = {k: r for k, r in rat.items() if r["parity"]}
    for p in ("fp32", "bf16"):
        assert head["ddim_equal_steps"][p] == rat[f"parity_ddim_{p}_frozen"]["ratio_median"]
        assert head["equal_quality"][p] == rat[f"parity_equal_quality_{p}_frozen"]["ratio_median"]
        assert rat[f"parity_ddim_{p}_frozen"]["of"] == f"medidiff_ddim_{p}_frozen / monai_ddim_{p}_frozen"
        assert rat[f"parity_equal_quality_{p}_frozen"]["of"] == (
            f"medidiff_dpmpp_{p}_frozen_eq / monai_ddim_{p}_frozen_eq"
        )
    assert len(parity) == 8
    for key, r in parity.items():
        num, den = (cfgs[name] for name in r["of"].split(" / "))
        assert (num["pipeline"], den["pipeline"]) == ("medidiff", "monai"), key
        for field in ("graph", "networks", "precision"):
            assert num[field] == den[field], (key, field)
        if "equal_quality" not in key:
            assert num["nfe"] == den["nfe"] == STEPS, key
        expected = num["seconds_per_volume"]["median"] / den["seconds_per_volume"]["median"]
        assert r["ratio_median"] == pytest.approx(expected, abs=6e-4), key
    # the earlier headline (frozen medidiff over eager MONAI) is still there, but only as context
    old = rat["not_parity_medidiff_ddim_fp32_frozen_vs_monai_fp32_eager"]
    assert not old["parity"] and old["networks"] == ["jit-frozen", "eager"]


def test_a_ratio_declared_at_parity_over_rows_that_differ_is_refused() -> None:
    report = _load_report()

    def row(precision: str, graph: str, networks: str, nfe: int = 3) -> dict:
        t = {"best": 1.0, "median": 1.0, "all": [1.0]}
        return {
            "precision": precision,
            "graph": graph,
            "networks": networks,
            "nfe": nfe,
            "seconds_per_volume": t,
        }

    same = {"a": row("fp32", "jit", "jit-frozen"), "b": row("fp32", "jit", "jit-frozen")}
    assert report.ratios(same, [report.Ratio("k", "a", "b", True, True, "")])["k"]["ratio_median"] == 1.0
    for b in (row("fp32", "eager", "eager"), row("bf16", "jit", "jit-frozen"), row("fp32", "jit", "eager")):
        with pytest.raises(RuntimeError, match="parity"):
            report.ratios({"a": same["a"], "b": b}, [report.Ratio("k", "a", "b", True, True, "")])
        assert "k" in report.ratios({"a": same["a"], "b": b}, [report.Ratio("k", "a", "b", False, True, "")])
    with pytest.raises(RuntimeError, match="nfe"):  # equal steps means equal network evaluations
        report.ratios(
            {"a": same["a"], "b": row("fp32", "jit", "jit-frozen", nfe=5)},
            [report.Ratio("k", "a", "b", True, True, "")],
        )
    # every headline spec pairs medidiff with MONAI at one precision and one graph
    for spec in report.ratio_specs("frozen"):
        if spec.parity:
            assert spec.num.startswith("medidiff_") and spec.den.startswith("monai_")
            assert spec.num.split("_")[2:] == spec.den.split("_")[2:], spec


def test_the_verdict_calls_a_ratio_within_the_timing_spread_level() -> None:
    report = _load_report()
    assert report.verdict({"ratio_median": 0.97, "spread": 0.05}) == "level"
    assert report.verdict({"ratio_median": 0.90, "spread": 0.05}) == "ahead"
    assert report.verdict({"ratio_median": 1.10, "spread": 0.05}) == "behind"
    assert report.verdict({"ratio_median": 0.90, "spread": None}) is None  # under 3 repeats: not judged
