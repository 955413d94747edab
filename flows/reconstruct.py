"""Prefect flow for reconstruction: one task per volume, paths between tasks.

    python -m flows.reconstruct OUT_DIR REF1.nii.gz [REF2.nii.gz ...] --prior runs/demo --simulate mri

Each task runs :func:`medidiff.stages.reconstruct.reconstruct_volume` on one reference volume
(or raw measurement) into ``OUT_DIR/<name>/`` and returns the path of its ``reconstruction.json``.
``<name>`` is ``vol-`` and a keyed hash (the patient-hash key, :func:`medidiff.privacy.load_key`) of the
file's SHA-256, never the input's file name, which can carry a patient's name: so are the task-run
names, and ``failures.json`` lists a failed input by its position, name and SHA-256, with its path
cut out of the error message. ``OUT_DIR/inputs.json`` maps each name to its input's SHA-256, so a user
finds the output of a file by hashing it.
Tasks retry on I/O errors only. On a GPU worker, run the flow with a task runner that limits
concurrency to the number of GPUs; particles of one volume are already batched on the device.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows._retry import retry_on_io
from medidiff.stages.reconstruct import reconstruct_volume


def _names(references: list[str]) -> list[tuple[str, str | None]]:
    """``(name, sha256)`` of each input: a keyed hash of its content (of its path if unreadable)."""
    from medidiff.io.atomic import sha256_file
    from medidiff.privacy import PatientHasher, load_key

    hasher = PatientHasher(load_key(), prefix="vol-")
    out: list[tuple[str, str | None]] = []
    seen: dict[str, int] = {}
    for ref in references:
        try:
            digest: str | None = sha256_file(ref)
        except OSError:
            digest = None
        name = hasher.hash(digest or str(Path(ref).resolve()))
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name}-{seen[name]}", digest))
    return out


def _scrubbed(text: str, reference: str, name: str) -> str:
    """``text`` with the input's path, file name and stem replaced by its keyed name."""
    p = Path(reference)
    stem = p.name.removesuffix(".gz").removesuffix(".nii")
    for needle in sorted({reference, str(p.resolve()), p.name, stem} - {""}, key=len, reverse=True):
        text = re.sub(re.escape(needle), name, text, flags=re.IGNORECASE)
    return text


@task(
    name="reconstruct-volume",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_on_io,
    cache_policy=NO_CACHE,
    task_run_name="reconstruct-{name}",
)
def reconstruct_task(name: str, out_dir: str, reference: str, settings: dict[str, Any]) -> str:
    try:
        result = reconstruct_volume(Path(out_dir) / name, reference=reference, **settings)
    except Exception as e:  # Prefect logs a failed task's exception: not with the input's file name
        message = _scrubbed(str(e), reference, name)
        try:
            clean = type(e)(message)
        except Exception:
            clean = RuntimeError(f"{type(e).__name__}: {message}")
        raise clean from None
    return str(result.files["sidecar"])


@flow(name="medidiff-reconstruct")
def reconstruct_flow(
    out_dir: str, references: list[str], settings: dict[str, Any] | None = None
) -> list[str]:
    """Reconstruct every reference volume; returns the paths of the ``reconstruction.json`` files.

    A volume that fails (bad file, bad settings, non-finite network output) does not stop the others:
    it is listed with its reason in ``OUT_DIR/failures.json`` (by position, keyed name and SHA-256). The flow fails only when every volume
    failed.
    """
    from medidiff.io.atomic import atomic_write_json

    opts = dict(settings or {})
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    names = _names(references)
    atomic_write_json(
        Path(out_dir) / "inputs.json",
        {"inputs": [{"item": i, "name": n, "sha256": d} for i, (n, d) in enumerate(names)]},
    )
    futures = [
        reconstruct_task.submit(n, out_dir, r, opts) for (n, _), r in zip(names, references, strict=True)
    ]
    done: list[str] = []
    failures: list[dict[str, Any]] = []
    for i, ((name, digest), ref, fut) in enumerate(zip(names, references, futures, strict=True)):
        res = fut.result(raise_on_failure=False)
        if isinstance(res, BaseException):
            error = _scrubbed(f"{type(res).__name__}: {res}", ref, name)
            failures.append({"item": i, "name": name, "sha256": digest, "error": error})
        else:
            done.append(res)
    if failures:
        atomic_write_json(Path(out_dir) / "failures.json", {"failures": failures})
    if references and not done:
        raise RuntimeError(f"every volume failed; reasons in {Path(out_dir) / 'failures.json'}")
    return done


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("references", nargs="+")
    p.add_argument("--prior", default=None)
    p.add_argument("--simulate", choices=["mri", "ct"], default="mri")
    p.add_argument("--method", default="smc")
    p.add_argument("--accel", type=float, default=4.0)
    p.add_argument("--views", type=int, default=60)
    p.add_argument("--particles", type=int, default=16)
    p.add_argument("--steps", type=int, default=50)
    a = p.parse_args()
    settings = {
        "prior": a.prior,
        "simulate": a.simulate,
        "method": a.method,
        "acceleration": a.accel,
        "views": a.views,
        "n_particles": a.particles,
        "steps": a.steps,
    }
    print(reconstruct_flow(a.out_dir, a.references, settings))


if __name__ == "__main__":
    main()
