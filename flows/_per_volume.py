"""What every per-volume flow shares: outputs named by a keyed hash of the input, and a batch that survives
one bad volume.

``<name>`` is ``vol-`` and a keyed hash (the patient-hash key, :func:`medidiff.privacy.load_key`) of the
file's SHA-256, never the input's file name, which can carry a patient's name: so are the output folders
and the task-run names. ``failures.json`` lists a failed input by its position, name and SHA-256, with
its path cut out of the error message; ``inputs.json`` maps each name to its input's SHA-256, so a user
finds the output of a file by hashing it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from medidiff.privacy import scrub_path

__all__ = ["keyed_names", "run_per_volume", "scrubbed_error"]


def keyed_names(inputs: list[str]) -> list[tuple[str, str | None]]:
    """``(name, sha256)`` of each input: a keyed hash of its content (of its path if unreadable)."""
    from medidiff.io.atomic import sha256_file
    from medidiff.privacy import PatientHasher, load_key

    hasher = PatientHasher(load_key(), prefix="vol-")
    out: list[tuple[str, str | None]] = []
    seen: dict[str, int] = {}
    for item in inputs:
        try:
            digest: str | None = sha256_file(item)
        except OSError:
            digest = None
        name = hasher.hash(digest or str(Path(item).resolve()))
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name}-{seen[name]}", digest))
    return out


def scrubbed_error(e: Exception, path: str, name: str) -> Exception:
    """``e`` again with the input's path cut from its message (Prefect logs a failed task's exception)."""
    message = scrub_path(str(e), path, name)
    try:
        return type(e)(message)
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {message}")


def run_per_volume(submit: Callable[[str, str], Any], out_dir: str, inputs: list[str]) -> list[str]:
    """Submit ``submit(name, input)`` for every input and collect the results.

    A volume that fails does not stop the others: it is listed with its reason in
    ``OUT_DIR/failures.json``. Raises only when every volume failed.
    """
    from medidiff.io.atomic import atomic_write_json

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    names = keyed_names(inputs)
    atomic_write_json(
        Path(out_dir) / "inputs.json",
        {"inputs": [{"item": i, "name": n, "sha256": d} for i, (n, d) in enumerate(names)]},
    )
    futures = [submit(n, item) for (n, _), item in zip(names, inputs, strict=True)]
    done: list[str] = []
    failures: list[dict[str, Any]] = []
    for i, ((name, digest), item, fut) in enumerate(zip(names, inputs, futures, strict=True)):
        res = fut.result(raise_on_failure=False)
        if isinstance(res, BaseException):
            error = scrub_path(f"{type(res).__name__}: {res}", item, name)
            failures.append({"item": i, "name": name, "sha256": digest, "error": error})
        else:
            done.append(res)
    if failures:
        atomic_write_json(Path(out_dir) / "failures.json", {"failures": failures})
    if inputs and not done:
        raise RuntimeError(f"every volume failed; reasons in {Path(out_dir) / 'failures.json'}")
    return done
