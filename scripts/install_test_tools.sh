#!/usr/bin/env bash
# Non-Python tools the test suite uses: dicom3tools (dciodvfy, the DICOM validator), and a real PACS
# (orthanc with its DICOMweb and web-viewer plugins) for the export tests.
# dcm2niix comes from PyPI with the Python dependencies. Needs root or sudo for apt-get;
# without them the DICOM-validation tests are skipped with a message saying why.
set -euo pipefail
if command -v dciodvfy >/dev/null 2>&1 && command -v Orthanc >/dev/null 2>&1; then exit 0; fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "install_test_tools: dciodvfy missing and not root; DICOM validation tests will be skipped" >&2; exit 0
  fi
fi
if command -v apt-get >/dev/null 2>&1; then
  $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq dicom3tools orthanc orthanc-dicomweb orthanc-webviewer >/dev/null \
    || echo "install_test_tools: could not install dicom3tools / orthanc; the tests that need them will be skipped" >&2
fi
