"""Ingest runs as real processes: the output-folder lock, two runs at once, kill -9 and rerun.

Every test starts ``medidiff ingest`` (and lock holders) as real subprocesses on real files; no
mocks. Each subprocess runs in its own session so that it and its worker processes can be
killed as a group; every test kills what it started, whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from medidiff.io.atomic import sha256_file
from medidiff.io.dicom_write import write_dicom_series
from medidiff.volume import Volume

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock, process groups and SIGKILL are POSIX")

MEDIDIFF = Path(sys.executable).parent / "medidiff"
HASH_KEY = "runs-test-key-0123456789abcdef"
WAITING = "being written by another medidiff run"
# Generous: the suite runs on 2 cores, possibly beside other CPU-heavy jobs.
RUN_TIMEOUT = 180.0

# Holds DST's lock until RELEASE appears (or a safety deadline passes), after writing READY.
HOLDER = """
import sys, time
from pathlib import Path
from medidiff.io.lock import DestinationLock

dst, ready, release, limit = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
with DestinationLock(dst, timeout=0):
    ready.write_text("held")
    deadline = time.monotonic() + limit
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
"""


# ------------------------------------------------------------------------------------ helpers
def _env() -> dict[str, str]:
    # A wide console so that rich does not wrap the messages the tests look for.
    return dict(os.environ, MEDIDIFF_HASH_KEY=HASH_KEY, COLUMNS="500", OMP_NUM_THREADS="1")


class Procs:
    """Starts subprocesses in their own sessions; kills every group it started at teardown."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], name: str) -> subprocess.Popen[bytes]:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.out", "wb") as out, open(self.logs / f"{name}.err", "wb") as err:
            p = subprocess.Popen(
                [str(a) for a in args], stdout=out, stderr=err, env=_env(), start_new_session=True
            )
        self.started.append(p)
        return p

    def ingest(self, src: Path, dst: Path, *extra: str, name: str = "ingest") -> subprocess.Popen[bytes]:
        return self.start([str(MEDIDIFF), "ingest", str(src), str(dst), *extra], name)

    def holder(self, dst: Path, tmp: Path, limit: float = 60.0) -> tuple[subprocess.Popen[bytes], Path]:
        """A process holding DST's lock; returns it and the file that makes it let go."""
        ready, release = tmp / "holder.ready", tmp / "holder.release"
        p = self.start([sys.executable, "-c", HOLDER, dst, ready, release, str(limit)], "holder")
        _wait_for(lambda: ready.exists() or p.poll() is not None, 60, "the lock holder to start")
        assert ready.exists(), f"the lock holder exited ({p.returncode}): {self.stderr('holder')}"
        return p, release

    def stderr(self, name: str) -> str:
        """What the process wrote to stderr, whitespace normalised."""
        return " ".join((self.logs / f"{name}.err").read_text(errors="replace").split())

    def finish(self, p: subprocess.Popen[bytes], name: str, timeout: float = RUN_TIMEOUT) -> int:
        try:
            return p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(p)
            pytest.fail(f"{name} did not finish within {timeout} s; stderr: {self.stderr(name)[-2000:]}")

    def kill_all(self) -> None:
        for p in self.started:
            _kill_group(p)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    ps = Procs(tmp_path / "logs")
    try:
        yield ps
    finally:
        ps.kill_all()


def _kill_group(p: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, signal.SIGKILL)  # start_new_session: the group id is the pid
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(timeout=10)


def _wait_for(cond, timeout: float, what: str, every: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group is still running (zombies do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def _volume(shape: tuple[int, int, int], seed: int) -> Volume:
    rng = np.random.default_rng(seed)
    aff = np.diag([-1.0, -1.0, 2.0, 1.0])
    aff[:3, 3] = (10.0, -20.0, 30.0)
    return Volume(rng.integers(-1000, 1500, size=shape).astype(np.int16), aff, "CT")


def _drop(src: Path, n: int, shape: tuple[int, int, int]) -> Path:
    """``n`` DICOM series of ``shape`` from three patients."""
    for i in range(n):
        write_dicom_series(
            _volume(shape, seed=i),
            src / f"series{i:02d}",
            series_number=i + 1,
            patient_id=f"PID-RUNS-{i % 3}",
            patient_name=f"Runtest^Patient{i % 3}",
        )
    return src


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _temp_files(dst: Path) -> list[Path]:
    """Leftovers of atomic writes (``.<name>.<random>.tmp<suffix>``) anywhere under DST."""
    import re

    own = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp(\..*)?")  # tempfile.mkstemp's 8 random characters
    return sorted(p for p in dst.rglob(".*") if p.is_file() and own.fullmatch(p.name))


def _volumes(dst: Path) -> dict[str, str]:
    """Every output volume under DST (outside ``.medidiff``): relative path -> sha256."""
    return {
        str(p.relative_to(dst)): sha256_file(p)
        for p in sorted(dst.rglob("*.nii.gz"))
        if ".medidiff" not in p.relative_to(dst).parts and not p.name.startswith(".")
    }


def _check_coherent(dst: Path, n_series: int) -> dict:
    """The manifest, the files on disk, the provenance records and the data card agree."""
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["summary"]["converted"] == n_series, manifest["summary"]
    assert manifest["summary"]["failed"] == 0, manifest["problems"]
    outputs = manifest["outputs"]
    assert len(outputs) == n_series
    assert len({o["series"] for o in outputs}) == n_series
    for o in outputs:
        out = dst / o["path"]
        assert out.is_file(), f"listed output {o['path']} is missing"
        assert sha256_file(out) == o["sha256"], f"{o['path']} differs from its manifest entry"
        assert (dst / o["sidecar"]).is_file(), f"sidecar of {o['path']} is missing"
        prov = dst / (o["path"] + ".prov.json")
        assert prov.is_file(), f"provenance record of {o['path']} is missing"
        record = json.loads(prov.read_text())
        assert record["output"]["path"] == o["path"]
        assert record["output"]["sha256"] == o["sha256"], f"record of {o['path']} names another file"
    assert set(_volumes(dst)) == {o["path"] for o in outputs}, "volumes on disk and in the manifest differ"
    card = json.loads((dst / "datacard.json").read_text())
    assert card["provenance"]["manifest_sha256"] == sha256_file(dst / "manifest.json")
    assert card["provenance"]["run_id"] == manifest["run_id"]
    json.loads((dst / "provenance.prov.json").read_text())
    assert _temp_files(dst) == []
    return manifest


@pytest.fixture
def small_drop(tmp_path: Path) -> Path:
    return _drop(tmp_path / "drop", 6, (16, 16, 10))


# ------------------------------------------------------------------------------------ 1. the lock
def test_lock_timeout_refuses_with_exit_3_and_writes_nothing(
    tmp_path: Path, procs: Procs, small_drop
) -> None:
    dst = tmp_path / "out"
    holder, release = procs.holder(dst, tmp_path)
    t0 = time.monotonic()
    p = procs.ingest(small_drop, dst, "--lock-timeout", "0.5")
    rc = procs.finish(p, "ingest", timeout=60)
    elapsed = time.monotonic() - t0
    err = procs.stderr("ingest")
    assert rc == 3, err
    assert elapsed < 30, f"a 0.5 s lock timeout took {elapsed:.1f} s"
    assert WAITING in err, err
    assert f"pid {holder.pid}" in err, err
    assert "--lock-timeout" in err, err
    assert not (dst / "manifest.json").exists()
    assert [p for p in dst.rglob("*") if p.is_file() and p.relative_to(dst).parts[0] != ".medidiff"] == []
    assert holder.poll() is None, "the refused run disturbed the holder"
    release.touch()
    assert procs.finish(holder, "holder", timeout=30) == 0


def test_run_waits_for_the_lock_then_completes(tmp_path: Path, procs: Procs, small_drop) -> None:
    dst = tmp_path / "out"
    holder, release = procs.holder(dst, tmp_path)
    p = procs.ingest(small_drop, dst)
    _wait_for(lambda: WAITING in procs.stderr("ingest") or p.poll() is not None, 60, "the waiting message")
    err = procs.stderr("ingest")
    assert p.poll() is None, f"the run ended ({p.returncode}) while the lock was held: {err}"
    assert WAITING in err and f"pid {holder.pid}" in err, err
    time.sleep(1.0)
    assert p.poll() is None, "the run finished while another held the lock"
    assert not (dst / "manifest.json").exists()
    assert _volumes(dst) == {}
    release.touch()
    assert procs.finish(holder, "holder", timeout=30) == 0
    assert procs.finish(p, "ingest") == 0, procs.stderr("ingest")
    _check_coherent(dst, 6)


def test_lock_of_a_killed_holder_does_not_block(tmp_path: Path, procs: Procs, small_drop) -> None:
    dst = tmp_path / "out"
    holder, _ = procs.holder(dst, tmp_path)
    holder.send_signal(signal.SIGKILL)
    assert holder.wait(timeout=30) == -signal.SIGKILL
    # The lock file still names the dead holder: only the kernel's flock release frees it.
    info = json.loads((dst / ".medidiff" / "lock").read_text())
    assert info["pid"] == holder.pid
    p = procs.ingest(small_drop, dst, "--lock-timeout", "0")
    assert procs.finish(p, "ingest") == 0, procs.stderr("ingest")
    assert WAITING not in procs.stderr("ingest")
    _check_coherent(dst, 6)


# ------------------------------------------------------------------------------ 2. two at once
def test_two_runs_at_once_leave_a_coherent_folder(tmp_path: Path, procs: Procs, small_drop) -> None:
    dst = tmp_path / "out"
    before = _hashes(small_drop)
    a = procs.ingest(small_drop, dst, name="a")
    b = procs.ingest(small_drop, dst, name="b")
    assert procs.finish(a, "a") == 0, procs.stderr("a")
    assert procs.finish(b, "b") == 0, procs.stderr("b")
    manifest = _check_coherent(dst, 6)
    assert {o["path"] for o in manifest["outputs"]} == set(_volumes(dst))
    assert _hashes(small_drop) == before, "input files were modified"


# ------------------------------------------------------------------------- 3. kill -9 and rerun
@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_loses_nothing(tmp_path: Path, procs: Procs) -> None:
    n = 16
    src = _drop(tmp_path / "drop", n, (128, 128, 64))
    inputs = _hashes(src)
    dst = tmp_path / "out"
    items = dst / ".medidiff" / "items"

    def done_items() -> list[Path]:
        return sorted(f for f in items.glob("*.json") if not f.name.startswith(".")) if items.is_dir() else []

    p = procs.ingest(src, dst, "--workers", "2", name="killed")
    _wait_for(lambda: done_items() or p.poll() is not None, RUN_TIMEOUT, "the first converted item", 0.005)
    # Kill while an output is being written, when it can be caught (temporary files in place).
    deadline = time.monotonic() + 3
    while not _temp_files(dst) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert p.poll() is None, (
        f"the run ended ({p.returncode}) before it could be killed; make the drop bigger: "
        + procs.stderr("killed")[-2000:]
    )
    os.killpg(p.pid, signal.SIGKILL)
    assert p.wait(timeout=30) == -signal.SIGKILL
    _wait_for(lambda: not _group_alive(p.pid), 30, "the killed run's workers to die")

    assert not (dst / "manifest.json").exists(), "the run was killed after it finished"
    complete: dict[str, str] = {}
    for f in done_items():
        for o in json.loads(f.read_text())["outputs"]:
            assert sha256_file(dst / o["path"]) == o["sha256"], f"{o['path']} damaged by the kill"
            complete[o["path"]] = o["sha256"]
    assert 0 < len(complete) < n, f"{len(complete)} of {n} items were complete at the kill"

    p = procs.ingest(src, dst, "--workers", "2", name="rerun")
    assert procs.finish(p, "rerun") == 0, procs.stderr("rerun")
    manifest = _check_coherent(dst, n)
    after = _volumes(dst)
    for path, sha in complete.items():
        assert after.get(path) == sha, f"{path}, complete before the kill, was lost or changed"

    clean = tmp_path / "clean"
    p = procs.ingest(src, clean, "--workers", "2", name="clean")
    assert procs.finish(p, "clean") == 0, procs.stderr("clean")
    clean_manifest = _check_coherent(clean, n)
    assert after == _volumes(clean), "the interrupted-then-rerun outputs differ from a clean run's"
    assert {(o["path"], o["sha256"]) for o in manifest["outputs"]} == {
        (o["path"], o["sha256"]) for o in clean_manifest["outputs"]
    }
    assert _hashes(src) == inputs, "input files were modified"


# ------------------------------------------------------------------- 4. leftovers of crashed runs
def test_leftovers_of_a_crashed_run_are_cleaned_and_user_files_kept(
    tmp_path: Path, procs: Procs, small_drop
) -> None:
    dst = tmp_path / "out"
    p = procs.ingest(small_drop, dst, name="first")
    assert procs.finish(p, "first") == 0, procs.stderr("first")
    first = _check_coherent(dst, 6)
    subject = dst / first["outputs"][0]["subject"]

    stale = [
        subject / ".0001_CT_axial_0123456789.nii.gz.k2j4x9ab.tmp.nii.gz",
        subject / ".0001_CT_axial_0123456789.json.a8b7c6_d.tmp.json",
        subject / ".0001_CT_axial_0123456789.nii.gz.prov.json.q1w2e3r4.tmp.json",
        dst / ".manifest.json.z9y8x7w6.tmp.json",
        dst / ".medidiff" / "items" / ".0123456789abcdef.json.m5n6b7v8.tmp.json",
    ]
    for f in stale:
        f.write_bytes(b"half-written by a killed run")
    old_work = dst / ".medidiff" / "work"  # plans of old versions (they held input paths)
    (old_work / "plan-old.json").parent.mkdir(parents=True)
    (old_work / "plan-old.json").write_text("{}")
    # the user's own files, hidden ones with ".tmp" in their names included: not medidiff's to delete
    kept = [
        dst / "README.txt",
        subject / "notes.md",
        dst / ".env.tmpl",
        subject / ".notes.tmp",
        dst / ".tmp_keep",
    ]
    for f in kept:
        f.write_text("the user's own file")

    # Damage of the kind a crash (or a user) can leave: a truncated output, a missing record and a
    # half-written item cache entry. Each of these items must be redone, not trusted.
    o_trunc, o_noprov, o_badcache = first["outputs"][:3]
    data = (dst / o_trunc["path"]).read_bytes()
    (dst / o_trunc["path"]).write_bytes(data[: len(data) // 2])
    (dst / (o_noprov["path"] + ".prov.json")).unlink()
    caches = {
        json.loads(f.read_text())["item_id"]: f for f in (dst / ".medidiff" / "items").glob("[!.]*.json")
    }
    bad = caches[o_badcache["item"]]
    bad.write_text(bad.read_text()[:40])

    p = procs.ingest(small_drop, dst, "--lock-timeout", "0", name="second")
    assert procs.finish(p, "second") == 0, procs.stderr("second")
    second = _check_coherent(dst, 6)
    assert [f for f in stale if f.exists()] == []
    assert not old_work.exists()
    assert all(f.read_text() == "the user's own file" for f in kept)
    assert {(o["path"], o["sha256"]) for o in second["outputs"]} == {
        (o["path"], o["sha256"]) for o in first["outputs"]
    }
    json.loads(bad.read_text())  # rewritten whole
