"""W3C PROV-JSON document of a run, built from the per-output provenance records.

The records of :mod:`medidiff.provenance` become one PROV document: inputs, outputs, config and
model are entities, each (run, stage) is an activity, medidiff is the software agent. The document
is built as plain JSON; the ``prov`` package reads it into its object model on request
(:func:`prov_document`), and is imported only then.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medidiff.io.atomic import atomic_write_text

if TYPE_CHECKING:  # pragma: no cover
    from prov.model import ProvDocument

    from medidiff.provenance import FileRef, ProvenanceRecord

__all__ = ["prov_document", "prov_document_json", "write_prov_document"]


def _short(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def prov_document(records: Sequence[ProvenanceRecord]) -> ProvDocument:
    """W3C PROV document of a run, as the ``prov`` package's object model (see
    :func:`prov_document_json` for what it holds; this is that document, read by ``prov``)."""
    from prov.model import ProvDocument

    return ProvDocument.deserialize(content=json.dumps(prov_document_json(records)), format="json")


def write_prov_document(records: Sequence[ProvenanceRecord], path: str | os.PathLike[str]) -> Path:
    """Write :func:`prov_document` of ``records`` as PROV-JSON, atomically."""
    return atomic_write_text(path, json.dumps(prov_document_json(records), indent=2) + "\n")


def prov_document_json(records: Sequence[ProvenanceRecord]) -> dict[str, Any]:
    """W3C PROV-JSON document of a run: one activity per (run, stage), entities for files,
    config and model, built as plain JSON (``prov``'s object model took a second for the
    thousands of input files of an ingest run). The ingest stage checks it for patient identity
    before writing it.

    Relations: ``used`` (activity -> inputs, config, model), ``wasGeneratedBy`` (output ->
    activity, with the Prefect task run id), ``wasDerivedFrom`` (output -> each input),
    ``wasAssociatedWith`` (activity -> the medidiff software agent).
    """
    from medidiff.provenance import InputRef

    doc: dict[str, dict[str, Any]] = {
        "prefix": {"md": "urn:medidiff:"},
        "agent": {},
        "activity": {},
        "wasAssociatedWith": {},
        "entity": {},
        "used": {},
        "wasGeneratedBy": {},
        "wasDerivedFrom": {},
    }
    counter = iter(range(1, 1 << 62))
    relations: set[tuple[str, ...]] = set()

    def relation(kind: str, attrs: dict[str, Any]) -> None:
        doc[kind][f"_:id{next(counter)}"] = attrs

    def entity(ident: str, attrs: dict[str, Any]) -> str:
        qn = f"md:{ident}"
        doc["entity"].setdefault(qn, attrs)
        return qn

    def file_entity(kind: str, ref: FileRef) -> str:
        attrs: dict[str, Any] = {
            "prov:type": f"md:{kind}",
            "prov:location": ref.path,
            "prov:label": Path(ref.path).name,
            "md:sha256": ref.sha256,
        }
        if isinstance(ref, InputRef):
            for key, value in (
                ("md:studyInstanceUID", ref.study_uid),
                ("md:seriesInstanceUID", ref.series_uid),
                ("md:sopInstanceUID", ref.sop_uid),
            ):
                if value is not None:
                    attrs[key] = value
        return entity(f"{kind.lower()}-{ref.sha256[:16]}-{_short(ref.path)}", attrs)

    groups: dict[tuple[str, str], list[ProvenanceRecord]] = {}
    for rec in records:
        groups.setdefault((rec.run_id, rec.stage), []).append(rec)
    for (run_id, stage), recs in groups.items():
        first = recs[0]
        code = first.code
        agent = (
            "md:"
            + f"medidiff-{code.package_version}"
            + (f"-{code.git_commit[:12]}" if code.git_commit else "")
        )
        if agent not in doc["agent"]:
            attrs: dict[str, Any] = {
                "prov:type": "prov:SoftwareAgent",
                "prov:label": "medidiff",
                "md:version": code.package_version,
            }
            if code.git_commit:
                attrs["md:gitCommit"] = code.git_commit
                attrs["md:gitDirty"] = bool(code.git_dirty)
            doc["agent"][agent] = attrs
        act: dict[str, Any] = {
            "prov:startTime": min(r.started for r in recs).isoformat(),
            "prov:endTime": max(r.ended for r in recs).isoformat(),
            "prov:type": "md:StageRun",
            "prov:label": f"medidiff {stage}",
            "md:stage": stage,
            "md:runId": run_id,
            "md:hostname": first.host.hostname,
            "md:device": first.device.type
            + (f":{first.device.index}" if first.device.index is not None else ""),
            "md:seeds": json.dumps(first.seeds, sort_keys=True),
            "md:packages": json.dumps(first.packages, sort_keys=True),
        }
        if first.precision:
            act["md:precision"] = first.precision
        if first.prefect.flow_run_id:
            act["md:flowRunId"] = first.prefect.flow_run_id
        qn_act = f"md:{stage}-{run_id}"
        doc["activity"][qn_act] = act
        relation("wasAssociatedWith", {"prov:activity": qn_act, "prov:agent": agent})
        for rec in recs:
            used = [
                entity(
                    f"config-{rec.config_sha256[:16]}",
                    {
                        "prov:type": "md:Config",
                        "md:sha256": rec.config_sha256,
                        "md:json": json.dumps(rec.config),
                    },
                )
            ]
            if rec.model is not None:
                m_attrs: dict[str, Any] = {"prov:type": "md:Model", "prov:label": rec.model.name}
                if rec.model.weights_sha256:
                    m_attrs["md:sha256"] = rec.model.weights_sha256
                tag = rec.model.weights_sha256[:16] if rec.model.weights_sha256 else _short(rec.model.name)
                used.append(entity(f"model-{tag}", m_attrs))
            inputs = [file_entity("Input", i) for i in rec.inputs]
            out = file_entity("Output", rec.output)
            for ent in used + inputs:
                if ("used", qn_act, ent) not in relations:
                    relations.add(("used", qn_act, ent))
                    relation("used", {"prov:activity": qn_act, "prov:entity": ent})
            gen: dict[str, Any] = {
                "prov:entity": out,
                "prov:activity": qn_act,
                "prov:time": rec.ended.isoformat(),
            }
            if rec.prefect.task_run_id:
                gen["md:taskRunId"] = rec.prefect.task_run_id
            relation("wasGeneratedBy", gen)
            for ent in inputs:
                if ("derived", out, ent) not in relations:
                    relations.add(("derived", out, ent))
                    relation("wasDerivedFrom", {"prov:generatedEntity": out, "prov:usedEntity": ent})
    return {k: v for k, v in doc.items() if v or k == "prefix"}
