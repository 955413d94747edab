"""Markdown rendering of a data card: the human-readable page written beside the JSON card."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from medidiff.datacard import AxisDistribution, DataCard

__all__ = ["render_markdown"]


def _cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _axes(dists: Sequence[AxisDistribution], which: str) -> str:
    return " x ".join(_fmt(getattr(d, which)) for d in dists)


def render_markdown(card: DataCard) -> str:
    """Human-readable Markdown of a data card (tables for modalities, geometry, intensities, problems)."""
    out = [f"# Data card: {card.name}", ""]
    if card.description:
        out += [card.description, ""]
    out += _table(
        ["Field", "Value"],
        [
            ["Created (UTC)", card.created.astimezone(UTC).isoformat(timespec="seconds")],
            ["Source", card.source],
            ["Licence", card.licence],
            ["Series", card.n_series],
            ["Subjects (hashed)", card.n_subjects],
            ["Label maps", card.n_label_maps],
            ["Schema version", card.schema_version],
        ],
    )
    out += ["## Modalities", ""]
    out += _table(
        ["Modality", "Kind", "Series", "Subjects", "Shape (median)", "Spacing mm (median)"],
        [
            [
                g.modality,
                g.kind,
                g.n_series,
                g.n_subjects,
                _axes(g.shape, "median"),
                _axes(g.spacing, "median"),
            ]
            for g in card.groups
        ],
    )
    out += ["## Size and spacing", ""]
    out += _table(
        ["Modality", "Kind", "Shape min", "Shape max", "Spacing min (mm)", "Spacing max (mm)"],
        [
            [
                g.modality,
                g.kind,
                _axes(g.shape, "min"),
                _axes(g.shape, "max"),
                _axes(g.spacing, "min"),
                _axes(g.spacing, "max"),
            ]
            for g in card.groups
        ],
    )
    rows = [
        [g.modality, s.n_volumes, _fmt(s.pooled_mean), _fmt(s.pooled_std)]
        + [f"{_fmt(q.median)} [{_fmt(q.min)}, {_fmt(q.max)}]" for q in (s.p01, s.p50, s.p99)]
        for g in card.groups
        if (s := g.intensity) is not None
    ]
    if rows:
        out += [
            "## Intensities",
            "",
            "Pooled over voxels; percentiles are the median over volumes [min, max].",
            "",
        ]
        out += _table(["Modality", "Volumes", "Mean", "Std", "P1", "P50", "P99"], rows)
    labels = [g for g in card.groups if g.label_voxels is not None]
    if labels:
        out += ["## Labels", ""]
        rows = [
            [g.modality, v, (g.label_series or {}).get(v, 0), n]
            for g in labels
            for v, n in (g.label_voxels or {}).items()
        ]
        out += _table(["Modality", "Label", "Series containing it", "Voxels"], rows)
    out += ["## Problems", ""]
    if card.problems.total == 0:
        out += ["No problems were reported.", ""]
    else:
        severities = sorted(card.problems.by_severity)
        out += _table(
            ["Kind", *severities, "Total"],
            [
                [kind, *(counts.get(s, 0) for s in severities), sum(counts.values())]
                for kind, counts in card.problems.by_kind.items()
            ]
            + [["**all**", *(card.problems.by_severity[s] for s in severities), card.problems.total]],
        )
    phi = card.phi
    out += ["## Patient privacy", "", phi.statement, ""]
    out += _table(
        ["Item", "Value"],
        [
            ["Method", phi.method],
            ["Key id (fingerprint, not the key)", f"`{phi.key_id}`"],
            ["Hashed", ", ".join(phi.hashed) or "-"],
            ["Kept", ", ".join(phi.kept) or "-"],
            ["Dropped", f"{len(phi.dropped)} attributes (see the JSON card)"],
            ["UIDs", phi.uids],
        ],
    )
    prov = card.provenance
    code = "-"
    if prov.code is not None:
        code = prov.code.git_commit or prov.code.package_version
        if prov.code.git_dirty:
            code += " (with uncommitted changes)"
    out += ["## Provenance", ""]
    out += _table(
        ["Item", "Value"],
        [
            ["medidiff version", prov.medidiff_version],
            ["Code", code],
            ["Run id", prov.run_id or "-"],
            ["Manifest SHA-256", f"`{prov.manifest_sha256}`" if prov.manifest_sha256 else "-"],
        ],
    )
    if prov.config:
        out += ["Configuration:", "", "```json", json.dumps(prov.config, indent=2, sort_keys=True), "```", ""]
    return "\n".join(out)
