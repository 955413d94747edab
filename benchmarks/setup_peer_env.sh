#!/usr/bin/env bash
# Build .venv-peer: a second, throw-away virtual environment for the peer benchmark (issue 4).
#
# Why a second venv: deepinv imports torchvision at import time, and no torchvision wheel reachable here
# loads beside the project's CPU build of torch 2.13 ("operator torchvision::nms does not exist"). The
# pair torch 2.14.1 / torchvision 0.29.1 (CUDA builds, which also run on a CPU) does; the project venv
# (.venv) is left alone. medidiff goes in editable and without its dependencies: the compute core that
# the peer benchmark uses (medidiff.diffusion, medidiff.inverse) imports only numpy and torch.
#
# Usage: bash benchmarks/setup_peer_env.sh [--force]   (from anywhere; ~5.5 GB; several minutes)
# Idempotent: does nothing when .venv-peer already imports deepinv and medidiff at the pinned versions.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-peer"
PY="$VENV/bin/python"
TORCH_PIN="torch==2.14.1"
TV_PIN="torchvision==0.29.1"
PYTHON="${PYTHON:-python3}"

check() {
    "$PY" - <<'EOF' 2>/dev/null
import deepinv, numpy, torch, torchvision  # noqa: F401
import medidiff.diffusion.analytic, medidiff.inverse  # noqa: F401
assert torch.__version__.split("+")[0] == "2.14.1", torch.__version__
assert torchvision.__version__.split("+")[0] == "0.29.1", torchvision.__version__
print(f"deepinv {deepinv.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}")
EOF
}

if [[ "${1:-}" != "--force" ]] && [[ -x "$PY" ]] && check; then
    echo "setup_peer_env: $VENV is already set up; nothing to do (pass --force to reinstall)."
    exit 0
fi

if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)'; then
    echo "setup_peer_env: $PYTHON is not Python 3.11; the pinned torch wheel is for 3.11. Set PYTHON=..." >&2
    exit 1
fi

[[ -x "$PY" ]] || "$PYTHON" -m venv "$VENV"
"$PY" -m pip install --upgrade --quiet pip
"$PY" -m pip install "$TORCH_PIN" "$TV_PIN" deepinv numpy
# medidiff without its (heavy, IO-edge) dependencies: the peer benchmark needs only numpy and torch.
"$PY" -m pip install --no-deps -e "$ROOT"

if ! check; then
    echo "setup_peer_env: $VENV was built but deepinv or medidiff does not import; see the pip output above." >&2
    exit 1
fi
echo "setup_peer_env: $VENV ready."
