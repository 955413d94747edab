"""Provenance: one JSON record per output, and a W3C PROV-JSON document per run.

Every file a stage writes gets ``<output>.prov.json`` beside it (:class:`ProvenanceRecord`):
input hashes and DICOM UIDs, the resolved config, converter and model, code version (git
commit or package version), package versions, host, device, precision, seeds, timestamps,
Prefect flow/task run ids and warnings. At the end of a run the records are turned into one
W3C PROV document (``<run_dir>/provenance.prov.json``, built in :mod:`medidiff.prov_json`):
inputs, outputs, config and model are entities, the stage run is an activity, medidiff is the
software agent.

Typical use inside a stage::

    with ProvenanceTracker("ingest", run_dir, config=cfg, seeds={"numpy": 0}) as prov:
        ...write out_path...
        prov.add_output(out_path, [input_ref(p, root=src, sha256=h, series_uid=uid) for p, h in files])

The record functions (:func:`make_record`, :func:`write_record`, :func:`collect_records`,
:func:`write_prov_document`) are stateless, so tasks running in other processes can write
their own records and a final task can gather them into the run document.

Importing this module is light: the standard library, pydantic and the medidiff IO helpers.
Versions are read from package metadata, never by importing the packages; torch and Prefect are
queried only if the process has already imported them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import re
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any, Literal, Self

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, model_validator

import medidiff
from medidiff.io.atomic import atomic_write_json, atomic_write_text, sha256_file
from medidiff.privacy import find_phi
from medidiff.prov_json import prov_document, write_prov_document  # re-exported: part of this API

__all__ = [
    "RECORD_SUFFIX",
    "RUN_PROV_NAME",
    "SCHEMA_PATH",
    "CodeVersion",
    "DeviceInfo",
    "FileRef",
    "HostInfo",
    "InputRef",
    "ModelRef",
    "PrefectRunIds",
    "ProvenanceRecord",
    "ProvenanceTracker",
    "ToolRef",
    "code_version",
    "collect_records",
    "device_info",
    "export_schema",
    "host_info",
    "input_ref",
    "labelled_inputs",
    "make_record",
    "package_versions",
    "prefect_run_ids",
    "prov_document",
    "read_record",
    "record_path",
    "write_prov_document",
    "write_record",
]

log = logging.getLogger(__name__)

RECORD_SUFFIX = ".prov.json"
RUN_PROV_NAME = "provenance.prov.json"
SCHEMA_PATH = Path(__file__).parent / "schemas" / "provenance.schema.json"
MEDIDIFF_NS = "urn:medidiff:"

# Distributions whose versions every record carries (those installed); read from metadata only.
TRACKED_PACKAGES = (
    "numpy", "scipy", "torch", "monai", "nibabel", "pydicom", "SimpleITK", "highdicom", "prefect",
    "prov", "pydantic", "scikit-image", "nilearn", "safetensors", "pylibjpeg", "pylibjpeg-libjpeg",
    "pylibjpeg-openjpeg", "pylibjpeg-rle", "dcm2niix",
)  # fmt: skip

Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
GitCommit = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{40}([0-9a-f]{24})?$")]
NonEmpty = Annotated[str, StringConstraints(min_length=1)]


# ----------------------------------------------------------------------------------- the model
class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileRef(_Model):
    """A file and the SHA-256 of its content. ``path`` is relative to the run or input root."""

    path: NonEmpty
    sha256: Sha256


class InputRef(FileRef):
    """An input file, with its DICOM UIDs when it is a DICOM instance."""

    study_uid: str | None = None
    series_uid: str | None = None
    sop_uid: str | None = None


class ToolRef(_Model):
    """External tool or converter used to make the output (e.g. dcm2niix, or medidiff's reader)."""

    name: NonEmpty
    version: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)


class ModelRef(_Model):
    """A trained network used to make the output."""

    name: NonEmpty
    weights_sha256: Sha256 | None = None
    weights_path: str | None = None


class CodeVersion(_Model):
    """Version of the medidiff code that ran: a git commit when run from a checkout."""

    package_version: NonEmpty
    source: Literal["git", "package"]
    git_commit: GitCommit | None = None
    git_dirty: bool | None = None  # uncommitted changes under the medidiff package folder


class HostInfo(_Model):
    hostname: str
    platform: str
    python: str
    cpu_count: int | None = Field(default=None, ge=1)
    cpu_model: str | None = None


class DeviceInfo(_Model):
    type: NonEmpty  # "cpu", "cuda", "mps"
    index: int | None = Field(default=None, ge=0)
    name: str | None = None


class PrefectRunIds(_Model):
    """Prefect ids when the output was made inside a flow run; ``None`` outside Prefect."""

    flow_run_id: str | None = None
    task_run_id: str | None = None


class ProvenanceRecord(_Model):
    """Provenance of one output file of a medidiff stage."""

    model_config = ConfigDict(
        extra="forbid",
        title="medidiff provenance record",
        json_schema_extra={"$schema": "https://json-schema.org/draft/2020-12/schema"},
    )

    schema_version: Literal["1.0"] = "1.0"
    run_id: NonEmpty
    stage: NonEmpty
    output: FileRef
    inputs: list[InputRef]
    config: dict[str, Any]
    config_sha256: Sha256
    converter: ToolRef | None = None
    model: ModelRef | None = None
    code: CodeVersion
    packages: dict[str, str]
    host: HostInfo
    device: DeviceInfo
    precision: str | None = None
    seeds: dict[str, int] = Field(default_factory=dict)
    started: AwareDatetime
    ended: AwareDatetime
    prefect: PrefectRunIds = Field(default_factory=PrefectRunIds)
    warnings: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _times_in_order(self) -> Self:
        if self.ended < self.started:
            raise ValueError(f"ended ({self.ended}) is before started ({self.started})")
        return self


def export_schema(path: str | os.PathLike[str] = SCHEMA_PATH) -> Path:
    """Write the JSON Schema of :class:`ProvenanceRecord` (regenerate after changing the model)."""
    return atomic_write_json(path, ProvenanceRecord.model_json_schema())


# ---------------------------------------------------------------------- environment (cached)
def package_versions() -> dict[str, str]:
    """Versions of Python, medidiff and the installed :data:`TRACKED_PACKAGES` (cached per process)."""
    return dict(_package_versions())


@functools.cache
def _package_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "medidiff": medidiff.__version__}
    for name in TRACKED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def code_version(package_dir: str | os.PathLike[str] | None = None) -> CodeVersion:
    """Git commit (and dirty flag) of the medidiff source, or the package version if not a checkout.

    The commit is used only if ``package_dir`` is tracked by the repository that contains it,
    so a package installed inside some other checkout (e.g. its ``.venv``) reports its version.
    Cached per process and folder.

    Args:
        package_dir: the package folder; defaults to the folder of the imported ``medidiff``.
    """
    folder = Path(package_dir) if package_dir is not None else Path(medidiff.__file__).parent
    return _code_version(str(folder.resolve())).model_copy()


@functools.cache
def _code_version(folder: str) -> CodeVersion:
    version = medidiff.__version__
    # Variables such as GIT_DIR (set inside git hooks) would point git at another repository.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}

    def git(*args: str) -> str:
        done = subprocess.run(
            # --no-optional-locks: `git status` must not take .git/index.lock from a user's git
            ["git", "--no-optional-locks", "-C", folder, *args],
            capture_output=True,
            text=True,
            timeout=10,
            env=env,
            check=True,
        )
        return done.stdout.strip()

    try:
        if not git("ls-files", "--", "__init__.py"):
            raise ValueError("package is not tracked here")
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--", "."))
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        log.debug("no git commit for %s (%s); using package version %s", folder, exc, version)
        return CodeVersion(package_version=version, source="package")
    return CodeVersion(package_version=version, source="git", git_commit=commit, git_dirty=dirty)


@functools.cache
def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def host_info() -> HostInfo:
    """Hostname, platform, Python and CPU of this machine (cached per process)."""
    return _host_info().model_copy()


@functools.cache
def _host_info() -> HostInfo:
    return HostInfo(
        hostname=socket.gethostname(),
        platform=platform.platform(),
        python=sys.version.split()[0],
        cpu_count=os.cpu_count(),
        cpu_model=_cpu_model(),
    )


def device_info(device: Any = None) -> DeviceInfo:
    """The compute device of the output.

    Args:
        device: ``"cpu"``, ``"cuda:1"``, a ``torch.device``, or ``None`` to detect: CUDA's current
            device if this process has initialised CUDA, else CPU. Detection never imports torch:
            if torch is not imported, nothing in this process ran on a GPU.
    """
    torch = sys.modules.get("torch")
    if device is None:
        cuda_used = torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()
        device = f"cuda:{torch.cuda.current_device()}" if cuda_used else "cpu"
    text = str(device)
    m = re.fullmatch(r"([a-z]+)(?::(\d+))?", text)
    if m is None:
        raise ValueError(f"device {text!r} is not like 'cpu', 'cuda' or 'cuda:0'")
    kind, index = m[1], int(m[2]) if m[2] is not None else None
    if kind == "cpu":
        return DeviceInfo(type="cpu", name=_cpu_model())
    name = None
    if kind == "cuda" and torch is not None and torch.cuda.is_available():
        index = torch.cuda.current_device() if index is None else index
        name = torch.cuda.get_device_name(index)
    return DeviceInfo(type=kind, index=index, name=name)


def prefect_run_ids() -> PrefectRunIds:
    """Flow and task run ids when called inside a Prefect run; empty otherwise.

    Prefect is consulted only if already imported (importing it takes seconds, and a process
    that has not imported it is not running a flow).
    """
    if "prefect" not in sys.modules:
        return PrefectRunIds()
    try:
        from prefect.runtime import flow_run, task_run

        return PrefectRunIds(flow_run_id=flow_run.id, task_run_id=task_run.id)
    except Exception as exc:  # a provenance lookup must never fail the stage
        log.debug("could not read Prefect run ids: %s", exc)
        return PrefectRunIds()


def utc_now() -> datetime:
    return datetime.now(UTC)


# -------------------------------------------------------------------------------- the records
def _jsonable(obj: Any) -> Any:
    """Deep copy of ``obj`` as plain JSON types (paths and numpy values converted)."""

    def default(o: Any) -> Any:
        if isinstance(o, os.PathLike):
            return os.fspath(o)
        if hasattr(o, "tolist"):  # numpy scalars and arrays
            return o.tolist()
        if hasattr(o, "model_dump"):
            return o.model_dump(mode="json")
        if isinstance(o, set | frozenset | tuple):
            return list(o)
        raise TypeError(f"config value of type {type(o).__name__} is not JSON serialisable")

    return json.loads(json.dumps(obj, default=default))


def _config_sha256(config: Mapping[str, Any]) -> str:
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _display_path(path: str | os.PathLike[str], root: str | os.PathLike[str] | None) -> str:
    p = Path(path)
    if root is not None:
        try:
            return p.resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            pass
    return p.as_posix()


def labelled_inputs(
    paths: Mapping[str, str | os.PathLike[str] | None], label: str | None
) -> list[InputRef | str | os.PathLike[str]]:
    """A stage's inputs by role (``{"image": path, "reference": None, ...}``; None entries dropped) for
    :meth:`ProvenanceTracker.add_output`: the paths themselves, or with ``label`` (a keyed name, as the flows
    pass) each as ``<label>/<role>`` with its SHA-256, so that a file name that carries a patient's name
    never reaches the record."""
    given = {role: p for role, p in paths.items() if p is not None}
    if label is None:
        return list(given.values())
    return [InputRef(path=f"{label}/{role}", sha256=sha256_file(p)) for role, p in given.items()]


def input_ref(
    path: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    sha256: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
) -> InputRef:
    """Describe one input file; its hash is computed unless given (e.g. from the manifest).

    Args:
        path: the input file.
        root: the input root; the record stores the path relative to it. Folder names of a
            hospital export can carry patient names: pass the root so that only the part below
            it is stored, and check records with ``phi_values`` (see :meth:`ProvenanceTracker.add_output`).
        sha256: hex SHA-256 if already known.
        study_uid, series_uid, sop_uid: DICOM UIDs of the instance.
    """
    digest = sha256 if sha256 is not None else sha256_file(path)
    return InputRef(
        path=_display_path(path, root),
        sha256=digest,
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=sop_uid,
    )


def make_record(
    output: str | os.PathLike[str],
    inputs: Sequence[InputRef | str | os.PathLike[str]],
    *,
    stage: str,
    run_id: str,
    config: Mapping[str, Any],
    started: datetime,
    ended: datetime | None = None,
    output_root: str | os.PathLike[str] | None = None,
    input_root: str | os.PathLike[str] | None = None,
    output_sha256: str | None = None,
    seeds: Mapping[str, int] | None = None,
    precision: str | None = None,
    device: Any = None,
    converter: ToolRef | None = None,
    model: ModelRef | None = None,
    warnings: Sequence[str] = (),
) -> ProvenanceRecord:
    """Build the provenance record of one output file (which must already be written).

    Args:
        output: the output file.
        inputs: :class:`InputRef` objects (see :func:`input_ref`) or input paths to hash.
        stage: stage name (``"ingest"``, ``"train"``...).
        run_id: id shared by all records of one run.
        config: the resolved configuration (copied as JSON).
        started: when work on this output (or the run) started; timezone-aware.
        ended: when it ended; now if omitted.
        output_root: the output path is stored relative to this folder (the run folder).
        input_root: input paths given as paths are stored relative to this folder.
        output_sha256: the output's hash if already known (then the output need not be at its
            final path yet: a stage may check the record before moving both into place).
        seeds: named random seeds used.
        precision: numeric precision (``"float32"``, ``"bf16-mixed"``...).
        device: see :func:`device_info`.
        converter: tool that made the output and its options.
        model: network that made the output.
        warnings: warnings raised while making the output.
    """
    if isinstance(warnings, str):
        raise TypeError("warnings must be a list of strings, not one string")
    out = Path(output)
    if output_sha256 is None and not out.is_file():
        raise FileNotFoundError(f"output {out} does not exist; write it before recording its provenance")
    refs = [i if isinstance(i, InputRef) else input_ref(i, root=input_root) for i in inputs]
    cfg = _jsonable(dict(config))
    return ProvenanceRecord(
        run_id=run_id,
        stage=stage,
        output=FileRef(
            path=_display_path(out, output_root),
            sha256=output_sha256 if output_sha256 is not None else sha256_file(out),
        ),
        inputs=refs,
        config=cfg,
        config_sha256=_config_sha256(cfg),
        converter=converter,
        model=model,
        code=code_version(),
        packages=package_versions(),
        host=host_info(),
        device=device_info(device),
        precision=precision,
        seeds=dict(seeds or {}),
        started=started,
        ended=ended if ended is not None else utc_now(),
        prefect=prefect_run_ids(),
        warnings=[str(w) for w in warnings],
    )


def record_path(output: str | os.PathLike[str]) -> Path:
    """Where the record of ``output`` goes: ``<output>.prov.json``."""
    out = Path(output)
    return out.with_name(out.name + RECORD_SUFFIX)


def write_record(record: ProvenanceRecord, output: str | os.PathLike[str]) -> Path:
    """Write ``record`` atomically beside the output file ``output``; returns the record's path."""
    return atomic_write_text(record_path(output), record.model_dump_json(indent=2) + "\n")


def read_record(path: str | os.PathLike[str]) -> ProvenanceRecord:
    """Read and validate a ``.prov.json`` record."""
    return ProvenanceRecord.model_validate_json(Path(path).read_bytes())


def collect_records(run_dir: str | os.PathLike[str]) -> list[ProvenanceRecord]:
    """All output records under ``run_dir`` (e.g. written by tasks in other processes), sorted by path."""
    paths = sorted(p for p in Path(run_dir).rglob("*" + RECORD_SUFFIX) if p.name != RUN_PROV_NAME)
    return [read_record(p) for p in paths]


# --------------------------------------------------------------------------------- the tracker
class ProvenanceTracker:
    """Collects the provenance of one stage run; writes a record per output and the run document.

    Args:
        stage: stage name.
        run_dir: the run's output folder; output paths are recorded relative to it and the PROV
            document goes to ``run_dir/provenance.prov.json``.
        config: the resolved configuration (copied now, so later changes do not leak in).
        input_root: input paths passed as paths are recorded relative to this folder.
        seeds: named random seeds.
        precision: numeric precision.
        device: see :func:`device_info`; ``None`` detects per output.
        converter: default tool for every output.
        model: default network for every output.
        run_id: id of the run; a random UUID if omitted.
    """

    def __init__(
        self,
        stage: str,
        run_dir: str | os.PathLike[str],
        *,
        config: Mapping[str, Any],
        input_root: str | os.PathLike[str] | None = None,
        seeds: Mapping[str, int] | None = None,
        precision: str | None = None,
        device: Any = None,
        converter: ToolRef | None = None,
        model: ModelRef | None = None,
        run_id: str | None = None,
    ) -> None:
        if not stage:
            raise ValueError("stage name is empty")
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping, got {type(config).__name__}")
        self.stage = stage
        self.run_dir = Path(run_dir)
        self.config = _jsonable(dict(config))
        self.input_root = input_root
        self.seeds = {str(k): int(v) for k, v in (seeds or {}).items()}
        self.precision = precision
        self.device = device
        self.converter = converter
        self.model = model
        self.run_id = run_id or uuid.uuid4().hex
        self.started = utc_now()
        self.records: list[ProvenanceRecord] = []
        self._lock = threading.Lock()  # Prefect's default task runner uses threads
        self._hashes: dict[tuple[str, int, int], str] = {}

    def _input(self, item: InputRef | str | os.PathLike[str]) -> InputRef:
        if isinstance(item, InputRef):
            return item
        # The same input often feeds several outputs: hash it once (keyed on size and mtime).
        st = os.stat(item)
        key = (str(Path(item).resolve()), st.st_size, st.st_mtime_ns)
        with self._lock:
            digest = self._hashes.get(key)
        if digest is None:
            digest = sha256_file(item)
            with self._lock:
                self._hashes[key] = digest
        return input_ref(item, root=self.input_root, sha256=digest)

    def add_output(
        self,
        output: str | os.PathLike[str],
        inputs: Sequence[InputRef | str | os.PathLike[str]],
        *,
        warnings: Sequence[str] = (),
        started: datetime | None = None,
        converter: ToolRef | None = None,
        model: ModelRef | None = None,
        output_sha256: str | None = None,
        phi_values: Sequence[str] = (),
    ) -> ProvenanceRecord:
        """Record one written output and write ``<output>.prov.json`` beside it.

        Args:
            output: the output file (already written).
            inputs: input files or :class:`InputRef` objects.
            warnings: warnings raised while making it.
            started: when work on this output began; the run start if omitted.
            converter, model: override the tracker's defaults for this output.
            output_sha256: the output's hash if already known.
            phi_values: identifying values of the patient concerned (name, id, birth date...):
                the record is checked with :func:`medidiff.privacy.find_phi` and not written if
                any occurs in it.

        Raises:
            ValueError: the record would contain one of ``phi_values``.
        """
        record = make_record(
            output,
            [self._input(i) for i in inputs],
            stage=self.stage,
            run_id=self.run_id,
            config=self.config,
            started=started or self.started,
            output_root=self.run_dir,
            output_sha256=output_sha256,
            seeds=self.seeds,
            precision=self.precision,
            device=self.device,
            converter=converter or self.converter,
            model=model or self.model,
            warnings=warnings,
        )
        if phi_values and (hits := find_phi(record, phi_values)):
            # Report where, never what: the message may end up in logs.
            raise ValueError(
                f"provenance record of {record.output.path} would contain patient identifiers at "
                f"{hits}; record input paths relative to the input root or rename the folders"
            )
        write_record(record, output)
        with self._lock:
            self.records.append(record)
        return record

    def finish(self) -> Path:
        """Write the run's PROV-JSON document to ``run_dir/provenance.prov.json``; returns its path."""
        with self._lock:
            records = list(self.records)
        return write_prov_document(records, self.run_dir / RUN_PROV_NAME)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # The document is written even after an error: it says what was made before the failure.
        self.finish()
