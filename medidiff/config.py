"""Configuration models (pydantic) and YAML loading.

Every stage takes a typed config; the resolved config (defaults filled in) is saved next to
the stage's outputs and in each provenance record, so a run can be repeated exactly.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medidiff.transforms import CanonicalConfig, NormalizationConfig

__all__ = ["ConfigError", "IngestConfig", "PrivacyConfig", "ToleranceConfig", "config_hash", "load_config"]

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config file that cannot be read or does not validate; the message says which field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ToleranceConfig(_Strict):
    """Geometry check tolerances (see :class:`medidiff.io.dicom.GeometryTolerances`)."""

    spacing_rel: float = Field(0.01, gt=0, lt=0.5, description="allowed slice-step deviation, fraction")
    spacing_abs_mm: float = Field(0.01, ge=0, description="allowed slice-step deviation, mm")
    duplicate_mm: float = Field(0.01, gt=0)
    tilt_mm: float = Field(0.01, gt=0)
    orientation: float = Field(1e-4, gt=0)


class PrivacyConfig(_Strict):
    """How patient identity is handled in outputs.

    Patient IDs become a keyed hash (HMAC-SHA256) whose key lives outside the outputs.
    """

    key_file: Path | None = Field(
        None, description="hash key file; default: $MEDIDIFF_HASH_KEY or ~/.config/medidiff/hash.key"
    )
    keep_patient_names: Literal[False] = Field(
        False, description="always false: patient names, ids and birth dates are never written"
    )
    keep_dates: bool = False
    keep_descriptions: bool = Field(
        True, description="SeriesDescription/ProtocolName, scrubbed of PHI values"
    )
    input_paths: Literal["redacted", "hashed"] = Field(
        "redacted",
        description="how outputs refer to input files: the path below SRC with identity redacted, "
        "or a keyed hash only (for drops whose folder names carry identity no header states)",
    )


class IngestConfig(_Strict):
    """Configuration of ``medidiff ingest``."""

    stage: Literal["ingest"] = "ingest"
    workers: int | None = Field(None, ge=1, description="processes for the header pass; default all cores")
    gantry_tilt: Literal["resample", "error"] = "resample"
    keep_single_slice: bool = False
    split_4d_nifti: bool = True
    label_patterns: tuple[str, ...] = Field(
        ("*seg*", "*label*", "*mask*", "*dseg*"),
        description="NIfTI file-name patterns (fnmatch, case-insensitive) read as label maps",
    )
    tolerances: ToleranceConfig = ToleranceConfig()
    # Ingest keeps physical units (HU, scanner intensities) unless the config asks for
    # normalisation; the parameters of any normalisation are recorded so export can invert it.
    canonical: CanonicalConfig = CanonicalConfig(normalization=NormalizationConfig(by_modality={}))
    privacy: PrivacyConfig = PrivacyConfig()
    compress: bool = Field(True, description="write .nii.gz (else .nii)")
    nonfinite_voxels: Literal["error", "zero"] = Field(
        "error",
        description="NaN/inf voxels in an input: refuse the item (error) or set them to 0 and say so "
        "in a warning (zero); a non-finite voxel is never written",
    )


def load_config(path: str | Path | None, model: type[M], overrides: dict[str, Any] | None = None) -> M:
    """Load a YAML or JSON config file into ``model``; ``None`` gives the defaults.

    Raises:
        ConfigError: file missing, unparsable, or failing validation (names the field).
    """
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {p} must hold a mapping at top level, got {type(loaded).__name__}"
            )
        data = loaded or {}
    if overrides:
        data = {**data, **overrides}
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = [f"  {'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()]
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid {model.__name__}{where}:\n" + "\n".join(lines)) from e


def config_hash(cfg: BaseModel) -> str:
    """SHA-256 of the resolved config's canonical JSON (used in cache keys and provenance)."""
    blob = json.dumps(cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()
