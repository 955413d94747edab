"""Serve medidiff's deployments from one process, without a work pool (`medidiff serve`, or
``python -m flows.serve [--prefect-yaml PATH]``).

The deployments are those of the repository's ``prefect.yaml`` (schedules, parameters, descriptions),
with its ``{{ $VAR }}`` placeholders filled from the environment now, as ``prefect deploy`` would. Runs
execute in this process's environment; stop it with Ctrl-C. For workers on other machines, use a work
pool instead (``prefect deploy --all``; docs/flows.md).
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

PREFECT_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"
_VAR = re.compile(r"\{\{\s*\$([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def _fill(value: Any) -> Any:
    """``{{ $VAR }}`` placeholders filled from the environment (a missing variable is an error)."""
    if isinstance(value, str):

        def env(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in os.environ:
                raise KeyError(f"prefect.yaml needs the environment variable {name} (see its header comment)")
            return os.environ[name]

        return _VAR.sub(env, value)
    if isinstance(value, dict):
        return {k: _fill(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v) for v in value]
    return value


def deployments_from_yaml(
    path: str | os.PathLike[str] = PREFECT_YAML, names: list[str] | None = None
) -> list[Any]:
    """The ``RunnerDeployment`` of every deployment in ``path`` (or of ``names``), ready for ``prefect.serve``."""
    import yaml
    from prefect.utilities.importtools import import_object

    spec = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    out = []
    for d in spec.get("deployments", []):
        if names and d["name"] not in names:
            continue
        flow = import_object(d["entrypoint"])
        crons = [s["cron"] for s in d.get("schedules") or [] if "cron" in s]
        out.append(
            flow.to_deployment(
                name=d["name"],
                parameters=_fill(d.get("parameters") or {}),
                cron=crons[0] if crons else None,
                description=d.get("description"),
                concurrency_limit=d.get("concurrency_limit"),
            )
        )
    return out


def main(argv: list[str] | None = None) -> None:
    from prefect import serve

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prefect-yaml", default=str(PREFECT_YAML))
    p.add_argument("--only", nargs="*", default=None, help="serve only these deployments")
    a = p.parse_args(argv)
    serve(*deployments_from_yaml(a.prefect_yaml, a.only))


if __name__ == "__main__":
    main()
