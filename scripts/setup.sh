#!/usr/bin/env bash
# Create (or update) the project's virtual environment from requirements.txt.
#   VENV: where it lives (default ~/.cache/places365-ray/venv, outside the clone, so every clone
#         and CI run shares one 5.5 GB environment instead of building its own).
# Re-running is cheap: it reinstalls only when requirements.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-$HOME/.cache/places365-ray/venv}"
PYTHON="${PYTHON:-python3}"
stamp="$VENV/.requirements.txt"

if [ -x "$VENV/bin/python" ] && cmp -s requirements.txt "$stamp"; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating virtual environment in $VENV"
  "$PYTHON" -m venv "$VENV"
fi
echo "setup: installing requirements.txt (first time: torch + Ray, a few minutes, ~6 GB)"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -r requirements.txt
cp requirements.txt "$stamp"
echo "setup: done ($("$VENV/bin/python" -c 'import torch, ray; print(f"torch {torch.__version__}, ray {ray.__version__}")'))"
