"""Talking to a PACS over DIMSE (pynetdicom): store, verify by querying back, and pull a study for ingest.

- :class:`PacsProfile`: where a PACS listens (host, DICOM port, its AE title, ours) and how hard to try;
  profiles live in a YAML file (``configs/pacs.yaml``: the loopback Orthanc of :func:`orthanc_config`).
- :func:`send`: C-STORE every file of an export, with retries (a new association after a failure, waits
  growing 1, 2, 4 ... s), then C-FIND at series level to check that the PACS holds as many instances of
  each series as were sent. A file that could not be stored, or a series that comes back short, raises
  :class:`PacsError` listing them: nothing is half-sent without being reported.
- :func:`pull_study`: C-GET of a study into a folder (each file written to a temporary name, then
  renamed), ready for ``medidiff ingest``.
- :func:`orthanc_config` / :func:`start_orthanc`: a real PACS on loopback (Debian's ``orthanc`` with its
  DICOMweb and web-viewer plugins), configured by medidiff: storage under a folder of ours, no remote
  access, our AE title registered as a modality.

No patient data is logged: messages name SOP classes, counts and series folders, never patient
attributes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

__all__ = [
    "PacsError",
    "PacsProfile",
    "SendReport",
    "free_port",
    "load_profile",
    "orthanc_config",
    "pull_study",
    "send",
    "start_orthanc",
]

ORTHANC_PLUGINS = Path("/usr/share/orthanc/plugins")


class PacsError(RuntimeError):
    """A PACS that could not be reached, or a transfer that did not complete (the message says which)."""


class PacsProfile(BaseModel):
    """A PACS to talk to."""

    name: str = "local"
    host: str = "127.0.0.1"
    port: int = Field(4242, ge=1, le=65535)
    called_aet: str = Field("ORTHANC", max_length=16)
    calling_aet: str = Field("MEDIDIFF", max_length=16)
    http_port: int | None = Field(8042, description="DICOMweb / web viewer port, if any")
    retries: int = Field(3, ge=0, le=10)
    timeout_s: float = Field(30.0, gt=0)


def load_profile(name: str, config: str | os.PathLike[str] | None = None) -> PacsProfile:
    """Profile ``name`` from ``config`` (YAML: ``profiles: {name: {...}}``; default: ``$MEDIDIFF_PACS_CONFIG``
    or the package's ``configs/pacs.yaml``)."""
    import yaml

    path = Path(
        config
        or os.environ.get("MEDIDIFF_PACS_CONFIG")
        or Path(__file__).parents[2] / "configs" / "pacs.yaml"
    )
    if not path.is_file():
        raise PacsError(f"no PACS profiles file at {path}; pass --pacs-config or set MEDIDIFF_PACS_CONFIG.")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    profiles = data.get("profiles") or {}
    if name not in profiles:
        raise PacsError(f"no PACS profile {name!r} in {path} (it has: {', '.join(profiles) or 'none'}).")
    return PacsProfile(name=name, **profiles[name])


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------- Orthanc


def orthanc_config(
    folder: str | os.PathLike[str],
    profile: PacsProfile,
    *,
    client_port: int | None = None,
    plugins: bool = True,
) -> Path:
    """Write an Orthanc configuration for ``profile`` (loopback only) into ``folder``; returns its path."""
    d = Path(folder)
    (d / "storage").mkdir(parents=True, exist_ok=True)
    cfg: dict[str, Any] = {
        "Name": "medidiff-pacs",
        "StorageDirectory": str(d / "storage"),
        "IndexDirectory": str(d / "storage"),
        "DicomAet": profile.called_aet,
        "DicomPort": profile.port,
        "HttpPort": profile.http_port or free_port(),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": True,
        "DicomModalities": {
            "medidiff": [profile.calling_aet, "127.0.0.1", client_port or 104],
        },
        "StableAge": 1,
        "Plugins": [str(ORTHANC_PLUGINS)] if plugins and ORTHANC_PLUGINS.is_dir() else [],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    path = d / "orthanc.json"
    path.write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    return path


@dataclass
class OrthancProcess:
    """A running Orthanc; :meth:`stop` ends it."""

    process: subprocess.Popen[bytes]
    profile: PacsProfile
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_orthanc(
    folder: str | os.PathLike[str], profile: PacsProfile, *, timeout_s: float = 30.0
) -> OrthancProcess:
    """Start Orthanc with :func:`orthanc_config` in ``folder`` and wait until it answers a C-ECHO."""
    exe = shutil.which("Orthanc")
    if exe is None:
        raise PacsError(
            "Orthanc is not installed (Debian: apt-get install orthanc orthanc-dicomweb orthanc-webviewer)."
        )
    config = orthanc_config(folder, profile)
    log = Path(folder) / "orthanc.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([exe, str(config)], stdout=out, stderr=subprocess.STDOUT)
    running = OrthancProcess(proc, profile, log)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PacsError(f"Orthanc exited at start (code {proc.returncode}); see {log}.")
        if echo(profile):
            return running
        time.sleep(0.3)
    running.stop()
    raise PacsError(
        f"Orthanc did not answer a C-ECHO on port {profile.port} within {timeout_s:.0f} s; see {log}."
    )


# ---------------------------------------------------------------------------------------------- DIMSE


def _ae(profile: PacsProfile) -> Any:
    from pynetdicom import AE

    ae = AE(ae_title=profile.calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = profile.timeout_s
    return ae


def echo(profile: PacsProfile) -> bool:
    """Whether the PACS answers a C-ECHO."""
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = _ae(profile)
    ae.add_requested_context(Verification)
    assoc = ae.associate(profile.host, profile.port, ae_title=profile.called_aet)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


@dataclass
class SendReport:
    """What :func:`send` did: instances stored, and the per-series counts the PACS reported back."""

    stored: int = 0
    attempts: int = 0
    series: dict[str, dict[str, int]] = field(default_factory=dict)


def send(
    files: Sequence[str | os.PathLike[str]],
    profile: PacsProfile,
    *,
    notify: Callable[[str], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> SendReport:
    """C-STORE ``files`` to ``profile``, retrying, then verify per series by C-FIND (see module docstring).

    Raises:
        PacsError: the PACS is unreachable after the retries, a file was refused, or a series came back
            with fewer instances than were sent; the message lists what was and was not stored.
    """
    import pydicom

    datasets = [pydicom.dcmread(str(f)) for f in files]
    pending = list(range(len(datasets)))
    report = SendReport()
    contexts = sorted({(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets})
    failures: dict[int, str] = {}
    for attempt in range(profile.retries + 1):
        report.attempts = attempt + 1
        ae = _ae(profile)
        for sop, ts in contexts:
            ae.add_requested_context(sop, [ts])
        assoc = ae.associate(profile.host, profile.port, ae_title=profile.called_aet)
        if assoc.is_established:
            still = []
            for i in pending:
                try:
                    status = assoc.send_c_store(datasets[i])
                except (RuntimeError, ValueError) as e:  # no accepted context, broken association
                    failures[i] = str(e)
                    still.append(i)
                    continue
                if status and status.Status in (0x0000, 0xB000, 0xB007, 0xB006):
                    report.stored += 1
                    failures.pop(i, None)
                else:
                    failures[i] = f"status 0x{status.Status:04X}" if status else "no response"
                    still.append(i)
            assoc.release()
            pending = still
        else:
            for i in pending:
                failures[i] = "association refused or PACS unreachable"
        if not pending:
            break
        if attempt < profile.retries:
            if notify:
                notify(f"warning: {len(pending)} of {len(datasets)} instances not stored yet; retrying")
            sleep(2.0**attempt)
    if pending:
        reasons = sorted({failures.get(i, "unknown") for i in pending})
        raise PacsError(
            f"{len(pending)} of {len(datasets)} instances were NOT stored on {profile.name} "
            f"({profile.host}:{profile.port}) after {report.attempts} attempt(s): {'; '.join(reasons)}. "
            f"{report.stored} were stored."
        )
    sent: dict[str, int] = {}
    study_of: dict[str, str] = {}
    for d in datasets:
        sent[str(d.SeriesInstanceUID)] = sent.get(str(d.SeriesInstanceUID), 0) + 1
        study_of[str(d.SeriesInstanceUID)] = str(d.StudyInstanceUID)
    for series_uid, n in sent.items():
        found = count_instances(profile, study_of[series_uid], series_uid)
        report.series[series_uid] = {"sent": n, "found": found}
    short = {k: v for k, v in report.series.items() if v["found"] < v["sent"]}
    if short:
        raise PacsError(
            f"{len(short)} series came back from {profile.name} with fewer instances than were sent: "
            + ", ".join(f"{v['found']}/{v['sent']}" for v in short.values())
        )
    return report


def _find_images(profile: PacsProfile, study_uid: str, series_uid: str, what: str) -> list[Any]:
    """C-FIND at IMAGE level in a study (a series of it, if given): the identifiers, with SOPClassUID."""
    from pydicom.dataset import Dataset
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

    ae = _ae(profile)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(profile.host, profile.port, ae_title=profile.called_aet)
    if not assoc.is_established:
        raise PacsError(f"could not reach {profile.name} ({profile.host}:{profile.port}) to {what}.")
    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"
    q.StudyInstanceUID, q.SeriesInstanceUID, q.SOPInstanceUID, q.SOPClassUID = study_uid, series_uid, "", ""
    found = [
        ident
        for status, ident in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind)
        if status and status.Status in (0xFF00, 0xFF01) and ident is not None
    ]
    assoc.release()
    return found


def count_instances(profile: PacsProfile, study_uid: str, series_uid: str) -> int:
    """Instances of a series the PACS holds (C-FIND, IMAGE level)."""
    return len(_find_images(profile, study_uid, series_uid, "verify the send"))


def study_sop_classes(profile: PacsProfile, study_uid: str) -> list[str]:
    """The SOP classes of the instances of a study (C-FIND, IMAGE level), sorted; at most 120 (an
    association offers at most 128 presentation contexts)."""
    idents = _find_images(profile, study_uid, "", "query a study")
    return sorted({str(i.SOPClassUID) for i in idents if i.get("SOPClassUID")})[:120]


def pull_study(profile: PacsProfile, study_uid: str, dst: str | os.PathLike[str]) -> list[Path]:
    """C-GET every instance of ``study_uid`` into ``dst`` (``<n>.dcm``, atomic writes); returns the files.

    Raises:
        PacsError: unreachable, refused, or nothing received.
    """
    from pydicom.dataset import Dataset
    from pynetdicom import build_role, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet  # type: ignore[attr-defined]

    from medidiff.io.atomic import atomic_path

    out = Path(dst)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def on_store(event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        path = out / f"{len(written) + 1:06d}.dcm"
        with atomic_path(path) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
        written.append(path)
        return 0x0000

    classes = study_sop_classes(profile, study_uid)
    if not classes:
        raise PacsError(
            f"{profile.name} holds no instance of the requested study (C-FIND); check the study UID."
        )
    ae = _ae(profile)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    roles = []
    for uid in classes:  # the storage classes the study holds, as the C-GET's sub-operations need them
        ae.add_requested_context(uid)
        roles.append(build_role(uid, scp_role=True))
    assoc = ae.associate(
        profile.host,
        profile.port,
        ae_title=profile.called_aet,
        ext_neg=roles,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    if not assoc.is_established:
        raise PacsError(f"could not reach {profile.name} ({profile.host}:{profile.port}) to pull a study.")
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = study_uid
    failed = 0
    for status, _ in assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet):
        if status and status.Status not in (0x0000, 0xFF00, 0xFF01, 0xB000):
            failed += 1
    assoc.release()
    if not written:
        raise PacsError(
            f"{profile.name} returned no instance of the requested study (C-GET); check the study UID."
        )
    if failed:
        raise PacsError(
            f"the C-GET reported {failed} failure(s); {len(written)} instances were received into {out}."
        )
    return written


def export_files(export_dir: str | os.PathLike[str]) -> list[Path]:
    """The DICOM files of an export folder (its ``export.json`` lists them)."""
    d = Path(export_dir)
    record = json.loads((d / "export.json").read_text(encoding="utf-8"))
    return [d / o["folder"] / f for o in record["objects"] for f in o["files"]]
