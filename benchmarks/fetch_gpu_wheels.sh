#!/usr/bin/env bash
# Download (here, where PyPI is reachable) the wheels the GPU machine lacks into .whl/ (ignored by
# git, carried by the device tool). The GPU image has Python 3.12 with torch, einops, pyyaml,
# rich, safetensors, scipy and scikit-image; medidiff's compute core also needs monai and pydantic.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY=${PYTHON:-.venv/bin/python}
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "monai==$(ver monai)" "pydantic==$(ver pydantic)" "pydantic-core==$(ver pydantic-core)" \
  "annotated-types==$(ver annotated-types)" "typing-inspection==$(ver typing-inspection)"
ls -la .whl
