"""The report of ``bench_sampling.py``: which ratios it states, the parity rule they obey, and the markdown.

A ratio is *at parity* when both sides run the very same prepared networks (same graph mode, and the same
``networks`` record, so a fallback to eager on one side shows), at the same precision, and, for an
equal-steps comparison, spend the same number of network evaluations. Only parity ratios are headline
figures; the others (what freezing or bf16 buys, the earlier non-parity headline) are labelled context.
:func:`ratios` refuses to state a parity ratio whose rows are not at parity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PRECISIONS = ("fp32", "bf16")
GRAPH_LABEL = {"jit": "frozen", "compile": "compiled", "eager": "eager"}


@dataclass(frozen=True)
class Ratio:
    """``num``'s seconds per volume over ``den``'s."""

    key: str
    num: str
    den: str
    parity: bool  # a headline ratio: same networks, graph and precision on both sides
    same_nfe: bool  # equal network evaluations on both sides (False: the equal-quality comparison)
    what: str


def config_name(pipeline: str, sampler: str, precision: str, graph_label: str, eq: bool = False) -> str:
    """``monai_ddim_fp32_frozen``, ``medidiff_dpmpp_bf16_frozen_eq``, ..."""
    short = {"ddim": "ddim", "dpmpp_2m": "dpmpp"}[sampler]
    return f"{pipeline}_{short}_{precision}_{graph_label}" + ("_eq" if eq else "")


def ratio_specs(graph_label: str) -> list[Ratio]:
    """The ratios reported when medidiff's inference path runs its networks as ``graph_label``."""
    g, n = graph_label, config_name
    out: list[Ratio] = []
    for p in PRECISIONS:
        out.append(
            Ratio(
                f"parity_ddim_{p}_{g}",
                n("medidiff", "ddim", p, g),
                n("monai", "ddim", p, g),
                True,
                True,
                f"DDIM vs DDIM, equal steps, the same {g} networks in {p}: the sampling loops alone",
            )
        )
    for p in PRECISIONS:
        out.append(
            Ratio(
                f"parity_equal_quality_{p}_{g}",
                n("medidiff", "dpmpp_2m", p, g, eq=True),
                n("monai", "ddim", p, g, eq=True),
                True,
                False,
                f"DPM-Solver++ vs MONAI's DDIM, each at its NFE for equal quality (GMM), same {g} networks, {p}",
            )
        )
    for p in PRECISIONS:
        out.append(
            Ratio(
                f"parity_dpmpp_{p}_{g}",
                n("medidiff", "dpmpp_2m", p, g),
                n("monai", "ddim", p, g),
                True,
                True,
                f"DPM-Solver++ vs MONAI's DDIM at equal steps (equal NFE, not equal quality), {g}, {p}",
            )
        )
    if g != "eager":
        for p in PRECISIONS:
            out.append(
                Ratio(
                    f"parity_ddim_{p}_eager",
                    n("medidiff", "ddim", p, "eager"),
                    n("monai", "ddim", p, "eager"),
                    True,
                    True,
                    f"DDIM vs DDIM, equal steps, the same eager networks in {p}",
                )
            )
        for pipeline in ("monai", "medidiff"):
            for p in PRECISIONS:
                out.append(
                    Ratio(
                        f"freezing_{pipeline}_ddim_{p}",
                        n(pipeline, "ddim", p, g),
                        n(pipeline, "ddim", p, "eager"),
                        False,
                        True,
                        f"what {g} networks buy {pipeline}'s DDIM in {p} (same pipeline, same precision)",
                    )
                )
    for pipeline in ("monai", "medidiff"):
        out.append(
            Ratio(
                f"bf16_{pipeline}_ddim_{g}",
                n(pipeline, "ddim", "bf16", g),
                n(pipeline, "ddim", "fp32", g),
                False,
                True,
                f"what bf16 autocast buys {pipeline}'s DDIM ({g} networks, same pipeline)",
            )
        )
    if g != "eager":
        for p, figure in (("fp32", "0.53x"), ("bf16", "0.34x")):
            out.append(
                Ratio(
                    f"not_parity_medidiff_ddim_{p}_{g}_vs_monai_fp32_eager",
                    n("medidiff", "ddim", p, g),
                    n("monai", "ddim", "fp32", "eager"),
                    False,
                    True,
                    f"the earlier headline ({figure}): measures {g} networks"
                    + (" and bf16" if p == "bf16" else "")
                    + ", not the sampler",
                )
            )
    return out


def _spread(record: dict[str, Any]) -> float | None:
    """Range of a configuration's timed repeats relative to their median (``None`` under 3 repeats)."""
    t = record["seconds_per_volume"]
    if len(t["all"]) < 3 or t["median"] <= 0:
        return None
    return (max(t["all"]) - min(t["all"])) / t["median"]


def ratios(records: dict[str, dict[str, Any]], specs: list[Ratio]) -> dict[str, Any]:
    """Each ratio of ``specs`` whose two configurations ran, from their reported seconds per volume.

    Raises:
        RuntimeError: a parity ratio whose rows differ in networks, graph, precision or (equal steps) NFE.
    """
    out: dict[str, Any] = {}
    for r in specs:
        if r.num not in records or r.den not in records:
            continue
        a, b = records[r.num], records[r.den]
        fields = ("graph", "networks", "precision") + (("nfe",) if r.same_nfe else ())
        differ = [f for f in fields if a[f] != b[f]]
        if r.parity and differ:
            raise RuntimeError(
                f"{r.key} is declared at parity but {r.num} and {r.den} differ in {', '.join(differ)}: "
                + "; ".join(f"{f}: {a[f]!r} vs {b[f]!r}" for f in differ)
            )
        ta, tb = a["seconds_per_volume"], b["seconds_per_volume"]
        sa, sb = _spread(a), _spread(b)
        out[r.key] = {
            "ratio_best": round(ta["best"] / tb["best"], 3),
            "ratio_median": round(ta["median"] / tb["median"], 3),
            "of": f"{r.num} / {r.den}",
            "parity": r.parity,
            "nfe": [a["nfe"], b["nfe"]],
            "precision": [a["precision"], b["precision"]],
            "networks": [a["networks"], b["networks"]],
            "spread": None if sa is None or sb is None else round(max(sa, sb), 3),
            "what": r.what,
        }
    return out


def verdict(ratio: dict[str, Any] | None) -> str | None:
    """``ahead`` / ``behind`` (medidiff vs MONAI), or ``level`` when the median ratio is within the repeats'
    spread of 1 (the timing noise of this run); ``None`` without the ratio or under 3 repeats."""
    if ratio is None or ratio["spread"] is None:
        return None
    x = ratio["ratio_median"]
    if abs(x - 1.0) <= ratio["spread"]:
        return "level"
    return "ahead" if x < 1.0 else "behind"


def headline(rat: dict[str, Any], graph_label: str) -> dict[str, Any]:
    """The figures to quote: medidiff / MONAI at parity, equal steps and equal quality, per precision."""
    out: dict[str, Any] = {
        "what": f"medidiff / MONAI seconds per volume (median), same {graph_label} networks, same precision",
    }
    for label, stem in (("ddim_equal_steps", "parity_ddim"), ("equal_quality", "parity_equal_quality")):
        rows = {p: rat.get(f"{stem}_{p}_{graph_label}") for p in PRECISIONS}
        out[label] = {p: None if r is None else r["ratio_median"] for p, r in rows.items()}
        out[f"{label}_verdict"] = {p: verdict(r) for p, r in rows.items()}
    return out


# ------------------------------------------------------------------------------------------------ markdown
def _ratio_rows(rat: dict[str, Any], parity: bool) -> list[str]:
    lines = [
        "| ratio | of | NFE | best | median | spread | what |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, r in rat.items():
        if r["parity"] == parity:
            nfe = "{} / {}".format(*r["nfe"])
            lines.append(
                f"| {key} | {r['of']} | {nfe} | {r['ratio_best']} | {r['ratio_median']} | {r['spread']} | "
                f"{r['what']} |"
            )
    return lines


def to_markdown(result: dict[str, Any]) -> str:
    m, mach, head = result["model"], result["machine"], result["headline"]
    lines = [
        "# Sampling benchmark (bench_sampling.py)",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {mach['cpu']}, device {mach['device']}, {mach['threads']} thread(s), "
        f"torch {mach['torch']}, "
        f"MONAI {mach['monai']}; load average {mach['load_before']} before, {mach['load_after']} after.",
        f"Model: {m['source']}; volume {m['volume_shape']}, latent {m['latent_shape']}, conditioning "
        f"{m['conditioning']}; {result['n']} volume(s) per batch, {result['repeats']} interleaved repeats.",
        "",
        f"## Headline: at parity ({head['what']})",
        "",
        f"- DDIM at equal steps: {head['ddim_equal_steps']} ({head['ddim_equal_steps_verdict']})",
        f"- DPM-Solver++ vs MONAI DDIM at equal quality: {head['equal_quality']} "
        f"({head['equal_quality_verdict']})",
        "",
        *_ratio_rows(result["ratios"], parity=True),
        "",
        "## Configurations",
        "",
        "| configuration | pipeline | sampler | precision | networks | steps | NFE | s/volume best | "
        "median | peak memory (MB) | increase while sampling (MB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in result["configs"].items():
        mem = r.get("memory", {})
        peak = mem.get("peak_rss_sampling_mb", mem.get("max_allocated_mb", "-"))
        t = r["seconds_per_volume"]
        lines.append(
            f"| {name} | {r['pipeline']} | {r['sampler']} | {r['precision']} | {r['networks']} | "
            f"{r['steps']} | {r['nfe']} | {t['best']:.3f} | {t['median']:.3f} | {peak} | "
            f"{mem.get('sampling_increase_mb', '-')} |"
        )
    lines += [
        "",
        "## Context, not parity: what graph freezing and bf16 buy",
        "",
        *_ratio_rows(result["ratios"], parity=False),
        "",
        f"Target: {result['target']}",
        "",
        "Checks:",
    ]
    lines += [f"- {k}: {v}" for k, v in result["checks"].items()]
    lines += ["", f"NFE for equal quality (GMM): {result['nfe_for_equal_quality']}"]
    lines += ["", f"One network evaluation / one decode (ms, median): {result['components_ms']}", ""]
    return "\n".join(lines)
