"""The export documentation's pictures (docs/export.md): one review sheet per result type, and an exported
series in Orthanc's web viewer, taken with headless Chromium.

Needs `make demo` (the pipeline's results in demo_out/), Debian's orthanc, orthanc-webviewer and chromium:

    MEDIDIFF_HASH_KEY=medidiff-demo-cohort-synthetic-public-key-v1 python scripts/export_figures.py \\
        --demo demo_out --out docs/img

Orthanc runs on free loopback ports in a temporary folder and is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from PIL import Image

from medidiff.export import export_dicom
from medidiff.export.pacs import PacsProfile, export_files, free_port, send, start_orthanc
from medidiff.export.review import review_sheet

# the pipeline's folders (make demo): a stage's result per volume, and the synthetic volumes
KINDS = {
    "segment": "segmentation",
    "denoise": "denoised",
    "reconstruct": "reconstruction",
    "synthetic": "synthetic",
}


def result_folder(demo: Path, stage: str) -> Path:
    """``demo/synthetic``, or the first volume's folder of ``demo/<stage>/``."""
    if stage == "synthetic":
        return demo / stage
    return sorted(p for p in (demo / stage).iterdir() if p.is_dir())[0]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, default=Path("demo_out"))
    ap.add_argument("--out", type=Path, default=Path("docs/img"))
    ap.add_argument("--drop", type=Path, default=None, help="the DICOM drop (default: DEMO/drop/dicom)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        for folder, name in KINDS.items():
            files = review_sheet(
                result_folder(args.demo, folder), t / folder, input_root=[args.demo / "ingested"]
            )
            # 256 colours keep the repository small; the sheets themselves stay full colour
            Image.open(files["png"]).quantize(256).save(args.out / f"review_{name}.png", optimize=True)
            print(f"wrote {args.out / f'review_{name}.png'}")
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium is None:
            sys.exit("chromium is not installed (Debian: apt-get install chromium)")
        profile = PacsProfile(name="figures", port=free_port(), http_port=free_port())
        orthanc = start_orthanc(t / "orthanc", profile)
        try:
            export_dicom(
                result_folder(args.demo, "denoise"),
                t / "export",
                source_dir=args.drop or args.demo / "drop" / "dicom",
                input_root=[args.demo / "ingested"],
                deidentify=True,
            )
            send(export_files(t / "export"), profile)
            record = json.loads((t / "export" / "export.json").read_text())
            mean_uid = next(o["series_uid"] for o in record["objects"] if o["folder"].endswith("_mean"))
            base = f"http://127.0.0.1:{profile.http_port}"
            ids = json.load(urllib.request.urlopen(f"{base}/series"))
            series_id = next(
                i for i in ids
                if json.load(urllib.request.urlopen(f"{base}/series/{i}"))["MainDicomTags"]["SeriesInstanceUID"] == mean_uid
            )  # fmt: skip
            png = args.out / "orthanc_web_viewer.png"
            subprocess.run(
                [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                 "--window-size=1000,700", "--virtual-time-budget=15000", f"--screenshot={png}",
                 f"{base}/web-viewer/app/viewer.html?series={series_id}"],
                check=True, capture_output=True, timeout=120,
            )  # fmt: skip
            print(f"wrote {png}")
        finally:
            orthanc.stop()


if __name__ == "__main__":
    main()
