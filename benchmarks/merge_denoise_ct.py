"""Merge the low-dose CT benchmark's reporting parts run as separate processes (one per dose) into one
summary: ``python benchmarks/merge_denoise_ct.py OUT.json PART.json|PART.log ...``. A ``.log`` is a
process's stderr (one JSON row per line: the rows of a run stopped before it wrote its JSON); ``--doses``
keeps only those doses of the inputs that follow it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_denoise_ct as bench


def rows_of(path: Path) -> list[dict]:
    if path.suffix == ".json":
        return json.loads(path.read_text())["reporting"]["rows"]
    return [
        json.loads(line) for line in path.read_text().splitlines() if line.startswith('{"part": "reporting"')
    ]


def main(argv: list[str]) -> None:
    out, rows, doses = Path(argv[0]), [], None
    for arg in argv[1:]:
        if arg.startswith("--doses="):
            doses = {float(d) for d in arg.split("=", 1)[1].split(",")}
            continue
        rows += [r for r in rows_of(Path(arg)) if doses is None or r["dose"] in doses]
    summary = bench.summarise(rows)
    text = bench.markdown(summary)
    out.write_text(
        json.dumps({"sources": argv[1:], "rows": rows, "summary": summary, "markdown": text}, indent=1) + "\n"
    )
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
