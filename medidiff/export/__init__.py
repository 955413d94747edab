"""Exports of results for review: DICOM objects that reference their source (IO edge of the package)."""

from medidiff.export.dicom_export import (
    RESEARCH_ONLY,
    ExportedObject,
    derived_series,
    export_dicom,
    parametric_map,
    quantise,
    segmentation,
)
from medidiff.export.source import ExportError, Result, SourceSeries, find_source_series, read_result

__all__ = [
    "RESEARCH_ONLY",
    "ExportError",
    "ExportedObject",
    "Result",
    "SourceSeries",
    "derived_series",
    "export_dicom",
    "find_source_series",
    "parametric_map",
    "quantise",
    "read_result",
    "segmentation",
]
